"""The process group and device of this rank, from torchrun's environment or for one process.

FSDP2 always needs a process group and a device mesh, even for one process; a single process
(no torchrun) gets an in-memory store of world size 1, so no port is opened. The process group
is the only global state mt keeps.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

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
    mesh: DeviceMesh

    @property
    def is_main(self) -> bool:
        """Rank 0 writes shared files (metrics, exports) and talks to the user."""
        return self.rank == 0


def _pick_device(local_rank: int, device: str) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was asked for, but torch sees no CUDA device")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(device)


def init_distributed(device: str = "auto") -> DistContext:
    """Join the job torchrun started (RANK/WORLD_SIZE set) or start a one-process group.

    ``device`` is "auto" (CUDA when present, else CPU), "cuda" or "cpu". NCCL serves CUDA, gloo
    the CPU.
    """
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    target = _pick_device(local_rank, device)
    backend = "nccl" if target.type == "cuda" else "gloo"
    # the group is bound to this rank's GPU, so its collectives (barriers, those of torch's
    # distributed checkpoints) need not guess the device, and torch does not warn that it did
    device_id = target if backend == "nccl" else None
    if not dist.is_initialized():
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, rank=rank, world_size=world_size, device_id=device_id)
        else:
            dist.init_process_group(
                backend, store=dist.HashStore(), rank=0, world_size=1, device_id=device_id
            )
    mesh = init_device_mesh(target.type, (dist.get_world_size(),))
    return DistContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        device=target,
        mesh=mesh,
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
