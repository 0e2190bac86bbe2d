"""The run's data: store, training and validation sources, sampler and step loader."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

from mt_core.config import ConfigError, TrainingArgs
from mt_core.model.float8 import token_multiple
from mt_data import (
    DataError,
    EpochSampler,
    InfiniteSampler,
    PretrainingBlocks,
    SampleDataset,
    StepLoader,
    TokenSource,
    open_token_store,
    split_validation,
)
from mt_fsdp import DistContext

__all__ = ["RunData", "build_data", "data_cache_dir"]


@dataclass
class RunData:
    train: TokenSource
    validation: TokenSource | None
    sampler: EpochSampler | InfiniteSampler
    loader: StepLoader


def data_cache_dir(args: TrainingArgs) -> Path:
    """Where this node keeps the run's token stores: data_cache_dir with this node's
    $VARIABLES and ~ expanded, or output_dir/data_cache."""
    if args.data_cache_dir is None:
        return Path(args.output_dir) / "data_cache"
    folder = os.path.expanduser(os.path.expandvars(args.data_cache_dir))
    unset = re.findall(r"\$\{?(\w+)", folder)  # expandvars leaves unset variables as they are
    if unset:
        raise ConfigError(
            [f"data_cache_dir: ${unset[0]} is not set on {socket.gethostname()}; set it in "
             "the environment of every node, or give a folder without it"]
        )  # fmt: skip
    return Path(folder)


def build_data(args: TrainingArgs, ctx: DistContext, vocab_size: int, cache_dir: Path) -> RunData:
    """Validate the data into memory-mapped stores in ``cache_dir`` (built once per folder, by
    whichever process of those sharing it comes first; the others wait and map the same files),
    cut it into training items and the validation share, and set up the sampler and packer."""
    groups = ctx.data_parallel_size
    if args.batch_size < groups:
        # The packer would leave a rank without any sample in every step: legal, but never
        # what was meant (it computes nothing there), so it is refused rather than run.
        what = (
            f"{groups} ranks" if groups == ctx.world_size else f"{groups} sequence-parallel groups"
        )
        raise ConfigError(
            [f"batch_size: {args.batch_size} is less than the {what} of this run, "
             "so some rank would get no sample in any step; set batch_size to at least "
             f"{groups} or start fewer processes"]
        )  # fmt: skip
    source = _source(args.data_path, "data_path", args, vocab_size, cache_dir)
    train, validation = split_validation(source, args.validation_split, args.seed)
    if args.validation_data_path is not None:
        validation = _source(
            args.validation_data_path, "validation_data_path", args, vocab_size, cache_dir
        )
    sampler_type = EpochSampler if args.training_mode == "epoch" else InfiniteSampler
    sampler = sampler_type(len(train), args.batch_size, seed=args.seed)
    loader = StepLoader(
        train, sampler, args.max_tokens_per_gpu, ctx.world_size, ctx.rank,
        args.sequence_parallel_size, token_multiple(args.float8),
    )  # fmt: skip
    return RunData(train, validation, sampler, loader)


def _source(
    path: str, key: str, args: TrainingArgs, vocab_size: int, cache_dir: Path
) -> TokenSource:
    """One JSONL file as training items: samples, or pretraining blocks."""
    if not Path(path).is_file():
        raise DataError(
            [f"{path}: {key} does not exist or is not a file; set {key} to a JSONL file of "
             "tokenized samples"]
        )  # fmt: skip
    store = open_token_store(path, cache_dir=cache_dir, require_labels=args.pretraining is None)
    store.check_token_range(vocab_size)
    if args.pretraining is not None:
        return PretrainingBlocks(
            store, args.pretraining.block_size, args.pretraining.segment_documents
        )
    # a row holds sequence_parallel_size x max_tokens_per_gpu tokens; messages name the keys
    size = args.sequence_parallel_size
    limit_name = "max_tokens_per_gpu" + (" x sequence_parallel_size" if size > 1 else "")
    return SampleDataset(
        store, args.max_tokens_per_gpu * size, args.too_long_samples, limit_name=limit_name
    )
