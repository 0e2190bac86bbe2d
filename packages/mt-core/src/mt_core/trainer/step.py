"""One optimizer step: forward and backward over this rank's minibatches, OSFT's projection of
the gradients, clipping, the step's one host synchronisation, the rule for non-finite losses,
the optimizer step (and OSFT's projection of the update) and the schedule.

Each minibatch's loss is divided by the global batch's target count, so the summed gradients
are those of one unpadded batch, whatever the packing (shared/DESIGN.md).
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.profiler import record_function

from mt_core.errors import NonFiniteError
from mt_core.model.float8 import refresh_weight_scales
from mt_core.optim.build import clip_gradients
from mt_core.plan.flops import attended_context
from mt_core.trainer.loss import minibatch_loss, minibatch_tensors
from mt_core.trainer.setup import Run
from mt_data import StepBatch
from mt_fsdp import DistContext, latest_checkpoint

__all__ = ["StepClock", "StepOutcome", "train_step"]


class StepClock:
    """The time of a step: from one step's host synchronisation to the next, less the
    bookkeeping between them (validation, logging, exports, checkpoints) that is not step time.
    The optimizer step is: it runs after the synchronisation and counts in the next step's time
    (its host side can be long: torchao's per-parameter launches; under cpu_offload the whole
    step runs on the CPU)."""

    def __init__(self) -> None:
        self._last = time.perf_counter()

    def lap(self) -> float:
        """Seconds since the previous lap (or the clock's start)."""
        now = time.perf_counter()
        seconds, self._last = now - self._last, now
        return seconds

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self._last += time.perf_counter() - started


@dataclass(frozen=True)
class StepOutcome:
    """What one step measured (summed over all ranks)."""

    loss: float
    grad_norm: float
    lr: float  # the learning rate the step used
    context_sum: float  # over the batch's tokens, the tokens each attended to (for FLOPs)
    stop_votes: float  # ranks asked to stop (SIGTERM, Ctrl-C)
    step_time_s: float


def train_step(run: Run, batch: StepBatch, clock: StepClock) -> StepOutcome:
    """One optimizer step of ``run`` on the global ``batch`` (this rank's minibatches of it).
    Raises NonFiniteError where the loss or gradient norm is not finite and the run file does
    not say to skip such steps."""
    counters, fire = run.counters, run.fire
    hook = functools.partial(fire, step=counters.step, epoch=counters.epochs_done)
    # (the named ranges label a profiler trace: docs/performance.md)
    with record_function("mt.forward_backward"):
        totals = forward_backward(
            run.model, batch, run.ctx, hook, run.resolved.sync_each_minibatch, run.stop.requested
        )
    with record_function("mt.clip"):
        if run.osft is not None:
            run.osft.project_gradients_()  # Adam's moments then see only trainable directions
        norm = clip_gradients(run.model, run.args.max_grad_norm)
    # The step's one host synchronisation: the optimizer must know whether the loss and
    # gradients are finite. Its kernels then run while the host does the bookkeeping and
    # prepares the next batch, so a step's time runs from one such point to the next.
    loss, context_sum, stop_votes, grad_norm = torch.cat(
        [totals, norm.reshape(1).to(totals.dtype)]
    ).tolist()
    step_time = clock.lap()
    lr = run.scheduler.get_last_lr()[0]
    counters.step += 1
    if math.isfinite(loss) and math.isfinite(grad_norm):
        fire("on_before_optimizer_step", step=counters.step - 1, epoch=counters.epochs_done)
        with record_function("mt.optimizer"):
            run.optimizer.step()
            if run.osft is not None:
                run.osft.project_()  # the total change stays orthogonal to the frozen subspace
            if run.resolved.float8 is not None:
                refresh_weight_scales(run.model)  # the FP8 gathers' scales of the new weights
        fire("on_after_optimizer_step", step=counters.step, epoch=counters.epochs_done)
    elif run.args.skip_nonfinite_steps:
        counters.skipped_steps += 1  # no update; the data of this step is passed over
    else:
        raise NonFiniteError(_nonfinite_message(run, loss, grad_norm))
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return StepOutcome(loss, grad_norm, lr, context_sum, stop_votes, step_time)


def forward_backward(
    model: torch.nn.Module,
    batch: StepBatch,
    ctx: DistContext,
    fire: Callable[..., None],
    sync_each: bool,
    stop_requested: bool,
) -> torch.Tensor:
    """Forward and backward over this rank's minibatches. Returns, summed over all ranks and
    without waiting for the GPU: the global batch's loss, the sum over its tokens of their
    attended context (for the FLOP count), and the number of ranks asked to stop."""
    local_loss = torch.zeros((), dtype=torch.float64, device=ctx.device)
    context_sum = 0.0
    count = len(batch.minibatches)
    for index, minibatch in enumerate(batch.minibatches):
        # Gradients are reduced across ranks after each minibatch or once, after the last.
        model.set_requires_gradient_sync(sync_each or index == count - 1)
        fire("on_before_forward", minibatch=index)
        loss = minibatch_loss(model, **minibatch_tensors(minibatch, ctx.device))
        loss.backward()
        fire("on_after_backward", minibatch=index)
        local_loss += loss.detach()
        if not minibatch.is_empty:
            segments = np.diff(minibatch.cu_seqlens)
            context_sum += attended_context(segments) * minibatch.num_tokens
    host = torch.tensor([context_sum, float(stop_requested)], dtype=torch.float64)
    totals = torch.cat([local_loss.reshape(1), host.to(ctx.device, non_blocking=True)])
    dist.all_reduce(totals)
    return totals


def _nonfinite_message(run: Run, loss: float, grad_norm: float) -> str:
    last = latest_checkpoint(run.checkpoints)
    where = f"the last good checkpoint is {last}" if last else "there is no checkpoint yet"
    return (
        f"step {run.counters.step}: the loss is {loss} and the gradient norm {grad_norm}; "
        f"training stopped and {where}. Lower learning_rate or max_grad_norm, check the data, "
        "or set skip_nonfinite_steps = true to pass over such steps"
    )
