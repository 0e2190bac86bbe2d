"""Model set-up: an HF causal LM built on the meta device, patched, sharded, then loaded.

The order matters: FP8 layers, kernels and attention are chosen on the bare HF model, activation
checkpointing, compilation and activation offloading wrap its blocks, FSDP2 shards it, and only
then do the shards get memory and the checkpoint's weights.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from mt_core.config import ConfigError
from mt_core.model.activation_offload import ActivationOffload
from mt_core.model.attention import (
    has_attention_sinks,
    resolve_attn_backend,
    use_padding_free_attention,
)
from mt_core.model.compiled_blocks import compile_blocks as compile_decoder_blocks
from mt_core.model.families import freeze_untrained, load_weights, new_model
from mt_core.model.float8 import convert_to_float8
from mt_core.model.sequence_parallel import use_sequence_parallel_attention
from mt_fsdp import (
    TOKENIZER_FILES,
    DistContext,
    decoder_blocks,
    materialize,
    parameters_on_meta,
    shard_model,
)
from mt_fsdp.load import safetensors_files

__all__ = [
    "TORCH_DTYPES",
    "build_model",
    "checkpoint_blocks",
    "export_dtype",
    "liger_available",
    "load_config",
    "locate_model",
    "matmul_parameter_count",
]

logger = logging.getLogger("mt_core")

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def locate_model(name: str) -> Path:
    """The local folder of ``model_name_or_path``: the folder itself, or a hub model's snapshot
    (config, safetensors, tokenizer and remote-code files only) where the network allows."""
    path = Path(name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(
                [f"model_name_or_path: {name} has no config.json; give a HF model folder"]
            )
        _check_weights(path)
        return path
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ConfigError([f"model_name_or_path: {name} is not a folder"])
    from huggingface_hub import snapshot_download

    try:  # every rank may ask at once: the hub client locks each file it fetches
        folder = snapshot_download(
            name, allow_patterns=["*.json", "*.safetensors", "*.py", *TOKENIZER_FILES]
        )
    except Exception as error:  # offline, unknown name, gated model: one clear line
        raise ConfigError(
            [f"model_name_or_path: {name!r} is no local folder and could not be downloaded "
             f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"]
        ) from error  # fmt: skip
    _check_weights(Path(folder))
    return Path(folder)


def _check_weights(folder: Path) -> None:
    # before the data is read: weights come from safetensors only, never from pickles
    try:
        safetensors_files(folder)
    except ValueError as error:
        raise ConfigError([f"model_name_or_path: {error}"]) from None


def load_config(folder: Path, trust_remote_code: bool = False) -> PretrainedConfig:
    """The model's config. Code shipped with a model (``auto_map`` in config.json) runs only
    with ``trust_remote_code``; transformers refuses such a model without it, and mt says so
    in one line."""
    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except ValueError as error:
        if "trust_remote_code" in str(error):
            raise ConfigError(
                [f"model_name_or_path: {folder} ships its own modeling code (auto_map in "
                 "config.json), which mt runs only when the run file sets trust_remote_code = "
                 "true; set it only for a model whose code you trust"]
            ) from None  # fmt: skip
        raise ConfigError(
            [f"model_name_or_path: {folder}/config.json: {str(error).splitlines()[0]}"]
        ) from None
    except OSError as error:  # config.json that is not JSON
        raise ConfigError([f"model_name_or_path: {str(error).splitlines()[0]}"]) from None


def liger_available() -> bool:
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError:
        return False
    return True


def _apply_liger(model: PreTrainedModel, loss_only: bool) -> None:
    """Liger's fused kernels for this architecture (RMSNorm, RoPE, SwiGLU, and the fused linear
    cross-entropy that never materialises the logits). With ``loss_only`` just the loss: inside
    compiled blocks torch.compile fuses the norms, RoPE and SwiGLU itself, and Liger's kernels
    there fail to trace (measured: torch 2.11, liger-kernel 0.8.5)."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    inside_blocks = not loss_only
    _apply_liger_kernel_to_instance(
        model=model, rope=inside_blocks, rms_norm=inside_blocks, swiglu=inside_blocks
    )


def checkpoint_blocks(model: PreTrainedModel) -> None:
    """Non-reentrant activation checkpointing of every decoder block, through transformers'
    ``activation_checkpointing_enable`` (5.2x; its older name, ``gradient_checkpointing_enable``,
    warns there that it is deprecated, and is all that transformers 5.17 has)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def build_model(
    folder: str | Path,
    config: PretrainedConfig,
    ctx: DistContext,
    *,
    master_dtype: torch.dtype,
    compute_dtype: torch.dtype,
    attn_backend: str = "auto",
    use_liger: bool = False,
    activation_checkpointing: bool = False,
    compile_blocks: bool = False,
    activation_offload: ActivationOffload | None = None,
    cpu_offload: bool = False,
    keep_gathered: bool = False,
    trust_remote_code: bool = False,
    float8: str | None = None,
    deferred_sync: bool = False,
) -> tuple[PreTrainedModel, str]:
    """The sharded model of ``config``, its weights loaded from ``folder`` into ``master_dtype``
    (what the optimizer updates); and the attention backend used. Forward and backward compute
    in ``compute_dtype`` (FSDP mixed precision casts each gathered block). ``activation_offload``
    (None: off) is given the decoder blocks, whose saved activations it then moves. ``float8``
    (a recipe of :data:`mt_core.model.float8.RECIPES`; None: off) computes the blocks' large
    linear layers in FP8. ``deferred_sync``: gradients reduced once a step, not after every
    minibatch (:func:`mt_fsdp.shard_model`)."""
    with parameters_on_meta():
        model = new_model(config, master_dtype, trust_remote_code)
    freeze_untrained(model)
    # before compilation and FSDP2, as torchao needs (mt_core.model.float8)
    shard_ranks = ctx.mesh.size() if ctx.mesh is not None else 1
    float8_count = 0
    if float8 is not None:
        float8_count = convert_to_float8(model, float8, shard_ranks, offloaded=cpu_offload)
    backend = resolve_attn_backend(attn_backend, ctx.device, sinks=has_attention_sinks(model))
    use_padding_free_attention(model, backend)
    if ctx.sequence_group is not None:
        use_sequence_parallel_attention(model, ctx.sequence_group)
    if use_liger:
        _apply_liger(model, loss_only=compile_blocks)
    if activation_checkpointing:
        # Non-reentrant checkpointing per decoder block: activations inside a block are
        # recomputed in the backward pass, and it composes with FSDP2's hooks.
        checkpoint_blocks(model)
    if compile_blocks:
        # regional, the changing sizes dynamic; FP8's scaling kernels tuned, where they pay
        compile_decoder_blocks(decoder_blocks(model), tune_kernels=float8 is not None)
    if activation_offload is not None:
        # around each block's whole call: its checkpoint, compiled code and FSDP2's hooks
        activation_offload.install(decoder_blocks(model))
    model.config.use_cache = False
    param_dtype = None if compute_dtype == master_dtype else compute_dtype
    shard_model(
        model, ctx.mesh, param_dtype=param_dtype, cpu_offload=cpu_offload,
        reshard_after_forward=not keep_gathered, deferred_sync=deferred_sync,
    )  # fmt: skip
    materialize(model, torch.device("cpu") if cpu_offload else ctx.device, lambda m: None)
    load_weights(model, folder)
    model.train()
    logger.info(
        "model %s: %.1fM parameters, attention %s, liger %s, compiled blocks %s, activation "
        "offload %s, FP8 linear layers %d",
        type(model).__name__,
        sum(p.numel() for p in model.parameters()) / 1e6,
        backend,
        "on" if use_liger else "off",
        "on" if compile_blocks else "off",
        "on" if activation_offload is not None else "off",
        float8_count,
    )
    return model, backend


def export_dtype(config: PretrainedConfig, name: str | None = None) -> torch.dtype:
    """The dtype of an HF export: ``name`` (one of :data:`TORCH_DTYPES`) where one is chosen,
    else the dtype the model was published in (its config's)."""
    if name:
        return TORCH_DTYPES[name]
    own = getattr(config, "dtype", None) or torch.float32
    return getattr(torch, own) if isinstance(own, str) else own


def matmul_parameter_count(model: nn.Module) -> int:
    """N of the 6N FLOPs-per-token rule: every parameter that takes part in a matrix multiply.

    The input embedding is a table lookup, not a matmul, so it is left out; a tied LM head is
    the same tensor but *is* a matmul, so it counts once.
    """
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    total = sum(p.numel() for p in model.parameters())
    tied = head is not None and head.weight is embedding
    return total if tied else total - embedding.numel()
