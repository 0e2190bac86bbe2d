"""Padding-free (varlen) attention for unmodified Hugging Face models.

A packed minibatch is one row of concatenated documents, described by ``cu_seqlens``. Each backend
below is registered in transformers' ``AttentionInterface`` under an ``mt_varlen_*`` name and
selected with ``model.set_attn_implementation(name)``; no modeling file is patched. The caller
passes ``cu_seq_lens_q/k`` and ``max_length_q/k`` to the model call and transformers forwards them,
untouched, to the attention function of every layer.

No ``AttentionMaskInterface`` entry is registered on purpose: for an implementation missing there,
``masking_utils`` returns ``None`` straight away (transformers 5.17 to 5.24), so no mask is built
and the position ids are not scanned for packed sequences (a GPU->CPU sync per forward). Each
function then insists on ``cu_seq_lens_q``, so a call without them (a padded batch, generation)
fails loudly instead of letting documents see each other.

Backends, all matching the model run on each document alone:

* ``flash_attn``: flash-attn 2's ``flash_attn.flash_attn_varlen_func`` (installed separately);
* ``torch_varlen``: PyTorch's built-in ``torch.nn.attention.varlen.varlen_attn`` (CUDA);
* ``sdpa``: ``scaled_dot_product_attention`` once per document; runs anywhere (CPU tests).
  It alone takes attention sinks (GPT-OSS's ``s_aux``: one more logit per head in each
  softmax, attending to nothing), computed per document in plain tensor ops; ``auto`` picks it
  for models with sinks, since neither varlen kernel has them.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel

from mt_core.stateful import run_stateful_layers_per_document

__all__ = [
    "ATTN_BACKENDS",
    "has_attention_sinks",
    "register_padding_free_attention",
    "resolve_attn_backend",
    "use_padding_free_attention",
]

ATTN_BACKENDS = ("auto", "flash_attn", "torch_varlen", "sdpa")

# transformers reads meaning into implementation names: one containing "flash" is sent to its
# flash-attention loader (and may fetch a kernel from the Hub), one containing "sdpa" may fall
# back to eager. These names contain neither.
_IMPLEMENTATION_NAMES = {
    "flash_attn": "mt_varlen_fa",
    "torch_varlen": "mt_varlen_torch",
    "sdpa": "mt_varlen_perdoc",
}
_HALF_DTYPES = (torch.float16, torch.bfloat16)

AttentionOutput = tuple[torch.Tensor, None]


def _flash_attn_problem() -> str | None:
    """Why flash-attn 2's ``flash_attn_varlen_func`` cannot be imported here, or None if it can.

    It is imported, as the forward will: a ``flash_attn`` package alone proves nothing, since
    flash-attn-4 installs ``flash_attn`` as a namespace holding only ``flash_attn.cute``, and
    flash-attn 2 loads its CUDA extension on import, which fails with ImportError or OSError
    when built for another torch or CUDA (or where there is none).
    """
    try:
        from flash_attn import flash_attn_varlen_func  # noqa: F401
    except (ImportError, OSError) as error:
        if isinstance(error, ModuleNotFoundError) and error.name == "flash_attn":
            return "it is not installed"
        if isinstance(error, ImportError) and _is_flash_attn_4_namespace():
            return "the flash_attn package found is flash-attn-4's namespace (only flash_attn.cute)"
        return f"it failed to import ({type(error).__name__}: {error})"
    return None


def _is_flash_attn_4_namespace() -> bool:
    """Whether ``flash_attn`` is a namespace package (no ``__init__.py``) with a ``cute`` folder:
    read from its spec, so a broken ``__init__`` is not run again."""
    spec = importlib.util.find_spec("flash_attn")
    if spec is None or spec.origin is not None:  # a namespace package has no origin
        return False
    return any(Path(folder, "cute").is_dir() for folder in spec.submodule_search_locations or ())


def _torch_varlen_present() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def has_attention_sinks(model: torch.nn.Module) -> bool:
    """Whether ``model``'s attention has sinks (a ``sinks`` parameter per layer, as GPT-OSS)."""
    return any(isinstance(getattr(m, "sinks", None), torch.nn.Parameter) for m in model.modules())


def resolve_attn_backend(name: str, device: torch.device, *, sinks: bool = False) -> str:
    """The concrete backend for ``name`` (one of :data:`ATTN_BACKENDS`) on ``device``.

    ``auto`` picks ``flash_attn`` when flash-attn 2's function imports and ``device`` is CUDA,
    else ``torch_varlen`` on CUDA when this torch's ``varlen_attn`` imports, else ``sdpa``;
    and always ``sdpa`` for a model with attention ``sinks``, which only it computes.
    An explicit choice that cannot run here raises ValueError saying what to install or choose,
    here rather than at the first forward. Only ``device.type`` is read: CUDA is not touched.
    """
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    if sinks and name in ("flash_attn", "torch_varlen"):
        raise ValueError(
            f"attn_backend={name!r} cannot compute this model's attention sinks (GPT-OSS); "
            "use attn_backend='sdpa' (or 'auto'), which computes them exactly per document"
        )
    if sinks and name == "auto":
        return "sdpa"
    if name == "auto":
        if on_cuda and _flash_attn_problem() is None:
            return "flash_attn"
        if on_cuda and _torch_varlen_present():
            return "torch_varlen"
        return "sdpa"
    if name == "flash_attn":
        if not on_cuda:
            raise ValueError(
                f"attn_backend='flash_attn' needs a CUDA device, not {device}; "
                "use attn_backend='sdpa' (or 'auto')"
            )
        problem = _flash_attn_problem()
        if problem is not None:
            raise ValueError(
                "attn_backend='flash_attn' needs the flash-attn package (flash-attn 2's "
                f"flash_attn_varlen_func), but {problem}: install flash-attn 2 "
                "(pip install flash-attn), or use attn_backend='torch_varlen' or 'auto'"
            )
        return name
    if name == "torch_varlen":
        if not on_cuda:
            raise ValueError(
                f"attn_backend='torch_varlen' needs a CUDA device, not {device}; "
                "use attn_backend='sdpa' (or 'auto')"
            )
        if not _torch_varlen_present():
            raise ValueError(
                f"attn_backend='torch_varlen' needs torch.nn.attention.varlen (torch >= 2.11), "
                f"this is torch {torch.__version__}; upgrade torch or use attn_backend='sdpa'"
            )
        return name
    if name == "sdpa":
        return name
    raise ValueError(f"unknown attn_backend {name!r}; choose one of {', '.join(ATTN_BACKENDS)}")


def register_padding_free_attention(backend: str) -> str:
    """Registers the attention function of a concrete ``backend`` (not ``auto``) with transformers
    and returns its attn_implementation name. Registering again is harmless."""
    if backend not in _IMPLEMENTATION_NAMES:
        raise ValueError(
            f"cannot register attn_backend {backend!r}; choose one of "
            f"{', '.join(_IMPLEMENTATION_NAMES)} (resolve 'auto' with resolve_attn_backend first)"
        )
    name = _IMPLEMENTATION_NAMES[backend]
    AttentionInterface.register(name, _BACKEND_FUNCTIONS[backend]())
    return name


def use_padding_free_attention(model: PreTrainedModel, backend: str) -> str:
    """Switches ``model`` to the padding-free attention of a concrete ``backend``; returns the
    attn_implementation name now in ``model.config``. A hybrid model's state-space and
    convolution layers run once per document (:mod:`mt_core.stateful`), or it is refused.

    From then on every forward call must pass ``cu_seq_lens_q``, ``cu_seq_lens_k``,
    ``max_length_q`` and ``max_length_k`` (see :func:`mt_core.loss.minibatch_loss`). Switch back
    with ``model.set_attn_implementation("sdpa")`` for padded batches or generation.
    """
    name = register_padding_free_attention(backend)
    model.set_attn_implementation(name)
    # transformers only logs a warning for models that do not dispatch through AttentionInterface
    # (it leaves their attention as it was); training those would silently mix documents.
    if model.config._attn_implementation != name:
        raise ValueError(
            f"{type(model).__name__} does not route its attention through transformers' "
            "AttentionInterface, so mt cannot make it padding-free"
        )
    run_stateful_layers_per_document(model)
    return name


def _documents(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float,
    kwargs: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Checks one call and returns ``cu_seq_lens_q``, ``cu_seq_lens_k``, ``max_length_q/k``."""
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
    if kwargs.get("softcap") is not None:
        raise ValueError(
            "padding-free attention does not support softcap (used by this model's attention); "
            "train it with another attention implementation"
        )
    if kwargs.get("s_aux") is not None:  # the sdpa backend takes them out before this check
        raise ValueError(
            "this varlen kernel cannot compute attention sinks (s_aux, used by this model's "
            "attention); use attn_backend='sdpa'"
        )
    return cu_q, cu_k, int(max_q), int(max_k)


def _sdpa_per_document(
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
    """Causal SDPA on each document of the row in turn: exact, slow, runs on any device."""
    sinks = kwargs.pop("s_aux", None)
    cu_q, cu_k, _, _ = _documents(module, query, key, attention_mask, dropout, kwargs)
    bounds = cu_q.tolist()
    if cu_k is not cu_q and cu_k.tolist() != bounds:
        raise ValueError("the sdpa backend needs the same documents for queries and keys")
    if bounds[0] != 0 or bounds[-1] != query.shape[2]:
        raise ValueError(
            f"cu_seq_lens_q covers tokens {bounds[0]}..{bounds[-1]}, the row has {query.shape[2]}"
        )
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        length = end - start
        mask = None
        if (sliding_window is not None and length > sliding_window) or sinks is not None:
            # transformers' sliding window: query i sees keys i - sliding_window < j <= i.
            i = torch.arange(length, device=query.device)[:, None]
            j = torch.arange(length, device=query.device)[None, :]
            mask = (j <= i) & (j > i - (sliding_window or length))
        q, k, v = (t[:, :, start:end] for t in (query, key, value))
        if sinks is None:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, scale=scaling,
                enable_gqa=key.shape[1] != query.shape[1],
            )  # fmt: skip
        else:
            out = _with_sinks(q, k, v, mask, sinks, scaling)
        outputs.append(out)
    # HF attention functions return (batch, tokens, heads, head_dim)
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def _with_sinks(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    sinks: torch.Tensor,
    scaling: float | None,
) -> torch.Tensor:
    """Attention of one document whose softmax has one more logit per head, ``sinks``, that
    attends to nothing (so a query may give little weight to every key). Materialises the
    document's (heads, tokens, tokens) scores: SDPA has no place for the extra logit."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = (query @ key.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    sink = sinks.to(scores.dtype).reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
    weights = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    return weights.to(value.dtype) @ value


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


def _window(sliding_window: int | None, max_k: int) -> tuple[int, int]:
    """Flash-style (left, right) window: HF's ``sliding_window`` counts the query itself."""
    if sliding_window is None or max_k <= sliding_window:
        return (-1, 0)  # plain causal: lets torch pick cuDNN, which takes no other window
    return (sliding_window - 1, 0)


def _torch_varlen_function() -> Callable[..., AttentionOutput]:
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

    cu_q, cu_k, max_q, max_k = _documents(module, query, key, attention_mask, dropout, kwargs)
    q, k, v = _varlen_layout(query, key, value)
    extra = {"enable_gqa": True} if takes_enable_gqa and k.shape[1] != q.shape[1] else {}
    out = varlen_attn(
        q, k, v, cu_q, cu_k, max_q, max_k, scale=scaling,
        window_size=_window(sliding_window, max_k), **extra,
    )  # fmt: skip
    return out.to(query.dtype).unsqueeze(0), None


def _flash_attn_varlen(
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
    """flash-attn 2's ``flash_attn_varlen_func`` (GQA native)."""
    from flash_attn import flash_attn_varlen_func

    cu_q, cu_k, max_q, max_k = _documents(module, query, key, attention_mask, dropout, kwargs)
    q, k, v = _varlen_layout(query, key, value)
    out = flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scaling, causal=True,
        window_size=_window(sliding_window, max_k),
    )  # fmt: skip
    return out.to(query.dtype).unsqueeze(0), None


# the attention function of each backend, made when it is registered
_BACKEND_FUNCTIONS: dict[str, Callable[[], Callable[..., AttentionOutput]]] = {
    "flash_attn": lambda: _flash_attn_varlen,
    "torch_varlen": _torch_varlen_function,
    "sdpa": lambda: _sdpa_per_document,
}
