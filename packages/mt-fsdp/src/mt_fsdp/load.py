"""Build a model without memory, shard it, then read HF safetensors straight into the shards.

The model is constructed with its parameters on the meta device (no storage), sharded, and only
then given real storage: each rank allocates its own shard. PyTorch's distributed-checkpoint
reader for HF safetensors then copies into every rank just the slices it owns, so no rank ever
holds the whole model (mini_trainer loads it whole on rank 0 and broadcasts).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict

__all__ = ["load_hf_weights", "materialize", "parameters_on_meta", "safetensors_files"]

# Weight files mt never reads: they are Python pickles, and unpickling runs code.
PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Create parameters on the meta device but keep buffers real.

    Buffers such as RoPE's inverse frequencies are computed in ``__init__`` and usually are not
    in the checkpoint, so they must survive; parameters are what is large and what the
    checkpoint fills. (A plain ``torch.device("meta")`` context would lose the buffers.)
    """
    original = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            moved = nn.Parameter(param.data.to("meta"), requires_grad=param.requires_grad)
            module._parameters[name] = moved

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def materialize(model: nn.Module, device: torch.device, init: Callable[[nn.Module], None]) -> None:
    """Give the (sharded) meta parameters real storage on ``device``, keeping buffer values.

    ``init`` then fills the parameters (for a model trained from scratch) or is a no-op when a
    checkpoint is loaded next; either way nothing is left uninitialised by accident.
    """
    buffers = {name: buffer.detach().clone() for name, buffer in model.named_buffers()}
    model.to_empty(device=device)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])
    init(model)


def safetensors_files(folder: str | Path) -> list[Path]:
    """The ``*.safetensors`` files of an HF model folder; a ValueError that says why when there
    are none. Weights are only ever read from safetensors, never from pickled files (such as
    ``pytorch_model.bin``), which would run code while loading."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for pattern in PICKLED_WEIGHTS for p in folder.glob(pattern))
        found = f" (it has {', '.join(pickled[:3])})" if pickled else ""
        raise ValueError(
            f"{folder} holds no *.safetensors weights{found}; mt reads weights from safetensors "
            "only, never from pickled files: use a folder saved with safetensors (a model you "
            "trust can be converted with save_pretrained(..., safe_serialization=True))"
        )
    return files


def load_hf_weights(model: nn.Module, folder: str | Path) -> None:
    """Fill every parameter of the (sharded, materialised) model from HF safetensors files.

    Tensors are converted to each parameter's dtype on the way in. Tied weights absent from the
    files (an LM head tied to the input embeddings) are filled through the parameter they share.
    A parameter that is in neither the files nor tied to one raises, naming it. Only
    ``*.safetensors`` files are read (see :func:`safetensors_files`).
    """
    safetensors_files(folder)
    reader = dcp.HuggingFaceStorageReader(str(folder))
    available = set(reader.read_metadata().state_dict_metadata)
    state = get_model_state_dict(model)
    # named_parameters lists a shared (tied) parameter once, under its first name.
    owners = {name for name, _ in model.named_parameters()}
    missing = sorted(name for name in owners if name not in available)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(
            f"{folder}: the safetensors files lack {len(missing)} weight(s) of the model "
            f"({shown}); is this folder a checkpoint of this architecture?"
        )
    wanted = {name: tensor for name, tensor in state.items() if name in available}
    dcp.load(wanted, storage_reader=reader)
