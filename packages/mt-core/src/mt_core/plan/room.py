"""How much memory a process may plan for: the room its GPU leaves it (the allocator's
per-process fraction, other processes on the GPU, this one's CUDA context) and the share of the
node's host memory it may fill with what the fit offloads."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from mt_core.plan.memory import GIB, RESERVED_GIB

if TYPE_CHECKING:
    import torch

__all__ = [
    "HOST_SHARE",
    "available_host_bytes",
    "gpu_room",
    "gpu_room_bytes",
    "host_room_bytes",
    "readable_size",
]

# Of a host's memory, the share that the fit may fill on its own with what it offloads (pinned,
# so never swapped out): the rest is for the processes themselves, the memory-mapped data, the
# page cache. What a run file asks for is refused only where it cannot fit at all
# (mt_core.plan.fit.host_memory_problem).
HOST_SHARE = 0.5


def host_room_bytes(available_bytes: float | None, local_processes: int) -> float:
    """The host memory one GPU process of this machine may fill with what the fit chooses to
    offload (activations, or with cpu_offload its shard of weights, gradients and optimizer
    state): :data:`HOST_SHARE` of the machine's memory, and no more than ``available_bytes``
    (MemAvailable, :func:`available_host_bytes`; None: unknown), shared by the node's
    ``local_processes``."""
    room = HOST_SHARE * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if available_bytes is not None:
        room = min(room, available_bytes)
    return room / local_processes


def gpu_room_bytes(
    total_bytes: float, *, fraction: float = 1.0, free_bytes: float | None = None,
    own_bytes: float = 0.0,
) -> tuple[float, str]:  # fmt: skip
    """The GPU memory this process's fit plans for, and why it is less than the GPU's
    ``total_bytes`` ("" where it is not): no more than its allocator may take (the per-process
    ``fraction`` of torch.cuda.set_per_process_memory_fraction), and no more than other
    processes leave it: the ``free_bytes`` the driver reports, what this process's allocator
    already holds (``own_bytes``), and the headroom :func:`mt_core.plan.memory.usable_bytes` keeps for this process's
    own CUDA context (which the driver no longer counts as free). Alone on its GPU, a process
    so plans for the whole GPU, as before."""
    room, why = total_bytes, []
    if fraction < 1:
        room = total_bytes * fraction
        why.append(f"its per-process memory fraction {fraction:g}")
    if free_bytes is not None:
        left = free_bytes + own_bytes + RESERVED_GIB * GIB
        if left < room:
            room = left
            held = total_bytes - free_bytes - own_bytes
            why.append(f"other processes and this one's CUDA context hold {readable_size(held)}")
    return room, " and ".join(why)


def gpu_room(device: torch.device, world_size: int) -> tuple[float, str]:
    """:func:`gpu_room_bytes` of this process's CUDA ``device``, as torch and the driver report
    it, and the smallest over the run's ``world_size`` ranks (every rank must choose the same
    offloads); the reason is this rank's own. "cuda" is the current GPU (an index is needed)."""
    import torch

    index = torch.cuda.current_device() if device.index is None else device.index
    free, total = torch.cuda.mem_get_info(index)
    room, why = gpu_room_bytes(
        total, fraction=torch.cuda.get_per_process_memory_fraction(index), free_bytes=free,
        own_bytes=torch.cuda.memory_reserved(index),
    )  # fmt: skip
    if world_size > 1:
        smallest = torch.tensor([room], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(smallest, op=torch.distributed.ReduceOp.MIN)
        room = smallest.item()
    return room, why


def readable_size(nbytes: float) -> str:
    """``nbytes`` in GiB, or in MiB below one GiB."""
    return f"{nbytes / GIB:.1f} GiB" if nbytes >= GIB else f"{nbytes / 2**20:.1f} MiB"


def available_host_bytes() -> float | None:
    """What the kernel says a new allocation can still get without swapping (MemAvailable of
    /proc/meminfo), or None where there is no such file (not Linux)."""
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return float(line.split()[1]) * 1024  # reported in kB
    return None
