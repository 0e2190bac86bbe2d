"""A model's shape from its config.json alone: built on the meta device (no memory, no weights),
so parameter counts are exact for any architecture transformers knows, from a laptop."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from mt_core.config import ConfigError, TrainingArgs
from mt_core.model.attention import has_attention_sinks
from mt_core.model.build import matmul_parameter_count
from mt_core.model.float8 import float8_layers
from mt_core.plan.memory import ModelShape
from mt_fsdp import decoder_blocks

__all__ = [
    "OsftSettings", "liger_supports", "model_shape", "osft_settings", "read_config_only", "run_shape",
]  # fmt: skip

_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


@dataclass(frozen=True)
class OsftSettings:
    """The OSFT keys of a run, where it uses OSFT."""

    ratio: float
    target_patterns: tuple[str, ...] | None = None
    upcast_bytes: int = 4


def read_config_only(name: str, trust_remote_code: bool = False) -> PretrainedConfig:
    """The config of ``model_name_or_path``: a local folder's config.json, or only the config of
    a hub model (never its weights). One clear ConfigError when neither can be had."""
    path = Path(name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError([f"model_name_or_path: {name} has no config.json"])
    elif path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ConfigError([f"model_name_or_path: {name} is not a folder"])
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as error:  # offline, unknown name, unknown model type: one line
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ConfigError(
            [
                f"model_name_or_path: cannot read the config of {name!r} ({type(error).__name__}: {first})"
            ]
        ) from error


def liger_supports(model_type: str) -> bool | None:
    """Whether liger-kernel has kernels for ``model_type`` (None: liger-kernel is not installed
    here, so it cannot say; a GPU machine with mt has it)."""
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except Exception:  # not installed, or its import needs what this machine lacks
        return None
    return model_type in MODEL_TYPE_TO_APPLY_LIGER_FN


def osft_settings(args: TrainingArgs) -> OsftSettings | None:
    """The run's OSFT settings when it uses OSFT (``osft = true``); adaptive per-layer ratios are
    only known once measured on the GPU, so the midpoint of their range stands for them."""
    if not args.osft:
        return None
    ratio = args.osft_unfreeze_rank_ratio
    if args.osft_adaptive_ratios:
        ratio = (args.osft_min_ratio + args.osft_max_ratio) / 2
    patterns = args.osft_target_patterns
    return OsftSettings(
        ratio=float(ratio),
        target_patterns=tuple(patterns) if patterns else None,
        upcast_bytes=8 if args.osft_upcast_dtype == "float64" else 4,
    )


def _build_on_meta(config: PretrainedConfig, trust_remote_code: bool) -> torch.nn.Module:
    quiet = logging.getLogger("transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(
                config, dtype=torch.float32, trust_remote_code=trust_remote_code
            )
    except Exception as error:
        raise ConfigError(
            [f"model_name_or_path: transformers cannot build a causal LM from this config "
             f"({type(error).__name__}: {error})"]
        ) from error  # fmt: skip
    finally:
        quiet.setLevel(level)


def model_shape(
    config: PretrainedConfig,
    *,
    osft: OsftSettings | None = None,
    trust_remote_code: bool = False,
    float8: str | None = None,
) -> ModelShape:
    """Counts and widths of the model of ``config``; with ``osft``, what OSFT trains and keeps;
    the weights the FP8 recipe ``float8`` converts (None: what tensorwise, the lever, would)."""
    model = _build_on_meta(config, trust_remote_code)
    text = config.get_text_config()
    params = {id(p): p for p in model.parameters()}  # a tied parameter once
    total = sum(p.numel() for p in params.values())
    blocks = decoder_blocks(model)
    block_sizes = [sum(p.numel() for p in block.parameters()) for block in blocks]
    in_blocks = sum(block_sizes)
    head = model.get_output_embeddings()
    heads = int(text.num_attention_heads)
    hidden = int(text.hidden_size)
    counts = _osft_counts(model, config, osft, total) if osft is not None else None
    modules = dict(model.named_modules())
    # norms beyond a Llama block's two, from the first block's module names
    names = {name.rsplit(".", 1)[-1] for name, _ in blocks[0].named_modules()} if blocks else set()
    converted = [
        n for n, reason in float8_layers(model, float8 or "tensorwise").items() if reason is None
    ]
    return ModelShape(
        architecture=type(model).__name__,
        params=total,
        grad_params=counts.grad_params if counts else total,
        trainable=counts.trainable if counts else total,
        matmul_params=matmul_parameter_count(model),
        layers=int(text.num_hidden_layers),
        hidden=hidden,
        intermediate=int(getattr(text, "intermediate_size", None) or 4 * hidden),
        heads=heads,
        kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(text, "head_dim", None) or hidden // heads),
        vocab=int(text.vocab_size),
        block_params=max(block_sizes, default=0),
        root_params=total - in_blocks,
        head_params=head.weight.numel() if head is not None else 0,
        osft_reference_values=counts.references if counts else 0,
        osft_basis_values=counts.bases if counts else 0,
        osft_upcast_bytes=osft.upcast_bytes if osft is not None else 4,
        osft_projection_flops=counts.projection_flops if counts else 0,
        moe=any((getattr(text, key, 0) or 0) > 1 for key in _MOE_KEYS),
        sinks=has_attention_sinks(model),
        qk_norms={"q_norm", "k_norm"} <= names,
        sandwich_norms="post_feedforward_layernorm" in names,
        float8_params=sum(modules[name].weight.numel() for name in converted),
    )


def run_shape(config: PretrainedConfig, args: TrainingArgs) -> ModelShape:
    """:func:`model_shape` of ``config`` with what the run file ``args`` says of OSFT, FP8 and
    remote code: the shape the trainer and ``mt check`` plan with."""
    return model_shape(
        config, osft=osft_settings(args), trust_remote_code=args.trust_remote_code,
        float8=args.float8,
    )  # fmt: skip


class _OsftCounts(NamedTuple):
    grad_params: int  # parameters with gradients
    trainable: int  # the dimension of what can change
    references: int  # values of the frozen copies W0
    bases: int  # values of the bases
    projection_flops: int  # of one projection of every projected target


def _osft_counts(
    model: torch.nn.Module, config: PretrainedConfig, osft: OsftSettings, total: int
) -> _OsftCounts:
    from mt_osft import default_target_patterns, match_targets, plan_subspace, trainable_rank

    try:
        patterns = list(osft.target_patterns or default_target_patterns(config.model_type))
        names = match_targets(model, patterns)
    except ValueError as error:
        raise ConfigError([str(error)]) from error
    modules = dict(model.named_modules())
    grad_params, trainable, references, bases, flops = total, total, 0, 0, 0
    for name in names:
        out, inn = modules[name].weight.shape
        plan = plan_subspace((out, inn), trainable_rank(min(out, inn), osft.ratio))
        trainable -= out * inn - plan.trainable_elements
        if plan.n_train == 0:  # frozen outright: no gradient, no optimizer state
            grad_params -= out * inn
        if plan.projected:  # the original weight, and the bases of the frozen directions
            references += out * inn
            bases += out * plan.left_cols + inn * plan.right_cols
            flops += plan.projection_flops
    return _OsftCounts(grad_params, trainable, references, bases, flops)
