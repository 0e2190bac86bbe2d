"""The train loop: read it top to bottom.

:func:`train` sets the run up (:mod:`mt_core.trainer.setup`), then repeats: the sampler draws the
global batch and the packer splits it over ranks and into minibatches, :func:`train_step` makes
one optimizer step of it (:mod:`mt_core.trainer.step`), and :func:`after_step` does what
follows (metrics, validation, exports, checkpoints, stop: :mod:`mt_core.trainer.after_step`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
from torch.distributed.checkpoint.api import CheckpointException
from torch.profiler import record_function

from mt_core.config import ConfigError, TrainingArgs
from mt_core.errors import RunError
from mt_core.model.determinism import deterministic_kernels
from mt_core.trainer.after_step import after_step
from mt_core.trainer.counters import finished
from mt_core.trainer.library_noise import quiet_libraries
from mt_core.trainer.lifecycle import OutputDir
from mt_core.trainer.out_of_memory import gpu_memory, out_of_memory_message
from mt_core.trainer.peers import PeerWatch
from mt_core.trainer.setup import Run, setup_run
from mt_core.trainer.step import StepClock, train_step
from mt_data import DataError
from mt_fsdp import (
    CheckpointError,
    DistContext,
    init_distributed,
    latest_checkpoint,
    shutdown_distributed,
)

__all__ = ["TrainResult", "train"]

logger = logging.getLogger("mt_core")


@dataclass
class TrainResult:
    """Where a finished run stands."""

    output_dir: Path
    steps: int
    samples_seen: int
    tokens_seen: int
    last_loss: float
    exports: list[Path]


def train(args: TrainingArgs) -> TrainResult:
    """Run ``args`` to its end in this process (one of torchrun's ranks, or alone)."""
    # deterministic kernels from the start: cuBLAS reads its workspace setting once, at the
    # first GPU matmul
    with deterministic_kernels(args.deterministic):
        try:
            ctx = init_distributed(
                sequence_parallel_size=args.sequence_parallel_size,
                timeout=timedelta(seconds=args.collective_timeout),
            )
        except ValueError as error:  # the size does not divide the processes started
            raise ConfigError([f"sequence_parallel_size: {error}"]) from error
        if not ctx.is_main:
            _quiet()  # rank 0 speaks for the run; the others only raise errors
        peers = PeerWatch()
        try:
            return _train(args, ctx)
        except CheckpointError as error:  # disk full, quota: the message says what is intact
            peers.ended_by_own_error()
            raise RunError(str(error)) from error
        except (ConfigError, DataError, RunError, KeyboardInterrupt):
            peers.ended_by_own_error()  # reported by this rank: the others end quietly
            raise
        except (Exception, CheckpointException) as error:  # a collective failed, or a bug
            shutdown_distributed()  # first: peers blocked on this rank fail now, not later
            lost = peers.explain(error, Path(args.output_dir), _resume_setting(args))
            if lost is not None:
                raise lost from None
            peers.ended_by_own_error()  # every peer is there: this rank's own error
            raise
        finally:
            peers.close()
            shutdown_distributed()


def _train(args: TrainingArgs, ctx: DistContext) -> TrainResult:
    output = OutputDir(args, ctx)  # writable, and ours alone for the run
    try:
        with quiet_libraries(), setup_run(args, ctx, output.path) as run:
            return _loop(run)
    finally:
        output.release()


def _loop(run: Run) -> TrainResult:
    """Steps until the run's end or a stop signal, with the callbacks' hooks around them."""
    counters, fire = run.counters, run.fire
    done = finished(run.args, counters)
    fire("on_train_begin", step=counters.step, epoch=counters.epochs_done)
    clock = StepClock()
    epoch_open = False
    # tokens of this rank's largest first minibatch of a step and largest later one (which
    # starts its backward pass with the step's earlier gradients alive): what its peak was
    first, later = 0, 0
    while not done:
        if not epoch_open:
            fire("on_epoch_begin", step=counters.step, epoch=counters.epochs_done)
            epoch_open = True
        fire("on_step_begin", step=counters.step, epoch=counters.epochs_done)
        with record_function("mt.data"):
            # an epoch sampler's new iterator starts with the next epoch once one has ended
            batch = run.data.loader.step_batch(next(iter(run.data.sampler)))
        sizes = [minibatch.num_tokens for minibatch in batch.minibatches]
        first, later = max(first, sizes[0]), max([later, *sizes[1:]])
        step = counters.step + 1
        try:
            outcome = train_step(run, batch, clock)
            with clock.paused():
                end = after_step(run, batch, outcome)
        except torch.OutOfMemoryError as error:  # why, and what to change: not a traceback
            raise RunError(
                out_of_memory_message(
                    error,
                    step=step,
                    rank=run.ctx.rank,
                    tokens=max(sizes),
                    memory=gpu_memory(run.ctx.device),
                    resolved=run.resolved,
                    max_tokens_per_gpu=run.args.max_tokens_per_gpu,
                    checkpoint=latest_checkpoint(run.checkpoints),
                )  # fmt: skip
            ) from error
        done, epoch_open = end.done, epoch_open and not end.epoch_closed
        if end.stopped:
            break
    fire("on_train_end", step=counters.step, epoch=counters.epochs_done)
    if run.ctx.device.type == "cuda":  # the peak against mt check's plan (rank 0 says it)
        peak = torch.cuda.max_memory_allocated(run.ctx.device)
        report = run.resolved.memory_report(first, later, peak)
        if report is not None:
            logger.info(report)
    return TrainResult(
        run.output_dir, counters.step, counters.samples_seen, counters.tokens_seen,
        run.last_loss, run.exports,
    )  # fmt: skip


def _resume_setting(args: TrainingArgs) -> str:
    return args.resume_from_full_state_checkpoint or args.resume


def _quiet() -> None:
    """Silence warnings and library progress on this rank (every rank would repeat them)."""
    import warnings

    from transformers.utils import logging as hf_logging

    warnings.simplefilter("ignore")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logger.setLevel(logging.ERROR)
