"""Where OSFT's tensors live, and how they reach the projections.

The projections run on the device the weights' mesh computes on (the GPU of each rank). Two kinds
of tensor may wait in host memory instead:

* W0, with ``OSFTConfig.reference_on_host``: one copy of every projected matrix (13 GiB for
  Llama-3.1-8B in bfloat16), read once a step, by the weight projection;
* everything a projection reads or writes, under FSDP2's CPU offload (mt's ``cpu_offload``):
  the weight and gradient shards, W0 and the bases. The optimizer step then runs on the CPU, but
  the projections do not: they are 93 TFLOP a step at 8B, 1.2 s on an H200 with float32 weights
  (tools/bench/RESULTS.md), about a minute at the one to two TFLOP/s of a host's cores; nor can
  NCCL sum their products across ranks in host memory.

:func:`staged` hands each target's tensors to its projection on the GPU: those in host memory are
copied there on a side stream one target ahead (the copy of the next overlaps the projection of
this one, and at most three targets' copies are on the GPU at once), and what the projection
writes back to host memory is complete when the loop ends. The values are the same bits either
way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

import torch
from torch.distributed.tensor import DTensor

__all__ = ["compute_device", "gathered", "local_part", "offloaded", "staged", "to_host", "whole"]

T = TypeVar("T")


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``tensor``: a DTensor's local shard, or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def compute_device(tensor: torch.Tensor) -> torch.device:
    """Where ``tensor``'s projections run: the device type of a DTensor's mesh (the current
    device of that type: one GPU per rank), else the tensor's own device."""
    if isinstance(tensor, DTensor):
        return torch.device(tensor.device_mesh.device_type)
    return tensor.device


def offloaded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor whose local shard waits in host memory while its mesh
    computes elsewhere (FSDP2's CPU offload keeps parameters and gradients so)."""
    return local_part(tensor).device.type != compute_device(tensor).type


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


def whole(local: torch.Tensor, like: DTensor) -> torch.Tensor:
    """The whole tensor of which ``local`` (on the mesh's device) is this rank's part, laid out
    as ``like``; every rank must call it (it gathers)."""
    return DTensor.from_local(
        local, like.device_mesh, like.placements, run_check=False, shape=like.shape,
        stride=like.stride(),
    ).full_tensor()  # fmt: skip


def gathered(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` whole, a plain tensor on its :func:`compute_device`: a DTensor is gathered
    there, also where its shards wait in host memory (every rank must call it then)."""
    if not isinstance(tensor, DTensor):
        return tensor
    return whole(tensor.to_local().to(compute_device(tensor)), tensor)


def staged(
    targets: Iterable[T], parts: Callable[[T], Sequence[torch.Tensor]], device: torch.device
) -> Iterator[tuple[T, list[torch.Tensor]]]:
    """Each target with ``parts(target)`` (plain tensors, or DTensors: their local shards) on
    ``device``, in order. A part already there is handed out as it is; one in host memory is
    copied, on CUDA one target ahead on a side stream. The first part is the one a projection
    writes: where it lives in host memory, what the caller copies back into it on the current
    stream is complete when the loop ends (else the loop does not wait for the GPU: the step's
    one host synchronisation stays where the trainer has it)."""
    targets = list(targets)
    local = [[local_part(part) for part in parts(target)] for target in targets]
    elsewhere = [[part.device.type != device.type for part in each] for each in local]
    if device.type != "cuda" or not any(map(any, elsewhere)):
        for target, each in zip(targets, local, strict=True):
            yield target, [part.to(device) for part in each]
        return
    compute = torch.cuda.current_stream()
    copier = torch.cuda.Stream()

    def start(index: int) -> tuple[list[torch.Tensor], torch.cuda.Event]:
        with torch.cuda.stream(copier):
            moved = [part.to(device, non_blocking=True) for part in local[index]]
            done = torch.cuda.Event()
            done.record(copier)
        return moved, done

    # The host runs ahead of the GPU: left alone it would enqueue every copy at once, each in a
    # buffer of its own (record_stream keeps a buffer until the projection that reads it has
    # run), i.e. every host tensor on the GPU. So the copies of target i + 1 start once the
    # projection of target i - 1 has run: they overlap the projection of target i, and at most
    # three targets' buffers are alive.
    pending, previous = start(0), None
    for index, target in enumerate(targets):
        moved, done = pending
        compute.wait_event(done)
        for part in moved:
            part.record_stream(compute)  # its memory is reused only after the projection ran
        yield target, moved
        projected = torch.cuda.Event()
        projected.record(compute)
        del moved
        if index + 1 < len(targets):
            if previous is not None:
                previous.synchronize()
            pending = start(index + 1)
        previous = projected
    if any(first for first, *_ in elsewhere):
        compute.synchronize()  # the host reads what the projections wrote back next
