"""Where a run stands (the counters a checkpoint carries) and the rules of when things happen:
when training ends, when an HF export or a validation is due."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np

from mt_core.config import TrainingArgs

__all__ = ["RunCounters", "export_due", "finished", "planned_steps", "validation_due"]


@dataclass
class RunCounters:
    """Counters of a run; plain JSON in every checkpoint (never pickle)."""

    step: int = 0
    samples_seen: int = 0
    tokens_seen: int = 0
    epochs_done: int = 0
    exported_at: int = -1  # samples_seen of the last HF export; -1 = none yet
    skipped_steps: int = 0
    best_val_loss: float | None = None
    validated_at: int = 0  # samples_seen at the last validation

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, record: dict) -> RunCounters:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in names})


def planned_steps(args: TrainingArgs, lengths: np.ndarray, batches_per_epoch: int) -> int | None:
    """Optimizer steps the run will take (the schedule's length); None for an infinite run."""
    if args.training_mode == "step":
        return args.max_steps
    if args.training_mode == "epoch":
        return batches_per_epoch * args.max_epochs
    if args.training_mode == "token":
        # Batches are drawn at random, so the token count per step varies: plan with the mean.
        mean_tokens = float(np.mean(lengths)) * args.batch_size
        return max(1, math.ceil(args.max_tokens / mean_tokens))
    return None


def finished(args: TrainingArgs, state: RunCounters) -> bool:
    if args.training_mode == "step":
        return state.step >= args.max_steps
    if args.training_mode == "epoch":
        return state.epochs_done >= args.max_epochs
    if args.training_mode == "token":
        return state.tokens_seen >= args.max_tokens
    return False


def export_due(args: TrainingArgs, state: RunCounters, epoch_ended: bool, done: bool) -> bool:
    """An HF export after this step: at the end, at an epoch's end, or every N samples."""
    if state.samples_seen == state.exported_at:
        return False
    if done and args.save_final_checkpoint:
        return True
    if epoch_ended and args.checkpoint_at_epoch:
        return True
    every = args.min_samples_per_checkpoint
    return bool(every) and state.samples_seen - max(state.exported_at, 0) >= every


def validation_due(args: TrainingArgs, state: RunCounters, epoch_ended: bool, done: bool) -> bool:
    """Whether any trigger fires after this step; several firing at once validate once."""
    if not args.validation_split and args.validation_data_path is None:
        return False
    every_steps = args.validation_frequency
    every_samples = args.min_samples_per_validation
    return bool(
        (every_steps and state.step % every_steps == 0)
        or (args.validate_at_epoch and epoch_ended)
        or (every_samples and state.samples_seen - state.validated_at >= every_samples)
        or (args.validate_at_final and done)
    )
