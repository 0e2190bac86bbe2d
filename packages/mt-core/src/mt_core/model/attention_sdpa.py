"""The ``sdpa`` backend: causal ``scaled_dot_product_attention`` on each document of a packed row
in turn. Exact, slow, runs on any device (the CPU tests run it).

The documents' bounds are data (``cu_seq_lens_q``), which torch.compile cannot trace as numbers:
called as plain Python inside a compiled block, the loop over them would break the block's graph
and have the code after the break specialised on each row's count of documents (one more
compilation for each new count: most of the CPU tests' compile time). So it runs as one torch op,
``mt::sdpa_per_document``, with a shape function and a backward: a compiled block keeps one graph
around it, as it does around flash-attn-4's ops on a GPU. The backward recomputes the attention
of each document and differentiates it with ``torch.func.vjp`` (inside an op ``torch.autograd``
records nothing): the same operations as differentiating the forward directly, so the same
gradients, for one more forward pass of a slow backend; autograd keeps only the op's inputs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from mt_core.model.attention_kernels import AttentionOutput, check_call

__all__ = ["sdpa_per_document"]


def sdpa_per_document(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs: Any,
) -> AttentionOutput:
    """transformers' attention signature: (1, heads, tokens, d) in, (1, tokens, heads, d) out.
    With attention sinks (``s_aux``) or softcapping, plain tensor ops on the materialised scores."""
    cu_q, cu_k, _, _ = check_call(module, query, key, attention_mask, dropout, kwargs)
    out = torch.ops.mt.sdpa_per_document(
        query, key, value, cu_q, cu_k, scaling, sliding_window, softcap, s_aux
    )
    return out, None


def _bounds(cu_q: torch.Tensor, cu_k: torch.Tensor, tokens: int) -> list[int]:
    bounds = cu_q.tolist()
    if cu_k is not cu_q and cu_k.tolist() != bounds:
        raise ValueError("the sdpa backend needs the same documents for queries and keys")
    if bounds[0] != 0 or bounds[-1] != tokens:
        raise ValueError(
            f"cu_seq_lens_q covers tokens {bounds[0]}..{bounds[-1]}, the row has {tokens}"
        )
    return bounds


def _attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bounds: list[int],
    scaling: float | None,
    sliding_window: int | None,
    softcap: float | None,
    sinks: torch.Tensor | None,
) -> torch.Tensor:
    plain = sinks is None and softcap is None
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        length = end - start
        mask = None
        if (sliding_window is not None and length > sliding_window) or not plain:
            # transformers' sliding window: query i sees keys i - sliding_window < j <= i.
            i = torch.arange(length, device=query.device)[:, None]
            j = torch.arange(length, device=query.device)[None, :]
            mask = (j <= i) & (j > i - (sliding_window or length))
        q, k, v = (t[:, :, start:end] for t in (query, key, value))
        if plain:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, scale=scaling,
                enable_gqa=key.shape[1] != query.shape[1],
            )  # fmt: skip
        else:
            out = _materialised(q, k, v, mask, scaling, softcap, sinks)
        outputs.append(out)
    # HF attention functions return (batch, tokens, heads, head_dim)
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous().to(query.dtype)


def _materialised(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    scaling: float | None,
    softcap: float | None,
    sinks: torch.Tensor | None,
) -> torch.Tensor:
    """Attention of one document with what SDPA has no place for, on the document's materialised
    (heads, tokens, tokens) scores: logit softcapping (``softcap * tanh(scores / softcap)`` of
    the scaled scores, as Gemma 2) and sinks, one more logit per head in the softmax that
    attends to nothing (so a query may give little weight to every key)."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = query @ key.transpose(-1, -2) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is None:
        return torch.softmax(scores, dim=-1).to(value.dtype) @ value
    sink = sinks.to(scores.dtype).reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
    weights = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    return weights.to(value.dtype) @ value


@torch.library.custom_op("mt::sdpa_per_document", mutates_args=())
def _forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    scaling: float | None,
    sliding_window: int | None,
    softcap: float | None,
    sinks: torch.Tensor | None,
) -> torch.Tensor:
    bounds = _bounds(cu_q, cu_k, query.shape[2])
    return _attend(query, key, value, bounds, scaling, sliding_window, softcap, sinks)


@_forward.register_fake
def _(query, key, value, cu_q, cu_k, scaling, sliding_window, softcap, sinks):
    batch, heads, tokens, _ = query.shape
    return query.new_empty((batch, tokens, heads, value.shape[-1]))


@torch.library.custom_op("mt::sdpa_per_document_backward", mutates_args=())
def _backward(
    dout: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    scaling: float | None,
    sliding_window: int | None,
    softcap: float | None,
    sinks: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of query, key, value and the sinks (an empty tensor when there are none)."""
    bounds = _bounds(cu_q, cu_k, query.shape[2])

    def attend(*inputs: torch.Tensor) -> torch.Tensor:
        return _attend(*inputs[:3], bounds, scaling, sliding_window, softcap,
                       inputs[3] if sinks is not None else None)  # fmt: skip

    # torch.func, not torch.autograd: inside a torch op autograd records nothing
    inputs = (query, key, value) if sinks is None else (query, key, value, sinks)
    _, vjp = torch.func.vjp(attend, *inputs)
    # contiguous, as the shape function says (autograd's layout follows the inputs' strides)
    grads = [grad.contiguous() for grad in vjp(dout)]
    return grads[0], grads[1], grads[2], grads[3] if sinks is not None else query.new_empty(0)


@_backward.register_fake
def _(dout, query, key, value, cu_q, cu_k, scaling, sliding_window, softcap, sinks):
    dsinks = sinks.new_empty(sinks.shape) if sinks is not None else query.new_empty(0)
    return (
        query.new_empty(query.shape),
        key.new_empty(key.shape),
        value.new_empty(value.shape),
        dsinks,
    )


def _save(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    query, key, value, cu_q, cu_k, scaling, sliding_window, softcap, sinks = inputs
    ctx.save_for_backward(query, key, value, cu_q, cu_k, sinks)
    ctx.scalars = (scaling, sliding_window, softcap)


def _gradients(ctx: Any, dout: torch.Tensor) -> tuple:
    query, key, value, cu_q, cu_k, sinks = ctx.saved_tensors
    dq, dk, dv, dsinks = torch.ops.mt.sdpa_per_document_backward(
        dout, query, key, value, cu_q, cu_k, *ctx.scalars, sinks
    )
    # one gradient per input of the forward: none for the bounds and scalars
    return dq, dk, dv, None, None, None, None, None, dsinks if sinks is not None else None


_forward.register_autograd(_gradients, setup_context=_save)
