"""The process group and device of this rank, from torchrun's environment or for one process.

FSDP2 always needs a process group and a device mesh, even for one process; a single process
(no torchrun) gets an in-memory store of world size 1, so no port is opened. The process group
is the only global state mt keeps.

The ranks form one device mesh, built here: FSDP2 shards over all of them (``mesh``, one
dimension); with sequence parallelism, ``sequence_parallel_size`` consecutive ranks (the fastest
links: on one node) also form a group that computes each packed row together
(``sequence_group``). The train loop asks the context for groups and never builds its own.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

__all__ = ["DistContext", "barrier", "init_distributed", "shutdown_distributed"]


@dataclass(frozen=True)
class DistContext:
    """Who this process is in the job and where it computes."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh  # every rank: what FSDP2 shards over
    sequence_parallel_size: int = 1
    sequence_group: dist.ProcessGroup | None = None  # this rank's group when the size is > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes shared files (metrics, exports) and talks to the user."""
        return self.rank == 0

    @property
    def sequence_rank(self) -> int:
        """This rank's place in its sequence-parallel group: which part of each row it holds."""
        return self.rank % self.sequence_parallel_size

    @property
    def data_parallel_size(self) -> int:
        """How many groups take their own share of each batch."""
        return self.world_size // self.sequence_parallel_size


def _pick_device(local_rank: int, device: str) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was asked for, but torch sees no CUDA device")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(device)


def init_distributed(
    device: str = "auto", sequence_parallel_size: int = 1, timeout: timedelta | None = None
) -> DistContext:
    """Join the job torchrun started (RANK/WORLD_SIZE set) or start a one-process group.

    ``device`` is "auto" (CUDA when present, else CPU), "cuda" or "cpu". NCCL serves CUDA, gloo
    the CPU. ``sequence_parallel_size`` must divide the world size (ValueError otherwise, before
    any group is made). ``timeout`` bounds each collective's wait for the other ranks (NCCL's
    watchdog ends the process after it, gloo raises); None keeps PyTorch's default (10 minutes
    with NCCL, 30 with gloo).
    """
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if sequence_parallel_size < 1 or world_size % sequence_parallel_size:
        raise ValueError(
            f"{sequence_parallel_size} does not divide the {world_size} process(es) of this "
            f"run; choose a divisor of {world_size}, or start a multiple of "
            f"{sequence_parallel_size} processes"
        )
    target = _pick_device(local_rank, device)
    backend = "nccl" if target.type == "cuda" else "gloo"
    # the group is bound to this rank's GPU, so its collectives (barriers, those of torch's
    # distributed checkpoints) need not guess the device, and torch does not warn that it did
    device_id = target if backend == "nccl" else None
    if not dist.is_initialized():
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(
                backend, rank=rank, world_size=world_size, device_id=device_id, timeout=timeout
            )
        else:
            dist.init_process_group(
                backend, store=dist.HashStore(), rank=0, world_size=1, device_id=device_id
            )
    mesh = init_device_mesh(target.type, (dist.get_world_size(),))
    sequence_group = None
    if sequence_parallel_size > 1:
        # (data, sequence): ranks that differ only in the last coordinate are consecutive
        grid = init_device_mesh(
            target.type,
            (world_size // sequence_parallel_size, sequence_parallel_size),
            mesh_dim_names=("data", "sequence"),
        )
        sequence_group = grid["sequence"].get_group()
    return DistContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        device=target,
        mesh=mesh,
        sequence_parallel_size=sequence_parallel_size,
        sequence_group=sequence_group,
    )


def barrier() -> None:
    """Wait for every rank (nothing to wait for without a process group). On NCCL it names this
    rank's GPU, which a group made elsewhere may not be bound to: torch would take the current
    device and warn that it guessed."""
    if not dist.is_initialized():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def shutdown_distributed() -> None:
    """Leave the process group (a no-op when there is none)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_rank(status: int = 0) -> None:
    """End a finished rank of a multi-process CPU (gloo) run now, skipping interpreter teardown:
    gloo's threads can abort the process there ("terminate called without an active
    exception"), after all the work is done, and torchrun would report the run as failed. Call
    it once the run's files are written and closed; it returns (and does nothing) in a single
    process or on GPUs."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
