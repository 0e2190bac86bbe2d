"""Model families beyond plain decoder-only causal LMs: which class mt builds, what it leaves
frozen, and how weights are read from and written back to the model's own checkpoint format.

* Vision-language models (a config that wraps a text config: Mistral3, Gemma3, Qwen3-VL, ...)
  are built as their ConditionalGeneration class, vision tower included, so an export has the
  original layout and loads as the VLM. mt trains them on text only: the vision tower and the
  projector never run, so they are frozen (no gradient, no optimizer state) and exported as
  they were loaded.
* GPT-OSS: its router is frozen, as mini_trainer does; expert weights stored as MXFP4 are
  dequantized for training and quantized back on export (:mod:`mt_fsdp.mxfp4`).
* transformers 5 renames some checkpoints' weights on load (llava-style VLMs keep
  ``language_model.model.*`` in their files and ``model.language_model.*`` in memory) and
  renames them back in ``save_pretrained``, which mt's export calls; :func:`load_weights`
  looks each parameter up under the name the files give it.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import PrefixChange, revert_weight_conversion

from mt_fsdp import export_hf, load_hf_weights

__all__ = ["export_model", "freeze_untrained", "load_weights", "mxfp4_experts", "new_model"]

logger = logging.getLogger("mt_core")

# GPT-OSS's MoE weights that its checkpoints store as MXFP4 (quant_method "mxfp4")
_MXFP4_EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def _is_vlm(config: PretrainedConfig) -> bool:
    return (
        config.get_text_config() is not config
        and type(config) in AutoModelForImageTextToText._model_mapping
    )


def new_model(
    config: PretrainedConfig, dtype: torch.dtype, trust_remote_code: bool = False
) -> PreTrainedModel:
    """The untrained model of ``config`` (on the current device context): its causal LM, or for
    a vision-language model its image-text-to-text class, whose text backbone mt trains."""
    auto = AutoModelForImageTextToText if _is_vlm(config) else AutoModelForCausalLM
    model = auto.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    # transformers looks the checkpoint's renames up by the model's class, which FSDP2 replaces
    # with one of its own (then taken for custom code, and skipped): record them now, where
    # from_pretrained records them, for save_pretrained (the export) and load_weights
    renames = [
        transform
        for transform in get_model_conversion_mapping(model, add_legacy=False)
        if not isinstance(transform, PrefixChange)
    ]
    model._weight_conversions = renames or None
    return model


def freeze_untrained(model: PreTrainedModel) -> list[str]:
    """Sets ``requires_grad=False`` on what mt does not train; returns the frozen names.

    A VLM's parameters outside its text decoder and LM head (vision tower, projector) get no
    input in text-only training. GPT-OSS's router is frozen as mini_trainer freezes it: routing
    stays that of the released model, and no load-balancing loss is needed to keep it even.
    """
    trained: set[nn.Parameter] | None = None
    if _is_vlm(model.config):
        trained = {*model.get_decoder().parameters(), *model.get_output_embeddings().parameters()}
    frozen = []
    for name, param in model.named_parameters():
        router = model.config.model_type == "gpt_oss" and "router" in name.split(".")
        if router or (trained is not None and param not in trained):
            param.requires_grad_(False)
            frozen.append(name)
    if frozen:
        logger.info("frozen: %d parameter tensors (%s, ...)", len(frozen), frozen[0])
    return frozen


def mxfp4_experts(model: PreTrainedModel) -> list[str]:
    """The expert weights ``model``'s checkpoint stores as MXFP4 (GPT-OSS), else none."""
    quantization = getattr(model.config, "quantization_config", None) or {}
    if not isinstance(quantization, dict):
        quantization = quantization.to_dict()
    if quantization.get("quant_method") != "mxfp4":
        return []
    return [name for name, _ in model.named_parameters() if name.endswith(_MXFP4_EXPERTS)]


def _checkpoint_layout(
    model: PreTrainedModel,
) -> tuple[dict[str, str], dict[str, Callable[[], dict[str, torch.Tensor]]]]:
    """How the checkpoint's files hold each parameter where transformers converts it on load:
    under another name, or in pieces (experts stored one by one that the model fuses). For the
    pieces, a function giving the positions of each stored tensor's elements in the flattened
    parameter: the conversion run backwards on the parameter's own flat indices."""
    names, pieces = {}, {}
    for name, param in model.named_parameters():
        # a shape on the meta device: names are all this needs, and no shard is touched
        saved = revert_weight_conversion(model, {name: torch.empty(param.shape, device="meta")})
        if len(saved) > 1:
            pieces[name] = functools.partial(_positions, model, name, tuple(param.shape))
            continue
        (renamed,) = saved if len(saved) == 1 else (name,)
        if renamed != name:
            names[name] = renamed
    return names, pieces


def _positions(
    model: PreTrainedModel, name: str, shape: tuple[int, ...]
) -> dict[str, torch.Tensor]:
    count = math.prod(shape)
    flat = torch.arange(count, dtype=torch.int32 if count < 2**31 else torch.int64)
    return revert_weight_conversion(model, {name: flat.reshape(shape)})


def load_weights(model: PreTrainedModel, folder: str | Path) -> None:
    """:func:`mt_fsdp.load_hf_weights` with this family's file layout and MXFP4 experts."""
    names, pieces = _checkpoint_layout(model)
    load_hf_weights(
        model, folder, file_names=names, mxfp4_experts=mxfp4_experts(model), pieces=pieces
    )


def export_model(
    model: PreTrainedModel,
    target: str | Path,
    *,
    save_dtype: torch.dtype | None,
    source_folder: str | Path | None,
) -> Path | None:
    """:func:`mt_fsdp.export_hf` in the model's original format (MXFP4 experts as MXFP4)."""
    return export_hf(
        model, target, save_dtype=save_dtype, source_folder=source_folder,
        mxfp4_experts=mxfp4_experts(model),
    )  # fmt: skip
