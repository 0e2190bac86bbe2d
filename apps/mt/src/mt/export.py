"""``mt export CHECKPOINT --out=DIR``: a training-state checkpoint -> a Hugging Face model folder.

A checkpoint (``OUTPUT_DIR/checkpoints/step_<N>``) is a PyTorch distributed checkpoint written by
every rank of the run, the model under the key "model" beside the optimizer. Distributed
checkpoints reshard on load, so one CPU process reads it whatever the world size that wrote it:
the model is rebuilt from the run's resolved run file and its model's config.json (parameters on
the meta device, then given CPU memory), only the model's tensors are read (the optimizer state,
twice the model's size, stays on disk), and mt_fsdp.export_hf writes the folder atomically with
the tokenizer files of the run's model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mt.errors import CommandError

__all__ = ["export", "export_checkpoint"]

_DTYPES = ("float32", "bfloat16", "float16")


def export(
    checkpoint: str,
    out: str | None = None,
    dtype: str | None = None,
    save_dtype: str | None = None,
    model: str | None = None,
    **unknown: Any,
) -> None:
    """Write CHECKPOINT's model as a HF folder at --out (see ``mt export --help``)."""
    for key in unknown:
        raise CommandError(
            f"export: unknown option --{key}; the options are --out, --dtype, --model"
        )
    if out is None:
        raise CommandError("export needs --out=DIR, the folder to write")
    if dtype is not None and save_dtype is not None and dtype != save_dtype:
        raise CommandError("--dtype and --save_dtype disagree; give one")
    chosen = dtype or save_dtype
    if chosen is not None and str(chosen).removeprefix("torch.") not in _DTYPES:
        raise CommandError(f"--dtype: expected one of {', '.join(_DTYPES)}, got {chosen!r}")
    folder = export_checkpoint(
        str(checkpoint), Path(str(out)), None if chosen is None else str(chosen).removeprefix("torch."),
        model,
    )  # fmt: skip
    print(f"wrote {folder}")


def _checkpoint_folder(path: Path) -> Path:
    """The checkpoint itself, or the newest one of a run's output_dir."""
    if (path / "trainer_state.json").is_file():
        return path
    from mt_fsdp import latest_checkpoint

    newest = latest_checkpoint(path / "checkpoints") if path.is_dir() else None
    if newest is not None:
        print(f"newest checkpoint of {path}: {newest}")
        return newest
    if not path.exists():
        raise CommandError(f"{path}: no such checkpoint folder")
    raise CommandError(
        f"{path} is not a complete mt checkpoint (no trainer_state.json); give "
        "OUTPUT_DIR/checkpoints/step_<N> or a run's OUTPUT_DIR"
    )


def _model_folder(name: str, trust_remote_code: bool = False) -> Path:
    """A local model folder with config.json; for a hub name, its config and tokenizer only."""
    from mt_core.config import ConfigError
    from mt_fsdp import TOKENIZER_FILES

    path = Path(name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CommandError(f"--model: {path} has no config.json")
        return path
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise CommandError(
            f"the run's model {name} is not here; give its config and tokenizer with --model=PATH"
        )
    from huggingface_hub import snapshot_download

    try:  # the config and tokenizer: never the weights, the checkpoint has them
        patterns = ["config.json", "generation_config.json", *TOKENIZER_FILES]
        patterns += ["*.py"] if trust_remote_code else []  # the model's own code, when trusted
        return Path(snapshot_download(name, allow_patterns=patterns))
    except Exception as error:
        raise ConfigError(
            [f"model {name!r} is no local folder and its config could not be downloaded "
             f"({type(error).__name__}); give it with --model=PATH"]
        ) from error  # fmt: skip


def export_checkpoint(
    checkpoint: str, target: Path, dtype: str | None = None, model_path: str | None = None
) -> Path:
    """Export ``checkpoint``'s model to ``target`` in ``dtype`` (None: the run's save_dtype, else
    the model's own dtype); returns ``target``."""
    folder = _checkpoint_folder(Path(checkpoint))
    if target.exists():
        raise CommandError(f"--out: {target} exists already; choose a new folder")
    run_file = folder.parent.parent / "run.toml"
    if not run_file.is_file():
        raise CommandError(
            f"{run_file} is missing: mt export reads the run file that wrote {folder} "
            "(OUTPUT_DIR/run.toml) to rebuild its model"
        )
    from mt_core.config import load_run_file

    args = load_run_file(run_file)
    source = _model_folder(model_path or args.model_name_or_path, args.trust_remote_code)

    from transformers import AutoConfig

    from mt_core.model.build import TORCH_DTYPES
    from mt_core.model.families import export_model
    from mt_core.trainer.after_step import export_dtype_of

    config = AutoConfig.from_pretrained(source, trust_remote_code=args.trust_remote_code)
    network = _load_model(folder, config, TORCH_DTYPES[args.train_dtype], args.trust_remote_code)
    # the trainer's own rule for its exports, with --dtype first
    export_model(
        network, target, save_dtype=export_dtype_of(args, config, dtype), source_folder=source
    )
    return target


def _load_model(folder: Path, config, master, trust_remote_code: bool):
    """The model of ``config`` on the CPU, its weights read from the distributed checkpoint."""
    import torch

    from mt_core.model.families import new_model
    from mt_fsdp import CheckpointError, load_model_weights, materialize, parameters_on_meta

    with parameters_on_meta():
        network = new_model(config, master, trust_remote_code)
    materialize(network, torch.device("cpu"), lambda module: None)
    try:
        load_model_weights(folder, network)
    except CheckpointError as error:
        hint = "; is --model the model this run trained?" if "lacks" in str(error) else ""
        raise CommandError(f"{error}{hint}") from None
    network.eval()
    return network
