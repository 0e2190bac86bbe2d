"""Full training-state checkpoints for resume, with PyTorch distributed checkpointing.

Layout of ``<root>/step_<N>/``: the sharded model and optimizer state (DCP: each rank writes its
own shards, nothing is gathered on rank 0, and a checkpoint loads on any number of ranks),
``trainer_state.json`` (counters, sampler and schedule: plain JSON, never pickle) and
``rng_rank<R>.safetensors`` (each rank's random-number-generator states).

Everything is written into ``.step_<N>.tmp`` and renamed once complete, so a kill at any moment
leaves either the new checkpoint or none of it; :func:`latest_checkpoint` never sees a half one.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from mt_fsdp.distributed import barrier

__all__ = [
    "CheckpointError",
    "complete_checkpoints",
    "latest_checkpoint",
    "load_checkpoint",
    "load_model_weights",
    "save_checkpoint",
]

_NAME = re.compile(r"^step_(\d+)$")
_STATE_FILE = "trainer_state.json"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message says what is still intact."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def complete_checkpoints(root: Path) -> list[Path]:
    """The complete checkpoints under ``root``, oldest first (temporary folders are skipped)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found) if (p / _STATE_FILE).is_file()]


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or None."""
    found = complete_checkpoints(Path(root))
    return found[-1] if found else None


def save_checkpoint(
    root: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    keep_last: int | None = None,
    extra_tensors: dict[str, Any] | None = None,
) -> Path:
    """Write the training state of ``step`` to ``root/step_<step>`` (collective: every rank).

    ``trainer_state`` must be JSON (rank 0's copy is written); ``extra_tensors`` is more
    (possibly sharded) tensor state saved beside the model's, e.g. OSFT's frozen bases. With
    ``keep_last``, older complete checkpoints beyond that many are removed, but only after the new
    one is complete.
    """
    root = Path(root)
    final = root / f"step_{step}"
    temporary = root / f".step_{step}.tmp"
    rank = _rank()
    if rank == 0:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    barrier()
    try:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        if extra_tensors:
            state["extra"] = extra_tensors
        dcp.save(state, checkpoint_id=temporary)
        save_file(_rng_state(), temporary / f"rng_rank{rank}.safetensors")
        if rank == 0:
            _write_json(temporary / _STATE_FILE, {"step": step, **trainer_state})
    except OSError as error:
        previous = latest_checkpoint(root)
        if rank == 0:
            shutil.rmtree(temporary, ignore_errors=True)
        kept = (
            f"the previous checkpoint {previous} is intact"
            if previous
            else "no earlier checkpoint exists"
        )
        raise CheckpointError(f"writing checkpoint {final} failed ({error}); {kept}") from error
    barrier()
    if rank == 0:
        if final.exists():  # the same step written by an earlier attempt that was cut off
            shutil.rmtree(final)
        os.replace(temporary, final)
        if keep_last:
            for old in complete_checkpoints(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(
    folder: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    extra_tensors: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Restore model, optimizer, ``extra_tensors`` (in place) and this rank's RNG states from
    ``folder``; returns the trainer state. Works on a different number of ranks than the
    checkpoint was written with."""
    folder = Path(folder)
    state_file = folder / _STATE_FILE
    if not state_file.is_file():
        raise CheckpointError(f"{folder} is not a complete mt checkpoint (no {_STATE_FILE})")
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    if extra_tensors:
        state["extra"] = extra_tensors
    _safe_load(state, _SafeReader(folder), f"{folder}: cannot resume from this checkpoint")
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
    )
    # A rank that did not exist when the checkpoint was written takes rank 0's generator states.
    rng_file = folder / f"rng_rank{_rank()}.safetensors"
    _set_rng_state(load_file(rng_file if rng_file.is_file() else folder / "rng_rank0.safetensors"))
    return json.loads(state_file.read_text())


def load_model_weights(folder: str | Path, model: nn.Module) -> None:
    """Fill an unsharded ``model`` (in one process, e.g. on the CPU) with the weights of the
    checkpoint ``folder``, whatever number of ranks wrote it; the optimizer state is not read.
    Raises :class:`CheckpointError` when the checkpoint lacks one of the model's parameters."""
    folder = Path(folder)
    reader = _SafeReader(folder)
    try:
        stored = reader.read_metadata().state_dict_metadata
    except OSError as error:
        raise CheckpointError(f"{folder}: cannot read this checkpoint ({error})") from None
    # a parameter tied to another (the LM head to the embeddings) is filled through its owner
    owners = {name for name, _ in model.named_parameters()}
    missing = sorted(name for name in owners if f"model.{name}" not in stored)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise CheckpointError(
            f"{folder}: the checkpoint lacks {len(missing)} weight(s) of this model ({shown})"
        )
    wanted = {name: t for name, t in model.state_dict().items() if f"model.{name}" in stored}
    with warnings.catch_warnings():  # "no process group: loading in one process" - meant so
        warnings.simplefilter("ignore", UserWarning)
        _safe_load(
            {"model": wanted}, reader, f"{folder}: cannot read the model from this checkpoint"
        )


def _safe_load(state: dict[str, Any], reader: _SafeReader, failing: str) -> None:
    """``dcp.load`` through the restricted reader and planner, its failure as one line."""
    try:
        dcp.load(state, storage_reader=reader, planner=_SafePlanner())
    except CheckpointException as error:  # a BaseException: it would pass every handler
        failure = next(iter(error.failures.values()), error)
        if isinstance(failure, tuple):  # (exception, its traceback summary)
            failure = failure[0]
        reason = str(failure).strip().splitlines()[-1] if str(failure).strip() else repr(failure)
        raise CheckpointError(f"{failing} ({reason})") from None


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _write_json(path: Path, record: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as out:
        json.dump(record, out, indent=1, sort_keys=True)
        out.flush()
        os.fsync(out.fileno())


# DCP's own reader unpickles .metadata and its planner loads non-tensor items (optimizer
# hyperparameters) with weights_only=False: a checkpoint folder from elsewhere could run code.
# These two read the same files but accept only the classes a DCP checkpoint holds.
_METADATA_GLOBALS = {
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    *(
        ("torch.distributed.checkpoint.metadata", name)
        for name in (
            "BytesStorageMetadata", "ChunkStorageMetadata", "Metadata", "MetadataIndex",
            "StorageMeta", "TensorProperties", "TensorStorageMetadata", "_MEM_FORMAT_ENCODING",
        )
    ),
}  # fmt: skip


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_GLOBALS or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} has no place in a checkpoint's metadata")


class _SafeReader(dcp.FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        name = ".metadata" if rank is None else f"__{rank}.metadata"
        try:
            with open(Path(self.path) / name, "rb") as file:
                metadata = _MetadataUnpickler(file).load()
        except pickle.UnpicklingError as error:
            raise CheckpointError(
                f"{self.path} is not a checkpoint mt can read safely ({error})"
            ) from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{self.path}/{name} is not DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafePlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        # DefaultLoadPlanner.load_bytes with weights_only=True: plain values and containers only
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded
