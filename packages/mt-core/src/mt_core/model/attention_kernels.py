"""The varlen kernels behind mt's padding-free attention backends, and the checks every call passes.

:mod:`mt_core.model.attention` registers these attention functions (transformers' signature) and
decides which one runs; this module imports nothing of mt's, so the arrows point one way:

* :func:`torch_varlen_function`: PyTorch's built-in ``torch.nn.attention.varlen.varlen_attn``;
* :func:`flash_attn_varlen`: flash-attn 2's ``flash_attn.flash_attn_varlen_func``;
* :func:`flash_attn_4_varlen`: flash-attn-4's kernels (CuTe DSL, Hopper and Blackwell) as the torch
  ops ``mt::flash_attn_4_forward`` and ``mt::flash_attn_4_backward``; alone of the three it also
  computes attention sinks and softcapping.

Each kernel is imported inside its function, so this module imports without any of them (the
two ops are defined on import; what they call is imported when they run).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch

__all__ = [
    "AttentionOutput",
    "check_call",
    "flash_attn_4_varlen",
    "flash_attn_varlen",
    "torch_varlen_function",
]

AttentionOutput = tuple[torch.Tensor, None]

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def check_call(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float,
    kwargs: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Checks one call and returns ``cu_seq_lens_q``, ``cu_seq_lens_k``, ``max_length_q/k``.

    The max lengths come back as Python ints: flash-attn-4's CuTe DSL refuses a tensor there, and
    the other kernels take ints too.
    """
    cu_q = kwargs.get("cu_seq_lens_q")
    if cu_q is None:
        raise ValueError(
            "padding-free attention needs cu_seq_lens_q, cu_seq_lens_k, max_length_q and "
            "max_length_k in the model call (one packed row); for padded batches or generation "
            "switch back with model.set_attn_implementation('sdpa')"
        )
    cu_k = kwargs.get("cu_seq_lens_k")
    cu_k = cu_q if cu_k is None else cu_k
    max_q = kwargs.get("max_length_q")
    max_k = kwargs.get("max_length_k")
    if max_q is None or max_k is None:
        raise ValueError("padding-free attention needs max_length_q and max_length_k (ints)")
    if query.shape[0] != 1:
        raise ValueError(
            f"padding-free attention takes one packed row, not a batch of {query.shape[0]}"
        )
    if key.shape[2] != query.shape[2]:
        raise ValueError(
            "padding-free attention is for training (no KV cache): call the model with use_cache=False"
        )
    if attention_mask is not None:
        raise ValueError(
            "padding-free attention takes no attention_mask: documents are given by cu_seq_lens"
        )
    if not getattr(module, "is_causal", True):
        raise ValueError(
            f"{type(module).__name__} attends bidirectionally; padding-free attention is causal"
        )
    if dropout > 0:
        raise ValueError(
            f"padding-free attention has no attention dropout (got {dropout}); set the model "
            "config's attention_dropout to 0"
        )
    return cu_q, cu_k, int(max_q), int(max_k)


def _refuse_softcap_and_sinks(backend: str, kwargs: dict[str, Any]) -> None:
    """torch varlen and flash-attn 2 (as mt calls it) compute neither: refuse rather than ignore."""
    if kwargs.get("softcap") is not None:
        raise ValueError(
            f"attn_backend={backend!r} does not compute attention softcapping (used by this "
            "model's attention); use attn_backend='flash_attn_4' (Hopper or Blackwell) or 'sdpa'"
        )
    if kwargs.get("s_aux") is not None:
        raise ValueError(
            f"attn_backend={backend!r} cannot compute attention sinks (s_aux, used by this "
            "model's attention); use attn_backend='flash_attn_4' (Hopper or Blackwell) or 'sdpa'"
        )


def _kernel_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The half dtype the varlen kernels run in.

    Under autocast HF's RoPE returns float32 q/k while v is already half: take the half dtype
    present, else autocast's, else bfloat16 (a float32 model on GPU attends in bf16, as HF's own
    flash-attention path does).
    """
    for tensor in tensors:
        if tensor.dtype in _HALF_DTYPES:
            return tensor.dtype
    if torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
        if dtype in _HALF_DTYPES:
            return dtype
    return torch.bfloat16


def _varlen_layout(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(1, heads, T, d) -> (T, heads, d) in the kernels' half dtype."""
    dtype = _kernel_dtype(query, key, value)

    def packed(t: torch.Tensor) -> torch.Tensor:
        return t[0].transpose(0, 1).to(dtype)

    return packed(query), packed(key), packed(value)


def _deterministic_option() -> dict[str, bool]:
    """``deterministic=True`` for the flash-attn kernels' backward where torch's deterministic
    algorithms are on (:mod:`mt_core.model.determinism`); else nothing, their own default."""
    return {"deterministic": True} if torch.are_deterministic_algorithms_enabled() else {}


def _window(sliding_window: int | None, max_k: int) -> int | None:
    """How many keys before the query one query sees (None: all of them, plain causal).
    HF's ``sliding_window`` counts the query itself; a window as long as every document is
    no window at all (it lets torch pick cuDNN, which takes no other window)."""
    if sliding_window is None or max_k <= sliding_window:
        return None
    return sliding_window - 1


def torch_varlen_function() -> Callable[..., AttentionOutput]:
    """``_torch_varlen`` with what this torch's ``varlen_attn`` takes decided now, at
    registration: inside a compiled block a call to a cached helper makes dynamo warn."""
    from torch.nn.attention.varlen import varlen_attn

    # torch 2.11 takes fewer K/V heads as they are; later versions want enable_gqa=True for that.
    takes_enable_gqa = "enable_gqa" in inspect.signature(varlen_attn).parameters
    return functools.partial(_torch_varlen, takes_enable_gqa=takes_enable_gqa)


def _torch_varlen(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    *,
    takes_enable_gqa: bool,
    **kwargs: Any,
) -> AttentionOutput:
    """PyTorch's built-in varlen flash attention (torch >= 2.11, CUDA)."""
    from torch.nn.attention.varlen import varlen_attn

    cu_q, cu_k, max_q, max_k = check_call(module, query, key, attention_mask, dropout, kwargs)
    _refuse_softcap_and_sinks("torch_varlen", kwargs)
    q, k, v = _varlen_layout(query, key, value)
    extra = {"enable_gqa": True} if takes_enable_gqa and k.shape[1] != q.shape[1] else {}
    left = _window(sliding_window, max_k)
    out = varlen_attn(
        q, k, v, cu_q, cu_k, max_q, max_k, scale=scaling,
        window_size=(-1 if left is None else left, 0), **extra,
    )  # fmt: skip
    return out.to(query.dtype).unsqueeze(0), None


def flash_attn_varlen(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> AttentionOutput:
    """flash-attn 2's ``flash_attn_varlen_func`` (GQA native); its backward is deterministic
    where torch's deterministic algorithms are on (:mod:`mt_core.model.determinism`)."""
    from flash_attn import flash_attn_varlen_func

    cu_q, cu_k, max_q, max_k = check_call(module, query, key, attention_mask, dropout, kwargs)
    _refuse_softcap_and_sinks("flash_attn", kwargs)
    q, k, v = _varlen_layout(query, key, value)
    left = _window(sliding_window, max_k)
    out = flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scaling, causal=True,
        window_size=(-1 if left is None else left, 0), **_deterministic_option(),
    )  # fmt: skip
    return out.to(query.dtype).unsqueeze(0), None


def flash_attn_4_varlen(
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
    """flash-attn-4's varlen attention (GQA native), with the model's attention sinks (GPT-OSS's
    ``s_aux``: one logit per head, unscaled, as the kernel's ``learnable_sink`` takes it, gradient
    included) and logit softcapping (Gemma 2's), as one torch op (:func:`_fa4_forward`)."""
    cu_q, cu_k, max_q, max_k = check_call(module, query, key, attention_mask, dropout, kwargs)
    # contiguous (tokens, heads, dim): inside a compiled block the copy is the same kernel as
    # the transpose and cast before it, and the kernel's loads are then plain rows
    q, k, v = (t.contiguous() for t in _varlen_layout(query, key, value))
    out, _ = torch.ops.mt.flash_attn_4_forward(
        q, k, v, cu_q, cu_k, max_q, max_k, scaling, _window(sliding_window, max_k),
        0.0 if softcap is None else float(softcap), s_aux,
    )  # fmt: skip
    return out.to(query.dtype).unsqueeze(0), None


# flash-attn-4 is plain Python around CuTe DSL kernels, which dynamo cannot trace. As a torch op
# with a shape function (register_fake) and a backward (register_autograd), a compiled block
# keeps it inside its one graph: no graph break, and the compiler's memory planning and the
# activation budget see its saved tensors. Its private _flash_attn_fwd/_flash_attn_bwd are the
# two halves of its own autograd function (flash-attn-4 4.0.0b36), called by keyword. The ops
# are not tied to CUDA: mt_core.model.attention refuses flash_attn_4 elsewhere, and a CPU stand-in
# for flash-attn-4 runs them in the tests.
@torch.library.custom_op("mt::flash_attn_4_forward", mutates_args=())
def _fa4_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    max_q: int,
    max_k: int,
    scaling: float | None,
    left: int | None,
    softcap: float,
    sinks: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal varlen attention of packed ``q, k, v`` (tokens, heads, dim): the output and the
    log-sum-exp of each query's scores, (heads, tokens) float32, that the backward needs. A left
    window of None is unbounded."""
    from flash_attn.cute.interface import _flash_attn_fwd

    out, lse, *_ = _flash_attn_fwd(
        q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k,
        softmax_scale=scaling, causal=True, window_size_left=left,
        window_size_right=0 if left is not None else None, learnable_sink=sinks,
        softcap=softcap, return_lse=True,
    )  # fmt: skip
    return out, lse


@_fa4_forward.register_fake
def _(q, k, v, cu_q, cu_k, max_q, max_k, scaling, left, softcap, sinks):
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    return out, q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("mt::flash_attn_4_backward", mutates_args=())
def _fa4_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    max_q: int,
    max_k: int,
    scaling: float | None,
    left: int | None,
    softcap: float,
    sinks: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of q, k, v and the sinks (an empty tensor when there are none). Under
    torch's deterministic algorithms (:mod:`mt_core.model.determinism`) the kernel's own
    deterministic mode: the query gradient's blocks are added in a fixed order, not by atomics
    as they finish (read here, when the op runs: a compiled block does not trace into it)."""
    from flash_attn.cute.interface import _flash_attn_bwd

    grads = _flash_attn_bwd(
        q, k, v, out, dout, lse, softmax_scale=scaling, causal=True, softcap=softcap,
        window_size_left=left, window_size_right=0 if left is not None else None,
        cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k,
        learnable_sink=sinks, **_deterministic_option(),
    )  # fmt: skip
    dq, dk, dv = grads[:3]
    return dq, dk, dv, grads[3] if sinks is not None else q.new_empty(0)


@_fa4_backward.register_fake
def _(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scaling, left, softcap, sinks):
    dsinks = torch.empty_like(sinks) if sinks is not None else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dsinks


def _fa4_save(ctx: Any, inputs: tuple, output: tuple) -> None:
    q, k, v, cu_q, cu_k, max_q, max_k, scaling, left, softcap, sinks = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_q, cu_k, sinks)
    ctx.scalars = (max_q, max_k, scaling, left, softcap)


def _fa4_gradients(ctx: Any, dout: torch.Tensor, _dlse: torch.Tensor | None) -> tuple:
    q, k, v, out, lse, cu_q, cu_k, sinks = ctx.saved_tensors
    dq, dk, dv, dsinks = torch.ops.mt.flash_attn_4_backward(
        dout.contiguous(), q, k, v, out, lse, cu_q, cu_k, *ctx.scalars, sinks
    )
    # one gradient per input of the forward: none for the lengths and scalars
    return (
        dq,
        dk,
        dv,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        dsinks if sinks is not None else None,
    )


_fa4_forward.register_autograd(_fa4_gradients, setup_context=_fa4_save)
