"""Activation offloading: what each decoder block saves for its backward pass waits in host memory,
so that the GPU holds the saved activations of about two blocks instead of every block's.

The tensors come through autograd's ``saved_tensors_hooks``, set around each block's call: what
eager ops save, and what a compiled block saves (one autograd.Function: the partitioner's choice),
and, under activation checkpointing, the block's input (all that checkpointing keeps). The
hooks are set outside the block's compiled code, FSDP2's hooks and the checkpoint
(:func:`mt_core.model.block_calls.call_around`): the module tree, its names and the state dict
stay as they are. A checkpoint's recomputation in backward does not go through that call again
(HF's checkpoint calls the block's forward, or nn.Module's call beneath the subclass), so what it
recomputes stays on the GPU for the moment it is needed, as it should.

On a GPU every copy runs on one side stream, and the compute stream waits only where it must:

* forward of block i: each saved tensor that is worth it (on the compute device, at least
  ``min_bytes``, not a parameter, not a tensor every block is given such as the rotary cos/sin)
  is copied to pinned host memory as soon as it is saved. When block i + 2 starts, the compute
  stream waits for block i's copies (long done, unless the copies are slower than the compute)
  and only then are block i's GPU tensors let go: freed in the compute stream's order, their
  memory is reused at once and safely. So at most the running block and the one before it hold
  GPU memory.
* The last block is not offloaded: the backward pass needs it first. The block before it is
  still in flight when the backward pass starts and is used where it is.
* backward of block i: its tensors came back while block i + 1's backward pass ran; block
  i - 1's fetch starts now, and the compute stream waits for block i's fetch before it reads it.
  Autograd frees each fetched tensor once the backward pass is done with it.

Without CUDA the same bookkeeping runs with plain synchronous copies (no pinning, no streams), so
that it can be tested on a CPU: each fetched tensor is a fresh copy of its host copy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from mt_core.model.block_calls import call_around

__all__ = ["MIN_BYTES", "ActivationOffload"]

# Smaller tensors (a norm's per-token scale, 4 bytes a token) stay on the GPU: a copy of them
# costs a launch and an event for next to no memory.
MIN_BYTES = 2**20


@dataclass(eq=False)
class _HostCopy:
    """One span of memory that a block saved, in host memory; every saved view of it shares it."""

    host: torch.Tensor  # flat, in the saved tensor's dtype
    # on the compute device: the original until it is let go (or kept for the backward pass), then
    # the copy fetched for the backward pass
    device: torch.Tensor | None
    ready: torch.cuda.Event | None = None  # the end of the fetch (None: nothing to wait for)


@dataclass(frozen=True, eq=False)
class _Saved:
    """What autograd keeps in place of an offloaded tensor: its span and how to view it."""

    copy: _HostCopy
    block: int
    size: torch.Size
    stride: tuple[int, ...]


def _span(tensor: torch.Tensor) -> int:
    """Elements from the tensor's first to its last in its storage (the flat span a copy takes,
    so that the view, strides included, is rebuilt exactly: some kernels choose by layout)."""
    if tensor.numel() == 0:
        return 0
    return 1 + sum(
        (size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True)
    )


def _storages(values: Sequence[Any]) -> set[int]:
    """The storages of the tensors among ``values`` (one level of tuples and lists: HF passes the
    rotary cos and sin as a pair)."""
    found = set()
    for value in values:
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, torch.Tensor):
                found.add(item.untyped_storage().data_ptr())
    return found


class ActivationOffload:
    """Offloads the activations that the decoder blocks of one model save (see the module's
    docstring). :meth:`install` puts it on the blocks; it then counts what it moves:
    ``block_bytes`` (sent to host memory by each block in the last forward pass), ``pass_bytes``
    (their sum), ``largest_pass_bytes`` and ``fetched_bytes`` (brought back in the last
    backward pass)."""

    def __init__(self, device: torch.device, min_bytes: int = MIN_BYTES) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # as tensors name theirs
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.min_bytes = min_bytes
        self._side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._last = -1  # the last block's index: it is not offloaded
        self._previous = -1  # the block that ran last (a block at or before it starts a pass)
        self.block_bytes: list[int] = []
        self.largest_pass_bytes = 0
        self.fetched_bytes = 0
        self._spans: dict[tuple, _HostCopy] = {}  # the running block's copies, by span
        self._sent: dict[int, list[_HostCopy]] = {}  # by block: copies not yet fetched
        self._in_flight: list[tuple[int, torch.cuda.Event | None]] = []  # blocks whose
        # originals are still held, with the end of their copies
        self._fetched: list[tuple[int, list[_HostCopy]]] = []  # by block: copies brought back
        self._backward_started = False

    @property
    def pass_bytes(self) -> int:
        return sum(self.block_bytes)

    def install(self, blocks: Sequence[nn.Module]) -> None:
        """Offload what ``blocks`` (the decoder blocks, in the order they run) save."""
        self._last = len(blocks) - 1
        self.block_bytes = [0] * len(blocks)
        for index, block in enumerate(blocks):
            call_around(block, "activation offload", partial(self._run_block, index))

    # ---- forward ---------------------------------------------------------------------------------

    def _run_block(self, index: int, call: Callable, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():  # nothing is saved for a backward pass
            return call(*args, **kwargs)
        if index <= self._previous:
            self._new_pass()
        self._previous = index
        self._let_go(before=index - 1)
        if index == self._last:
            return call(*args, **kwargs)
        # Tensors every block is given (rotary cos/sin, positions) stay alive on the GPU anyway.
        hidden = args[0] if args else kwargs.get("hidden_states")
        shared = _storages([*args[1:], *(v for v in kwargs.values() if v is not hidden)])
        hooks = torch.autograd.graph.saved_tensors_hooks(
            partial(self._pack, index, shared), self._unpack
        )
        try:
            with hooks:
                return call(*args, **kwargs)
        finally:
            self._spans.clear()  # the originals stay held by their copies until let go
            self._in_flight.append((index, self._record()))

    def _new_pass(self) -> None:
        self._let_go(before=len(self.block_bytes))
        self._drop_fetched(reached=-1)
        self._sent.clear()
        self.block_bytes = [0] * len(self.block_bytes)
        self.fetched_bytes = 0
        self._backward_started = False

    def _worth_offloading(self, tensor: torch.Tensor, shared: set[int]) -> bool:
        base = tensor._base if tensor._base is not None else tensor
        return (
            type(tensor) is torch.Tensor  # not a parameter, nor a subclass with its own storage
            and tensor.layout == torch.strided
            and tensor.device == self.device
            and _span(tensor) * tensor.element_size() >= max(self.min_bytes, 1)
            # a parameter's view (a transposed weight) is FSDP's to free and gather again
            and not isinstance(base, nn.Parameter)
            and tensor.untyped_storage().data_ptr() not in shared
        )

    def _pack(self, index: int, shared: set[int], tensor: torch.Tensor) -> Any:
        if not self._worth_offloading(tensor, shared):
            return tensor
        flat = tensor.as_strided((_span(tensor),), (1,), tensor.storage_offset())
        key = (flat.data_ptr(), flat.numel(), flat.dtype)  # q, k and v projections save one input
        copy = self._spans.get(key)
        if copy is None:
            copy = self._spans[key] = self._send(flat)
            self._sent.setdefault(index, []).append(copy)
            self.block_bytes[index] += flat.nbytes
            self.largest_pass_bytes = max(self.largest_pass_bytes, self.pass_bytes)
        return _Saved(copy, index, tensor.size(), tensor.stride())

    def _send(self, flat: torch.Tensor) -> _HostCopy:
        host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=self._side is not None)
        if self._side is not None:  # the side stream copies what the compute stream has written
            self._side.wait_stream(torch.cuda.current_stream(self.device))
        with self._on_side():
            host.copy_(flat, non_blocking=True)
        return _HostCopy(host, device=flat)

    def _let_go(self, before: int) -> None:
        """Drop the originals of the blocks before ``before`` once their copies are done."""
        kept = []
        for block, copied in self._in_flight:
            if block >= before:
                kept.append((block, copied))
                continue
            self._wait(copied)
            for copy in self._sent.get(block, ()):
                copy.device = None
        self._in_flight = kept

    # ---- backward --------------------------------------------------------------------------------

    def _unpack(self, packed: Any) -> torch.Tensor:
        if not isinstance(packed, _Saved):
            return packed
        if not self._backward_started:
            self._keep_in_flight()
        self._drop_fetched(reached=packed.block)
        self._fetch(packed.block)  # usually on its way already
        self._fetch(packed.block - 1)  # the next block in backward order, while this one computes
        copy = packed.copy
        if copy.device is None:  # saved by a pass before the last (a graph kept across passes)
            self._bring_back([copy])
        self._wait(copy.ready)
        return copy.device.as_strided(packed.size, packed.stride)

    def _keep_in_flight(self) -> None:
        """At the start of the backward pass: blocks still in flight are used where they are (once
        their copies are done, so that their memory can be freed in the compute stream's order)."""
        self._backward_started = True
        for _, copied in self._in_flight:
            self._wait(copied)
        self._in_flight = []

    def _fetch(self, block: int) -> None:
        # (copies whose originals were kept for the backward pass need no fetch)
        copies = [copy for copy in self._sent.pop(block, ()) if copy.device is None]
        if copies:
            self._bring_back(copies)
            self._fetched.append((block, copies))

    def _drop_fetched(self, reached: int) -> None:
        """The backward pass has reached block ``reached``: the compute stream waits for the fetch
        of it (and of any block after it), and from then on autograd alone holds those copies and
        frees each once it is no longer needed, in the compute stream's order. Held until then, a
        copy that autograd let go unread cannot be freed while the side stream still writes it."""
        kept = []
        for block, copies in self._fetched:
            if block >= reached:
                self._wait(copies[0].ready)  # one fetch, one event, for all of a block's copies
            else:
                kept.append((block, copies))
        self._fetched = kept

    def _bring_back(self, copies: list[_HostCopy]) -> None:
        # Allocated on the compute stream, which frees them in its own order; the side stream
        # writes them once the compute stream is done with what that memory held before.
        if self._side is not None:
            self._side.wait_stream(torch.cuda.current_stream(self.device))
        for copy in copies:
            copy.device = torch.empty_like(copy.host, device=self.device)
        with self._on_side():
            for copy in copies:
                copy.device.copy_(copy.host, non_blocking=True)
            ready = self._record()
        for copy in copies:
            copy.ready = ready
            self.fetched_bytes += copy.host.nbytes

    # ---- streams (no-ops without CUDA) -----------------------------------------------------------

    def _on_side(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if self._side is None else torch.cuda.stream(self._side)

    def _record(self) -> torch.cuda.Event | None:
        return None if self._side is None else self._side.record_event()

    def _wait(self, event: torch.cuda.Event | None) -> None:
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
