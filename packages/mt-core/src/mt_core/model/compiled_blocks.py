"""Regional compilation: each decoder block compiled, with the sizes that change from one
minibatch to the next dynamic from its first call.

Packed rows change length every minibatch, and the number of documents in them (the length of
``cu_seqlens``) changes too, but not every step. Left to torch.compile's automatic dynamic
shapes, each of the two recompiles the block the first time it changes: the second was seen
in the middle of a measured run (8B OSFT on one H200, step 4 of 6 at a third of the others'
speed, when a step first brought two minibatches). So the block's inputs are marked before the
compiler sees them: the token dimension (dim 1 in transformers' (batch, tokens, ...) layout) of
every tensor as long as the hidden states, and ``cu_seq_lens_q`` / ``cu_seq_lens_k``. The
other dimensions stay static: marking every dimension dynamic from the start, as
``dynamic=True`` does (the hidden size too), measured 12% slower (tools/bench/RESULTS.md).

The marks go on the tensors the compiled frame receives, in a forward pre-hook that runs after
FSDP2's: FSDP2's own pre-forward hook hands the block views of its inputs (the autograd function
that registers its post-backward hook), and a mark on the tensor it was given does not carry to
the view (the block compiled for the first row's length, then again at the second). The longest
document's length (``max_length_q`` / ``max_length_k``, ints the kernels take) changes too; an
int cannot be marked, so its source is named dynamic while the block is called
(``torch.compiler.config.dynamic_sources``, scoped to the call).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from mt_core.model.block_calls import call_around

__all__ = ["compile_blocks"]

TOKEN_DIM = 1  # transformers' (batch, tokens, ...) layout
_SEGMENT_STARTS = ("cu_seq_lens_q", "cu_seq_lens_k")
# dynamo's names for the block's keyword arguments max_length_q and max_length_k
_LONGEST_DOCUMENT = "L['kwargs']['max_length_q'],L['kwargs']['max_length_k']"
# Inductor's coordinate descent: each generated GPU kernel's block sizes and warps are tuned by
# timing their neighbours, once, when the kernel is compiled. It pays for FP8's scaling kernels
# (the absolute maximum, then the cast, of each product's inputs and output gradients, all
# memory-bound): Llama-3.1-8B shape with 8 blocks on one H100, FP8 tokens/s +1.9%; bfloat16's
# kernels gained nothing to measure (+0.2%) for 15 s more compilation (tools/bench/RESULTS.md,
# issue #29). A CPU's kernels are not tuned.
TUNED = {"coordinate_descent_tuning": True}


def _tensors(values: Iterable[Any]) -> Iterator[torch.Tensor]:
    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (tuple, list)):  # position_embeddings: (cos, sin)
            yield from _tensors(value)


@torch.compiler.disable  # the marks advise the compiler: they are made before it traces
def _mark_varying_sizes(block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Mark what changes between minibatches dynamic (see the module docstring). A size the
    compiler must specialize anyway (0 or 1) stays static: the marks only advise."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    if isinstance(hidden, torch.Tensor) and hidden.dim() > TOKEN_DIM:
        tokens = hidden.size(TOKEN_DIM)
        for tensor in _tensors([*args, *kwargs.values()]):
            if tensor.dim() > TOKEN_DIM and tensor.size(TOKEN_DIM) == tokens:
                torch._dynamo.maybe_mark_dynamic(tensor, TOKEN_DIM)
    for name in _SEGMENT_STARTS:
        if isinstance(kwargs.get(name), torch.Tensor):
            torch._dynamo.maybe_mark_dynamic(kwargs[name], 0)


def _longest_document_dynamic(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    with torch.compiler.config.patch(dynamic_sources=_LONGEST_DOCUMENT):
        return call(*args, **kwargs)


def compile_blocks(
    blocks: Iterable[nn.Module], backend: str = "inductor", tune_kernels: bool = False
) -> None:
    """Compile each block (the same code for every layer, so one graph is reused), its
    changing sizes dynamic from the first call; FSDP2's hooks stay outside the graphs. The
    marking hook is appended: FSDP2 prepends its own, so it runs first whenever it is added.
    ``tune_kernels``: inductor times each generated kernel's launch settings (:data:`TUNED`),
    except in its deterministic mode (the key ``deterministic``), where the winner of a timing
    could sum a reduction in another order from one run to the next."""
    import torch._inductor.config as inductor_config

    options = {"options": TUNED} if tune_kernels and not inductor_config.deterministic else {}
    for block in blocks:
        block.register_forward_pre_hook(_mark_varying_sizes, with_kwargs=True)
        call_around(block, "longest document dynamic", _longest_document_dynamic)
        block.compile(backend=backend, **options)
