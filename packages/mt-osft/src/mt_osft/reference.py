"""Where each target's original weight W0 lives, and how it reaches the weight projection.

W0 is read once a step, by the weight projection after the optimizer step, and nowhere else in
training; it is one copy of every projected matrix (13 GiB for Llama-3.1-8B in bfloat16). With
``OSFTConfig.reference_on_host`` it waits in host memory (pinned where CUDA is there, so the copy
is asynchronous) and each target's W0 is copied to the GPU on a side stream one target ahead of
its projection: the copy of the next overlaps the projection of this one, and at most three of
them are on the GPU at once. The values are the same bits either way.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch
from torch.distributed.tensor import DTensor

if TYPE_CHECKING:
    from mt_osft.state import OSFTTarget

__all__ = ["device_references", "local_part", "on_device", "to_host"]


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` moved to host memory, pinned when CUDA is available; a DTensor keeps its mesh
    and placements with its local shard on the host (as FSDP2's CPU offload keeps parameters),
    so a distributed checkpoint still saves one shard per rank.

    The DTensor is made from its spec, not by ``DTensor.from_local``: that one moves a local
    tensor to the device type of its mesh, so on GPUs every W0 went back to the GPU (13 GiB at
    8B, found at the peak of a measured run by tools/gpu/memory_peak.py)."""

    def host(local: torch.Tensor) -> torch.Tensor:
        moved = local.detach().to("cpu", copy=local.device.type == "cpu")
        return moved.pin_memory() if torch.cuda.is_available() else moved

    if isinstance(tensor, DTensor):
        return DTensor(host(tensor.to_local()), tensor._spec, requires_grad=False)
    return host(tensor)


def on_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` (a DTensor, or a plain one) as a full plain tensor on ``device``; every rank
    must call it for a sharded one (it gathers)."""
    if not isinstance(tensor, DTensor):
        return tensor.to(device)
    local = tensor.to_local()
    if local.device != device:  # host shards: gather them where the mesh communicates
        tensor = DTensor.from_local(local.to(device), tensor.device_mesh, tensor.placements,
                                    run_check=False, shape=tensor.shape, stride=tensor.stride())  # fmt: skip
    return tensor.full_tensor()


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``tensor``: a DTensor's local shard, or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def device_references(
    targets: Iterable[OSFTTarget],
) -> Iterator[tuple[OSFTTarget, torch.Tensor]]:
    """Each target with its W0 (this rank's rows) on its weight's device, in order. W0 kept
    beside the weight is handed out as it is; W0 in host memory is copied, on CUDA one target
    ahead on a side stream."""
    targets = list(targets)
    if not targets:
        return
    device = local_part(targets[0].weight).device
    if device.type != "cuda" or all(local_part(t.ref).device == device for t in targets):
        for target in targets:
            yield target, local_part(target.ref).to(device)
        return
    compute = torch.cuda.current_stream(device)
    copier = torch.cuda.Stream(device)

    def start(target: OSFTTarget) -> tuple[torch.Tensor, torch.cuda.Event]:
        with torch.cuda.stream(copier):
            ref = local_part(target.ref).to(device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(copier)
        return ref, done

    # The host runs ahead of the GPU: left alone it would enqueue every copy at once, each in a
    # buffer of its own (record_stream keeps a buffer until the projection that reads it has
    # run), i.e. all of W0 on the GPU. So the copy of target i + 1 starts once the projection of
    # target i - 1 has run: it overlaps the projection of target i, and at most three buffers
    # are alive.
    pending, previous = start(targets[0]), None
    for index, target in enumerate(targets):
        ref, done = pending
        compute.wait_event(done)
        ref.record_stream(compute)  # its memory is reused only after the projection ran
        yield target, ref
        projected = torch.cuda.Event()
        projected.record(compute)
        del ref
        if index + 1 < len(targets):
            if previous is not None:
                previous.synchronize()
            pending = start(targets[index + 1])
        previous = projected
