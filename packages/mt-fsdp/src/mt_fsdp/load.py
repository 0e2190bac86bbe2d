"""Build a model without memory, shard it, then read HF safetensors straight into the shards.

The model is constructed with its parameters on the meta device (no storage), sharded, and only
then given real storage: each rank allocates its own shard. PyTorch's distributed-checkpoint
reader for HF safetensors then copies into every rank just the slices it owns, so no rank ever
holds the whole model (mini_trainer loads it whole on rank 0 and broadcasts).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.tensor import DTensor, Shard

from mt_fsdp import mxfp4

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


def load_hf_weights(
    model: nn.Module,
    folder: str | Path,
    *,
    file_names: Mapping[str, str] | None = None,
    mxfp4_experts: Collection[str] = (),
    pieces: Mapping[str, Callable[[], Mapping[str, torch.Tensor]]] | None = None,
) -> None:
    """Fill every parameter of the (sharded, materialised) model from HF safetensors files.

    Tensors are converted to each parameter's dtype on the way in. Tied weights absent from the
    files (an LM head tied to the input embeddings) are filled through the parameter they share.
    A parameter that is in neither the files nor tied to one raises, naming it. Only
    ``*.safetensors`` files are read (see :func:`safetensors_files`).

    ``file_names`` maps a parameter to the name it has in the files where that differs (a
    checkpoint layout the model renames on load); the parameter's own name is looked for too.
    The parameters in ``mxfp4_experts`` are stacked expert matrices ``(experts, in, out)`` that
    the files hold as MXFP4 ``<name>_blocks`` and ``<name>_scales`` of ``(experts, out, in)``
    (GPT-OSS): each rank reads the blocks of its own experts only and dequantizes them.

    ``pieces`` names the parameters the files hold in several tensors (experts stored one by
    one, fused into one parameter by the model): a function that gives, for each tensor in the
    files, the positions its elements take in the flattened parameter (a tensor of indices in
    the stored tensor's shape). Each rank reads just the pieces that land in its own shard.
    """
    files = safetensors_files(folder)
    file_names = file_names or {}
    pieces = pieces or {}
    reader = dcp.HuggingFaceStorageReader(str(folder))
    stored = reader.read_metadata().state_dict_metadata
    state = get_model_state_dict(model)

    def located(name: str) -> str | None:
        for candidate in (name, file_names.get(name)):
            if candidate in stored or (name in mxfp4_experts and f"{candidate}_blocks" in stored):
                return candidate
        return None

    # named_parameters lists a shared (tied) parameter once, under its first name.
    owners = {name for name, _ in model.named_parameters()}
    missing = sorted(name for name in owners if located(name) is None and name not in pieces)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(
            f"{folder}: the safetensors files lack {len(missing)} weight(s) of the model "
            f"({shown}); is this folder a checkpoint of this architecture?"
        )
    quantized = {name: located(name) for name in mxfp4_experts if located(name) not in stored}
    split = {name: pieces[name] for name in owners if located(name) is None and name in pieces}
    dense = {
        located(name): tensor
        for name, tensor in state.items()
        if name not in quantized and name not in split and located(name) is not None
    }
    dcp.load(dense, storage_reader=reader)
    for name, stem in quantized.items():
        _load_mxfp4(state[name], stem, folder, stored)
    if split:
        where = {key: path for path in files for key in _keys(path)}
        for name, positions in split.items():
            _load_pieces(state[name], name, positions(), where, folder)


def _keys(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as handle:
        return list(handle.keys())


def _load_pieces(
    param: torch.Tensor,
    name: str,
    positions: Mapping[str, torch.Tensor],
    where: Mapping[str, Path],
    folder: str | Path,
) -> None:
    """Fills this rank's shard of ``param`` from the stored tensors whose elements
    ``positions`` places in it (see :func:`load_hf_weights`)."""
    absent = sorted(key for key in positions if key not in where)
    if absent:
        raise ValueError(
            f"{folder}: the safetensors files lack {len(absent)} of the tensors that make up "
            f"{name} ({', '.join(absent[:3])}{' ...' if len(absent) > 3 else ''})"
        )
    local = param.to_local() if isinstance(param, DTensor) else param
    first = 0
    if isinstance(param, DTensor):  # FSDP2: rows split as torch.chunk splits them
        if tuple(param.placements) != (Shard(0),):
            raise ValueError(f"{name}: cannot load pieces into placements {param.placements}")
        rows, ranks = param.shape[0], param.device_mesh.size()
        first = min(param.device_mesh.get_local_rank() * -(-rows // ranks), rows)
    low = first * math.prod(param.shape[1:])  # this shard's first element in the whole
    high = low + local.numel()
    flat = local.view(-1)
    # this rank's pieces, by the file that holds them: each file is opened once
    wanted: dict[Path, list[tuple[str, torch.Tensor, torch.Tensor]]] = {}
    for key, places in positions.items():
        places = places.reshape(-1)
        mine = (places >= low) & (places < high)
        if bool(mine.any()):  # else another rank's piece
            wanted.setdefault(where[key], []).append((key, places, mine))
    with torch.no_grad():
        for path, keyed in wanted.items():
            with safe_open(str(path), framework="pt") as handle:
                for key, places, mine in keyed:
                    values = handle.get_tensor(key).reshape(-1)
                    if values.numel() != places.numel():
                        raise ValueError(
                            f"{folder}: {key} has {values.numel()} elements, {name} expects "
                            f"{places.numel()} from it"
                        )
                    flat[(places[mine] - low).to(flat.device)] = values[mine].to(flat)


def _load_mxfp4(param: torch.Tensor, stem: str, folder: str | Path, stored: Mapping) -> None:
    """Dequantizes ``stem``'s MXFP4 blocks into ``param`` (sharded on the experts, dim 0)."""
    sizes = {part: tuple(stored[f"{stem}_{part}"].size) for part in ("blocks", "scales")}
    experts, out_features, groups, _ = sizes["blocks"]
    expected = (experts, groups * mxfp4.BLOCK, out_features)
    if tuple(param.shape) != expected:
        raise ValueError(
            f"{folder}: the MXFP4 blocks of {stem} dequantize to {expected}, the model's "
            f"parameter is {tuple(param.shape)}"
        )
    local = param.to_local() if isinstance(param, DTensor) else param
    # buffers holding this rank's experts; DCP reads just those rows from the files
    parts = {}
    for part, size in sizes.items():
        buffer = torch.empty((local.shape[0], *size[1:]), dtype=torch.uint8, device=local.device)
        if isinstance(param, DTensor):
            buffer = DTensor.from_local(
                buffer, param.device_mesh, param.placements, shape=torch.Size(size),
                stride=torch.empty(size, device="meta").stride(),
            )  # fmt: skip
        parts[f"{stem}_{part}"] = buffer
    dcp.load(parts, storage_reader=dcp.HuggingFaceStorageReader(str(folder)))
    blocks, scales = (t.to_local() if isinstance(t, DTensor) else t for t in parts.values())
    with torch.no_grad():
        local.copy_(mxfp4.dequantize(blocks, scales, local.dtype).transpose(-1, -2))
