"""Fitting a run to its GPU: the activation memory budget of the compiled blocks, on one GPU
whether the blocks stay gathered between their forward and backward passes, and, where nothing
else makes the run fit, activation offloading.

A compiled block may keep fewer of its activations for the backward pass and recompute the rest
(PyTorch's partitioner picks the cheapest first). Left unset, mt chooses the largest share with
which ``max_tokens_per_gpu`` fits the GPU by ``mt check``'s memory estimate (within 4% of the
measured peak, tools/bench/RESULTS.md): a model whose float32 weights, gradients and AdamW state
fill most of the GPU still trains on long rows (one H100: the 3B shape on 16k-token rows, not 8k).
Where even a budget of 0 (or activation checkpointing) leaves the run too large and
activation_offload is not set, the saved activations wait in host memory if that makes it fit.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from mt_core.config import TrainingArgs
from mt_core.plan.memory import (
    GIB,
    MASTER_BYTES,
    ModelShape,
    Settings,
    compiled_share,
    estimate,
    fitting_activation_budget,
    usable_bytes,
)
from mt_core.plan.room import readable_size

if TYPE_CHECKING:
    from transformers import PretrainedConfig


__all__ = [
    "Fit",
    "activation_budget_scope",
    "choose_fit",
    "fit_to_gpu",
    "host_memory_problem",
    "most_minibatches",
    "run_settings",
    "syncs_every_minibatch",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fit:
    """How a run fits its GPU."""

    activation_budget: float = 1.0  # the share of their activations compiled blocks keep
    keep_gathered: bool = False  # one GPU: blocks stay gathered from their forward to backward
    activation_offload: bool = False  # the blocks' saved activations wait in host memory
    cpu_offload: bool = False  # weights, gradients and optimizer state in host memory
    osft_reference_on_host: bool = False  # OSFT's frozen copies W0 in host memory
    # under cpu_offload: the gradients summed on the GPU over a step's minibatches and sent to
    # host memory once (syncs_every_minibatch), where the GPU has room for them
    deferred_sync: bool = False
    summary: str = ""  # what was chosen and why, for the run's log (empty: nothing to say)

    def applied(self, run: Settings) -> Settings:
        """``run`` as it trains with this fit: what the memory estimate is made for."""
        return replace(
            run, activation_budget=self.activation_budget, gathered=self.keep_gathered,
            activation_offload=self.activation_offload, cpu_offload=self.cpu_offload,
            osft_reference_on_host=self.osft_reference_on_host,
            deferred_sync=run.deferred_sync or self.deferred_sync,
        )  # fmt: skip


def _set_budget(budget: float | None, compiled: bool, checkpointing: bool) -> float:
    """The run file's budget where the compiler can use it (compiled blocks that are not
    checkpointed anyway), else 1: everything kept."""
    return budget if budget is not None and compiled and not checkpointing else 1.0


def choose_fit(
    shape: ModelShape, run: Settings, usable: float, *, budget: float | None,
    may_offload: bool = False, host_room: float = math.inf, may_cpu_offload: bool = False,
    may_host_reference: bool = False, may_defer_sync: bool = False,
) -> Fit:  # fmt: skip
    """The fit of ``run`` on a GPU that may allocate ``usable`` bytes; ``budget`` is the run
    file's activation_memory_budget (None: the largest that fits, where ``run.compiled``). On one
    GPU the blocks stay gathered between forward and backward where that fits with every
    activation kept: FSDP then casts each block's weights once a minibatch instead of twice (1B,
    16k and 32k rows: +1.6%).
    With ``may_offload`` (the run file leaves activation_offload unset) activation offload is
    turned on where the run fits with it and not without. With ``may_cpu_offload`` (cpu_offload
    unset), a run that fits neither way is fitted again with cpu_offload, the slowest lever (its
    optimizer step runs on the CPU), taken where the GPU then holds it. Either is taken only where
    all the process then keeps in host memory is within ``host_room`` bytes.

    With ``may_host_reference`` (osft_reference_on_host unset) OSFT's frozen copies W0 go to host
    memory under activation checkpointing, which asks for the lean plan (nor do blocks stay
    gathered then), and otherwise where the run fits with them there and not without, before
    either offload (one copy of W0 a step, overlapped with the projections, is cheaper than
    activations both ways or the optimizer step on the CPU).

    With ``may_defer_sync`` (sync_gradients_every_minibatch unset), a run under cpu_offload
    sums its gradients on the GPU and reduces them once a step where the GPU holds them then,
    with a smaller activation budget if need be: FSDP2 otherwise sends each minibatch's
    gradients to host memory and adds them up there, on the CPU (1B shape on one H100: 2.24 s a
    step instead of 6.29, tools/bench/RESULTS.md)."""
    hosted = replace(run, osft_reference_on_host=True)
    if may_host_reference and shape.osft_reference_values and run.checkpointing:
        run = hosted
    fit = _fit_gpu(shape, run, usable, budget, may_offload, host_room)
    if (may_host_reference and shape.osft_reference_values and not run.osft_reference_on_host
            and estimate(shape, fit.applied(run)).peak > usable):  # fmt: skip
        chosen = _fit_gpu(shape, hosted, usable, budget, may_offload, host_room)
        if _holds(shape, chosen, hosted, usable, host_room):
            fit, run = chosen, hosted
    if may_cpu_offload and not run.cpu_offload and estimate(shape, fit.applied(run)).peak > usable:
        offloaded = replace(run, cpu_offload=True)
        chosen = _fit_gpu(shape, offloaded, usable, budget, may_offload, host_room)
        if _holds(shape, chosen, offloaded, usable, host_room):
            fit = chosen
    if may_defer_sync and fit.cpu_offload:
        # before a larger activation budget: recomputing activations costs less than what the
        # deferred sync saves (both fitted as chosen above, activation offload as it was)
        deferring = replace(fit.applied(run), deferred_sync=True)
        chosen = _fit_gpu(shape, deferring, usable, budget, False, host_room)
        if _holds(shape, chosen, deferring, usable, host_room):
            return replace(chosen, deferred_sync=True)
    return fit


def _holds(shape: ModelShape, fit: Fit, run: Settings, usable: float, host_room: float) -> bool:
    """Whether ``run`` with ``fit`` stays within ``usable`` bytes of the GPU and ``host_room``
    of host memory, by the estimate."""
    memory = estimate(shape, fit.applied(run))
    return memory.peak <= usable and memory.host <= host_room


def _fit_gpu(
    shape: ModelShape, run: Settings, usable: float, budget: float | None, may_offload: bool,
    host_room: float,
) -> Fit:  # fmt: skip
    """choose_fit without cpu_offload's choice: the budget, then activation offload."""
    fit = _fit_budget(shape, run, usable, budget=budget)
    if may_offload and estimate(shape, fit.applied(run)).peak > usable:
        offloaded = replace(run, activation_offload=True)
        with_offload = _fit_budget(shape, offloaded, usable, budget=budget, host_room=host_room)
        if _holds(shape, with_offload, offloaded, usable, host_room):
            return with_offload
    return fit


def _fit_budget(
    shape: ModelShape, run: Settings, usable: float, *, budget: float | None,
    host_room: float = math.inf,
) -> Fit:  # fmt: skip
    """The activation budget and gathering of ``run``, its activation offload as it is (and what
    that keeps in host memory within ``host_room``)."""
    kept = _set_budget(budget, run.compiled, run.checkpointing)
    # (checkpointed blocks: the lean plan, and their backward gathers them for the recomputed
    # forward anyway)
    gathered = (run.world_size == 1 and not run.cpu_offload and not run.checkpointing
                and estimate(shape, replace(run, gathered=True, activation_budget=kept)).peak
                <= usable)  # fmt: skip
    offloads = (run.activation_offload, run.cpu_offload, run.osft_reference_on_host)
    if budget is not None or not run.compiled or run.checkpointing:
        return Fit(kept, gathered, *offloads)
    chosen = fitting_activation_budget(shape, replace(run, gathered=gathered), usable, host_room)
    return Fit(0.0 if chosen is None else chosen, gathered, *offloads)


def syncs_every_minibatch(args: TrainingArgs, world_size: int, fit: Fit) -> bool:
    """Whether gradients are reduce-scattered after every minibatch: the run file's
    sync_gradients_every_minibatch, else under cpu_offload as the fit chose (once a step where
    the GPU has room: :func:`choose_fit`), else yes on more than one GPU and for master
    weights narrower than float32. A deferred sync keeps each GPU's whole unsharded
    gradient until the step's last minibatch, in FSDP2's reduce dtype, float32: 4 bytes a
    parameter, which cpu_offload is there to move off the GPU (8B shape on one H200: 37.4 GiB
    measured against 11.6 estimated without it), and twice a bfloat16 master's own gradients
    (8B, one H200: 29.9 GiB of them at the peak where the bfloat16 gradients are 15.0;
    tools/gpu/osft_cost.py --memory-profile). On one GPU with float32 weights the two cost the
    same (the memory model counts a deferred sync only where it costs: asked for, or chosen
    by the fit under cpu_offload)."""
    if args.sync_gradients_every_minibatch is not None:
        return args.sync_gradients_every_minibatch
    if fit.cpu_offload:
        return not fit.deferred_sync
    return world_size > 1 or MASTER_BYTES[args.train_dtype] < 4


def most_minibatches(args: TrainingArgs, lengths: np.ndarray, world_size: int) -> int:
    """1 where every possible global batch fits one minibatch per GPU, else 2: what the memory
    estimate needs to know (gradients of earlier minibatches wait for the later ones; more than
    two cost no more). The packer spreads a batch over the ``world_size / sequence_parallel_size``
    data-parallel ranks largest sample first, which loads no rank with more than an even share
    plus (1 - 1/ranks) of the longest sample (the list-scheduling bound); the batch of the
    ``batch_size`` longest samples is the worst."""
    size = args.sequence_parallel_size
    ranks = max(world_size // size, 1)
    largest = np.sort(np.asarray(lengths, dtype=np.float64))[-args.batch_size :]
    if largest.size == 0:
        return 1
    busiest = largest.sum() / ranks + largest.max() * (1 - 1 / ranks)
    return 1 if busiest <= args.max_tokens_per_gpu * size else 2


def run_settings(
    args: TrainingArgs, world_size: int, liger: bool, minibatches: int = 1, compiled: bool = False
) -> Settings:
    """What the memory estimate needs to know of a run, from its keys and what the trainer
    resolved (Liger on or off, blocks compiled or not). cpu_offload not set counts as off (the
    fit may turn it on); a deferred gradient sync counts where the run file asks for one (the
    fit adds its own choice under cpu_offload: :meth:`Fit.applied`), the only cases in which it
    costs memory (syncs_every_minibatch)."""
    return Settings(
        max_tokens=args.max_tokens_per_gpu,
        world_size=world_size,
        master=args.train_dtype,
        state=args.optimizer_state_dtype,
        liger=liger,
        compiled=compiled,
        checkpointing=args.activation_checkpointing,
        cpu_offload=bool(args.cpu_offload),  # not set: the fit decides
        activation_offload=bool(args.activation_offload),  # not set: the fit decides
        osft_reference_on_host=bool(args.osft_reference_on_host),  # not set: the fit decides
        deferred_sync=args.sync_gradients_every_minibatch is False,
        minibatches=minibatches,
        float8=args.float8,
    )


def fit_to_gpu(
    args: TrainingArgs,
    config: PretrainedConfig,
    *,
    capacity_bytes: float | None,
    host_bytes: float = math.inf,
    world_size: int,
    compiled: bool,
    liger: bool,
    lengths: np.ndarray,
    shape: ModelShape | None = None,
    warn: bool = True,
) -> Fit:
    """The fit of a run, by the memory estimate, for a GPU of ``capacity_bytes`` (None: not a
    GPU; then only a budget set in the run file applies) whose process may keep up to
    ``host_bytes`` in host memory where the fit turns an offload on (:func:`mt_core.plan.room.host_room_bytes`).
    ``shape``: the model's, where already built; ``warn``: log a warning where nothing makes the
    run fit (``mt check`` says so in its own report)."""
    budget = args.activation_memory_budget
    if capacity_bytes is None:  # host memory is not the limit the estimate is made for
        kept = _set_budget(budget, compiled, args.activation_checkpointing)
        return Fit(kept, activation_offload=bool(args.activation_offload),
                   cpu_offload=bool(args.cpu_offload),
                   osft_reference_on_host=bool(args.osft_reference_on_host))  # fmt: skip
    # here, not at the top: choose_fit and run_settings are arithmetic that `mt check` uses
    # before any model is built, and a run file's mistakes are shown without loading torch
    if shape is None:
        from mt_core.plan.shape import run_shape

        shape = run_shape(config, args)
    minibatches = most_minibatches(args, lengths, world_size)
    run = run_settings(args, world_size, liger, minibatches, compiled)
    usable = usable_bytes(capacity_bytes)
    fit = choose_fit(
        shape, run, usable, budget=budget,
        may_offload=args.activation_offload is None, host_room=host_bytes,
        may_cpu_offload=args.cpu_offload is None,
        may_host_reference=args.osft and args.osft_reference_on_host is None,
        may_defer_sync=args.sync_gradients_every_minibatch is None,
    )  # fmt: skip
    memory = estimate(shape, fit.applied(run))
    peak = memory.peak
    if peak > usable and warn:
        logger.warning(
            "max_tokens_per_gpu = %d needs about %.1f GiB per GPU (%.1f GiB usable)%s: lower it "
            "or set activation_checkpointing = true",
            args.max_tokens_per_gpu, peak / GIB, usable / GIB,
            " even with the activations recomputed" if fit.activation_budget == 0 else "",
        )  # fmt: skip
    said = []
    if budget is None and fit.activation_budget < 1:
        said.append(
            f"activation_memory_budget {fit.activation_budget:.2f}: the compiled blocks keep "
            f"about {compiled_share(shape, fit.activation_budget):.2f} of their activations "
            "beyond each block's input and recompute the rest"
        )
    if args.activation_offload is None and fit.activation_offload:
        said.append(
            f"activation_offload on: the decoder blocks' saved activations wait in host memory "
            f"between their forward and backward passes ({memory.host / GIB:.1f} GiB of it per "
            f"GPU)"
        )
    if args.cpu_offload is None and fit.cpu_offload:
        osft = " (and OSFT's frozen copies and bases)" if shape.osft_reference_values else ""
        said.append(
            f"cpu_offload on: the weights, gradients and optimizer state{osft} wait in host "
            f"memory ({memory.host / GIB:.1f} GiB of it per GPU) and the optimizer step runs on "
            f"the CPU, much slower"
        )
    if said:
        said[-1] += f" so that {args.max_tokens_per_gpu:,} tokens per GPU fit"
    if args.osft_reference_on_host is None and fit.osft_reference_on_host:
        why = "the lean plan of activation_checkpointing" if run.checkpointing else "to fit"
        said.append(
            f"osft_reference_on_host on ({why}): OSFT's frozen copies wait in host memory, each "
            f"copied to the GPU for its weight projection after the step"
        )
    if fit.keep_gathered:
        said.append(
            "decoder blocks stay gathered from forward to backward (one GPU, room to spare)"
        )
    if fit.deferred_sync:
        said.append(
            "gradients summed on the GPU over the step and sent to host memory once (under "
            "cpu_offload, much faster than every minibatch)"
        )
    if said:
        said[-1] += f" (estimated peak {peak / GIB:.1f} of {usable / GIB:.1f} GiB usable)"
    return replace(fit, summary="; ".join(said))


def host_memory_problem(
    args: TrainingArgs,
    config: PretrainedConfig,
    *,
    world_size: int,
    local_processes: int,
    available_bytes: float | None,
) -> str | None:
    """Why what ``args`` keeps in host memory (cpu_offload: every process's shard of weights,
    gradients and optimizer state) does not fit this node's available memory, or None when it
    does (or nothing is offloaded, or the memory is unknown)."""
    if not args.cpu_offload or available_bytes is None:
        return None
    from mt_core.plan.shape import run_shape  # (see fit_to_gpu)

    shape = run_shape(config, args)
    run = run_settings(args, world_size, liger=True)
    per_process = estimate(shape, run).host
    needed = per_process * local_processes
    if needed <= available_bytes:
        return None
    osft = ", and OSFT's frozen copies and bases" if shape.osft_reference_values else ""
    return (
        f"cpu_offload = true keeps {readable_size(per_process)} per process in host memory (weights, "
        f"gradients and AdamW state of its shard{osft}; {readable_size(needed)} for the {local_processes} "
        f"process(es) of this node), but only {readable_size(available_bytes)} is available "
        "(MemAvailable, /proc/meminfo). Lower it with optimizer_state_dtype = "
        "'bfloat16' (or train_dtype = 'bfloat16' with stochastic_rounding = true), or spread "
        "the run over more nodes"
    )


@contextlib.contextmanager
def activation_budget_scope(budget: float) -> Iterator[None]:
    """Compile (and recompile) the blocks with ``budget`` while training: the partitioner reads
    it when a block is first run, not when ``compile`` is called."""
    if budget >= 1:
        yield
        return
    import torch._functorch.config as functorch_config

    with functorch_config.patch(activation_memory_budget=budget):
        yield
