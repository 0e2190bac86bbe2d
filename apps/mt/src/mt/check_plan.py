"""What ``mt check`` found out about a run (:class:`Plan`), shared by the check itself
(:mod:`mt.check`), its levers (:mod:`mt.check_levers`) and its report (:mod:`mt.check_report`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mt_core.config import TrainingArgs
from mt_core.plan.fit import choose_fit
from mt_core.plan.memory import Gpu, Memory, ModelShape, Settings
from mt_core.plan.resolve import Resolved

__all__ = ["Plan", "StepSample", "fitted"]


@dataclass
class StepSample:
    """One global batch drawn by the run's sampler, packed as the run would pack it."""

    tokens: int
    loss_tokens: int
    minibatches: int
    first: int  # tokens on one GPU of the step's fullest first minibatch (over the ranks)
    later: int  # ... of its fullest later one (0: one minibatch): it starts with gradients alive
    time_s: float  # at the stated MFU, the busiest rank of each minibatch setting the pace

    @property
    def largest(self) -> int:
        """Tokens of the step's fullest minibatch on one GPU."""
        return max(self.first, self.later)


@dataclass
class Plan:
    """Everything ``mt check`` found out about one run on one GPU type and world size."""

    run_file: str
    args: TrainingArgs
    model_config: str
    shape: ModelShape
    gpu: Gpu
    nproc_per_node: int
    nnodes: int
    mfu: float
    settings: Settings
    resolved: Resolved  # the trainer's settings on this GPU (mt_core.plan.resolve)
    gpu_capability: tuple[int, int] | None  # the planned GPU's CUDA compute capability
    memory: Memory
    memory_ac: Memory  # the same run with activation checkpointing on
    memory_no_ac: Memory  # ... and off
    items: str  # "samples" or "blocks"
    file_samples: int
    file_tokens: int
    file_loss_tokens: int | None
    dropped_long: int
    dropped_silent: int
    train_items: int
    validation_items: int
    longest: int
    steps: list[StepSample]
    steps_per_epoch: int
    total_steps: int | None
    cache_note: str
    notes: list[str] = field(default_factory=list)

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    @property
    def fits(self) -> bool:
        return self.memory.peak <= self.gpu.usable_gib * 2**30


def fitted(args: TrainingArgs, shape: ModelShape, run: Settings, device: Gpu) -> Settings:
    """``run`` (a lever's change of the plan's settings) with the fit the trainer would choose for
    it on this GPU: the compiled blocks' activation budget, on one GPU whether blocks stay
    gathered, OSFT's frozen copies in host memory and activation offload where the run file leaves
    them unset and the trainer's rules choose them, and under cpu_offload whether gradients are
    reduced once a step. cpu_offload is never chosen here: levers and suggestions say how the run
    fits without it."""
    return choose_fit(
        shape, run, device.usable_gib * 2**30, budget=args.activation_memory_budget,
        may_offload=args.activation_offload is None,
        may_host_reference=args.osft and args.osft_reference_on_host is None,
        may_defer_sync=args.sync_gradients_every_minibatch is None,
    ).applied(run)  # fmt: skip
