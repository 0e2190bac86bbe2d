"""What a run says when its GPU runs out of memory: one message instead of torch's traceback.

The plan (``mt check``, the fit at the start of ``mt run``) counts what torch allocates; what it
cannot count is how the caching allocator lays that out. Packed rows change length every
minibatch, so blocks of many sizes come and go, and the allocator may hold gigabytes free in
pieces too small for the next request (fragmentation). A 3B run planned at 70.9 of 71.2 GiB on
an 80 GB GPU died so with 68.7 GiB allocated and 8.3 GiB free in pieces (tools/bench/RESULTS.md,
2026-12-05). The message tells that case from a plan that was simply too large, and gives the
fix of each: the allocator's expandable segments, or the keys that make the run need less.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mt_core.plan.memory import GIB, estimate
from mt_core.plan.resolve import Resolved

__all__ = ["GpuMemory", "out_of_memory_message", "gpu_memory"]

# free-but-held memory (reserved by torch, not allocated) above this share of the GPU is called
# fragmentation: the caching allocator keeps a few percent in partly used blocks as a rule
FRAGMENTED_SHARE = 0.05


@dataclass(frozen=True)
class GpuMemory:
    """torch's allocator at the moment of the error, in bytes."""

    allocated: int  # in live tensors
    reserved: int  # held from the GPU by the caching allocator, allocated or not
    total: int  # the GPU's memory


def gpu_memory(device: torch.device) -> GpuMemory | None:
    """The allocator's figures on ``device``; None off CUDA."""
    if device.type != "cuda":
        return None
    return GpuMemory(
        torch.cuda.memory_allocated(device),
        torch.cuda.memory_reserved(device),
        torch.cuda.get_device_properties(device).total_memory,
    )


def out_of_memory_message(
    error: BaseException,
    *,
    step: int,
    rank: int,
    tokens: int,
    memory: GpuMemory | None,
    resolved: Resolved,
    max_tokens_per_gpu: int,
    checkpoint: Path | None,
) -> str:
    """The lines ``mt run`` shows for an out-of-memory ``error`` in ``step`` on ``rank``, whose
    largest minibatch held ``tokens`` tokens."""
    request = str(error).split(". ")[:2]  # "CUDA out of memory. Tried to allocate 752.00 MiB"
    lines = [
        f"step {step}: rank {rank}'s GPU ran out of memory in a step whose largest minibatch "
        f"held {tokens:,} tokens ({'. '.join(request).strip()})"
    ]
    if memory is not None:
        held_free = memory.reserved - memory.allocated
        lines.append(
            f"torch held {memory.reserved / GIB:.1f} of the GPU's {memory.total / GIB:.1f} GiB: "
            f"{memory.allocated / GIB:.1f} GiB in tensors, {held_free / GIB:.1f} GiB free"
        )
    if resolved.shape is not None:
        planned = estimate(resolved.shape, resolved.settings).peak
        lines.append(f"the plan: {resolved.describe()}; its estimated peak {planned / GIB:.1f} GiB")
    if memory is not None and held_free > FRAGMENTED_SHARE * memory.total:
        lines.append(
            f"the {held_free / GIB:.1f} GiB torch held free were in pieces too small for the "
            "request (fragmentation: packed rows change length every minibatch); run again with "
            "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True in the environment (torchrun "
            "passes it to every rank), which maps memory to the blocks as they grow instead"
        )
    budget = resolved.fit.activation_budget
    # halving the budget recomputes more; at 0 (or with eager blocks) there is nothing to lower
    lower_budget = f"activation_memory_budget = {budget / 2:.2f} (now {budget:.2f}), " * (
        resolved.compile_blocks and budget > 0
    )
    lines.append(
        f"to need less: {lower_budget}max_tokens_per_gpu = {max_tokens_per_gpu // 2} (now "
        f"{max_tokens_per_gpu}), activation_checkpointing = true, or cpu_offload = true; "
        "`mt check` on the run file shows what fits"
    )
    lines.append(
        f"nothing of this step was saved; the newest checkpoint is {checkpoint}"
        if checkpoint is not None
        else "nothing of this step was saved; there is no checkpoint yet"
    )
    return "\n".join(lines)
