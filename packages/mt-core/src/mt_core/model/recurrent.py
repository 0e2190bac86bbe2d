"""Hybrid attention / state-space models on packed rows: their recurrent layers run per document.

Mamba2 mixers (Bamba, GraniteMoeHybrid), LFM2's short convolutions and Qwen3-Next's
gated-delta-rule layers read the row left to right, carrying a convolution window and a recurrent
state. On a packed row that state would flow from one document into the next; transformers'
pure-torch paths ignore (5.17) or refuse (5.24) the document boundaries, and the CUDA kernels
take them in kernel-specific ways. So mt calls each such layer once per document, on that
document's slice of the row, with no packing arguments: every implementation, torch or CUDA,
then sees exactly what it sees for the document alone, and the outputs are concatenated back
into the row. Everything else in the model is per token or padding-free attention, so the
packed row stays one forward pass, with one parameter gather per block under FSDP.

A recurrent layer is recognised by what makes it one: a direct child ``nn.Conv1d`` (the causal
convolution over tokens that all these layers start with). Families with such layers that are
not in :data:`PER_DOCUMENT_FAMILIES` (tested exact) are refused rather than trained inexactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from mt_core.config import ConfigError
from mt_fsdp import decoder_blocks

__all__ = ["PER_DOCUMENT_FAMILIES", "run_recurrent_layers_per_document", "recurrent_layers"]

# model_type -> what its recurrent layers are; each is tested in tests/test_model_families.py
PER_DOCUMENT_FAMILIES = {
    "bamba": "Mamba2 mixers",
    "granitemoehybrid": "Mamba2 mixers",
    "lfm2": "short convolutions",
    "qwen3_next": "gated-delta-rule layers",
}

# the model call's packing arguments: a layer run on one document gets none of them
_PACKING_KEYS = (
    "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx", "position_ids",
)  # fmt: skip


def recurrent_layers(model: nn.Module) -> list[nn.Module]:
    """The layers of ``model`` that carry state along the row (own a token ``nn.Conv1d``)."""
    return [
        module
        for module in model.modules()
        if any(isinstance(child, nn.Conv1d) for child in module.children())
    ]


def run_recurrent_layers_per_document(model: PreTrainedModel) -> None:
    """Makes every recurrent layer of ``model`` run once per document of a packed row (given by
    the ``cu_seq_lens_q`` of the model call); calls without it (one unpacked sequence) pass
    through unchanged. Raises ConfigError for a recurrent family mt has not made exact.
    Calling it again is harmless."""
    if not recurrent_layers(model):
        return
    model_type = model.config.model_type
    if model_type not in PER_DOCUMENT_FAMILIES:
        supported = ", ".join(PER_DOCUMENT_FAMILIES)
        raise ConfigError(
            [f"model_name_or_path: model type {model_type!r} has state-space / convolution "
             "layers that mt cannot yet keep within each document of a packed row, so its "
             f"loss would not be exact; hybrid models mt trains: {supported}"]
        )  # fmt: skip
    for block in decoder_blocks(model):
        layers = [m for m in recurrent_layers(block) if not getattr(m, "_mt_per_document", False)]
        if layers:
            documents = _Documents()
            # the block's own call carries the documents, and so does its recomputation under
            # activation checkpointing (the same call again, during backward)
            block.register_forward_pre_hook(documents.remember, with_kwargs=True)
            for layer in layers:
                layer.forward = _per_document(layer.forward, documents)
                layer._mt_per_document = True


class _Documents:
    """The document boundaries of the block call in progress (None: not a packed call)."""

    def __init__(self) -> None:
        self.bounds: list[int] | None = None

    def remember(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        cu_seqlens = kwargs.get("cu_seq_lens_q")
        self.bounds = None if cu_seqlens is None else cu_seqlens.tolist()


def _per_document(forward: Callable[..., torch.Tensor], documents: _Documents) -> Callable:
    def run(*args: Any, **kwargs: Any) -> torch.Tensor:
        bounds = documents.bounds
        if bounds is None:
            return forward(*args, **kwargs)
        if kwargs.get("attention_mask") is not None:
            raise ValueError("a packed row takes no attention_mask: documents are cu_seq_lens")
        keyed = "hidden_states" in kwargs
        hidden = kwargs.pop("hidden_states") if keyed else args[0]
        rest = args if keyed else args[1:]
        for key in _PACKING_KEYS:
            kwargs.pop(key, None)
        if bounds[0] != 0 or bounds[-1] != hidden.shape[1] or hidden.shape[0] != 1:
            raise ValueError(
                f"cu_seq_lens_q covers tokens {bounds[0]}..{bounds[-1]}, the packed row "
                f"{tuple(hidden.shape[:2])}"
            )
        pieces = [
            forward(hidden[:, start:end], *rest, **kwargs)
            for start, end in zip(bounds[:-1], bounds[1:], strict=True)
        ]
        return torch.cat(pieces, dim=1)

    return run
