"""HF export: a folder that ``AutoModelForCausalLM.from_pretrained`` loads, written atomically.

Rank 0 writes safetensors (in ``save_dtype``), config.json, generation_config.json and the
tokenizer files of the source model into a temporary folder next to the target and renames it
when everything is on disk, so a crash never leaves a half export that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Collection
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from mt_fsdp import mxfp4
from mt_fsdp.distributed import barrier

__all__ = ["TOKENIZER_FILES", "export_hf"]

# The files a tokenizer may consist of; copied verbatim from the source model folder.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def export_hf(
    model: nn.Module,
    target: str | Path,
    *,
    save_dtype: torch.dtype | None = None,
    source_folder: str | Path | None = None,
    mxfp4_experts: Collection[str] = (),
) -> Path | None:
    """Write ``model`` (a HF PreTrainedModel, sharded or not) as a HF folder at ``target``.

    Every rank must call this (gathering the shards is collective); rank 0 writes and returns
    the folder, the others return None. ``save_dtype`` None keeps the parameters' dtype.
    The stacked expert matrices ``(experts, in, out)`` named in ``mxfp4_experts`` are written
    back as the MXFP4 ``<name>_blocks`` and ``<name>_scales`` they were read from (see
    :func:`mt_fsdp.load_hf_weights`), quantized from the full-precision weights.
    """
    # Gather on the CPU so the GPU needs no room for a full copy. Rank 0 holds the whole model
    # in host memory for the duration of the write.
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    rank = dist.get_rank() if dist.is_initialized() else 0
    target = Path(target)
    if rank == 0:
        state = {name: plain_tensor(t) for name, t in state.items()}
        for name in mxfp4_experts:
            blocks, scales = mxfp4.quantize(state.pop(name).transpose(-1, -2))
            state[f"{name}_blocks"], state[f"{name}_scales"] = blocks, scales
        if save_dtype is not None:
            state = {
                name: t.to(save_dtype) if t.is_floating_point() else t for name, t in state.items()
            }
        temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(temporary, ignore_errors=True)
        model.save_pretrained(temporary, state_dict=state, safe_serialization=True)
        if save_dtype is not None:
            _set_config_dtype(temporary, save_dtype)
        if source_folder is not None:
            for name in TOKENIZER_FILES:
                source = Path(source_folder) / name
                if source.is_file():
                    shutil.copy2(source, temporary / name)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():  # an export of the same sample count from an earlier attempt
            shutil.rmtree(target)
        os.replace(temporary, target)
    barrier()
    return target if rank == 0 else None


def plain_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` without the tensor subclasses that wrap one plain tensor of the same values
    (torchao's float8 training weights: a cast on the way to each matrix product), which
    safetensors cannot write: an export holds what a run without them would write."""
    while type(tensor) is not torch.Tensor and hasattr(tensor, "__tensor_flatten__"):
        inner, _ = tensor.__tensor_flatten__()
        if len(inner) != 1:
            break
        tensor = getattr(tensor, inner[0])
    return tensor


def _set_config_dtype(folder: Path, dtype: torch.dtype) -> None:
    """Record the saved dtype in config.json, so loaders pick it with dtype="auto"."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    name = str(dtype).removeprefix("torch.")
    key = "dtype" if "dtype" in config or "torch_dtype" not in config else "torch_dtype"
    config[key] = name
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
