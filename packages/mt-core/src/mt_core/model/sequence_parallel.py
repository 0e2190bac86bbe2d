"""Sequence parallelism: a group of ranks computes one packed row together.

Each rank of a group holds a consecutive part of the row's tokens (:func:`mt_data.sequence_shard`).
Everything but attention works token by token, so it runs on the part as it is: embeddings, norms,
MLPs, RoPE (each token carries its own position id) and the loss (each token its own target; the
parts' losses add up to the row's, over the global target count as always). Attention needs
every earlier token of a document, so around the attention kernel the ranks swap layouts with two
all-to-alls, in the style of DeepSpeed-Ulysses:

* before it, each rank sends every other rank that rank's share of the attention heads for its
  own tokens: afterwards it holds the *whole row* for ``heads / size`` heads, and the unmodified
  varlen kernel runs on it with the row's ``cu_seqlens``: exact for any document boundaries;
* after it, the reverse exchange returns each rank's tokens with all heads.

Why this scheme: it wraps any attention function (torch varlen, flash-attn 2 and 4, the
per-document SDPA that runs on CPU), so every backend, sliding window and sink stays exact; its
collectives run under gloo, so a CPU test proves it; each layer moves q, k, v and the output once
(4 all-to-alls of a part's activations, overlapping nothing else). Its limit: the group size must
divide the number of key/value heads (8 for Llama 3 8B/70B). Ring attention would scale past that,
but needs a kernel that merges partial softmaxes per document, which no varlen kernel here
exposes; torch's experimental ``context_parallel`` shards plain SDPA calls, which cannot keep
packed documents apart (no varlen, no per-document mask).

The exchange uses torch's functional collectives (``all_to_all_single_autograd``): their backward
is the reverse exchange, and torch.compile traces them inside compiled blocks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from transformers import AttentionInterface, PretrainedConfig, PreTrainedModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from mt_core.model.recurrent import recurrent_layers

__all__ = ["sequence_parallel_problem", "use_sequence_parallel_attention"]


def sequence_parallel_problem(config: PretrainedConfig, size: int) -> str | None:
    """Why a model of ``config`` cannot split its attention heads over ``size`` ranks (or None)."""
    if size == 1:
        return None
    text = config.get_text_config()
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    if heads % size or kv_heads % size:
        common = math.gcd(heads, kv_heads)
        sizes = ", ".join(str(d) for d in range(2, common + 1) if common % d == 0)
        choice = f"choose one of {sizes}" if sizes else "this model cannot use it (set it to 1)"
        return (
            f"{size} does not divide the model's {heads} attention heads and {kv_heads} "
            f"key/value heads (each rank of a group attends with an equal share of both); "
            f"{choice}"
        )
    return None


def use_sequence_parallel_attention(model: PreTrainedModel, group: dist.ProcessGroup) -> str:
    """Wraps the padding-free attention ``model`` uses now (set by
    :func:`mt_core.model.attention.use_padding_free_attention`) so that the ranks of ``group``
    exchange heads for tokens around it; returns the new attn_implementation name."""
    if recurrent_layers(model):
        raise ValueError(
            f"{type(model).__name__} has state-space / convolution layers, which run along the "
            "whole sequence: sequence parallelism cannot split them; set sequence_parallel_size = 1"
        )
    inner_name = model.config._attn_implementation
    inner = ALL_ATTENTION_FUNCTIONS[inner_name]
    name = f"{inner_name}_seqpar{dist.get_world_size(group)}"
    AttentionInterface.register(name, _sequence_parallel(inner, group))
    model.set_attn_implementation(name)
    return name


def _sequence_parallel(
    inner: Callable[..., tuple[torch.Tensor, Any]], group: dist.ProcessGroup
) -> Callable[..., tuple[torch.Tensor, None]]:
    size = dist.get_world_size(group)
    index = dist.get_rank(group)

    def attend(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        sinks = kwargs.get("s_aux")
        if sinks is not None:  # one per head: this rank attends with its share of the heads
            kwargs["s_aux"] = sinks.reshape(size, -1)[index]
        query, key, value = (_tokens_to_heads(t, size, group) for t in (query, key, value))
        out, _ = inner(module, query, key, value, attention_mask, **kwargs)
        return _heads_to_tokens(out, size, group), None

    return attend


def _tokens_to_heads(x: torch.Tensor, size: int, group: dist.ProcessGroup) -> torch.Tensor:
    """(1, heads, part, d) of this rank's tokens -> (1, heads/size, size*part, d) of the row."""
    _, heads, part, dim = x.shape
    # block j of dim 0 (heads j*h/size ...) goes to rank j; block i received is rank i's tokens
    sent = x.reshape(size, heads // size, part, dim).contiguous()
    received = funcol.all_to_all_single_autograd(sent, None, None, group)
    # waited for here, not at the kernel's first read: eagerly the exchange returns a tensor
    # subclass that waits on first use, which the kernels need not expect (the sdpa backend's
    # backward takes its gradients with torch.func, which cannot look inside one)
    received = funcol.wait_tensor(received)
    return received.transpose(0, 1).reshape(1, heads // size, size * part, dim)


def _heads_to_tokens(out: torch.Tensor, size: int, group: dist.ProcessGroup) -> torch.Tensor:
    """(1, row, heads/size, d), as attention functions return it -> (1, row/size, heads, d)."""
    _, row, heads, dim = out.shape
    # block j of dim 0 (rank j's tokens) goes to rank j; block i received holds head share i
    sent = out.reshape(size, row // size, heads, dim).contiguous()
    received = funcol.all_to_all_single_autograd(sent, None, None, group)
    return received.transpose(0, 1).reshape(1, row // size, size * heads, dim)
