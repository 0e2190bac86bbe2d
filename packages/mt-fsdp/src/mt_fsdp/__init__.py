"""FSDP2 for mt: process group, per-block sharding, sharded HF loading, HF export."""

from mt_fsdp.checkpoint import (
    CheckpointError,
    complete_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    load_model_weights,
    save_checkpoint,
)
from mt_fsdp.distributed import DistContext, exit_rank, init_distributed, shutdown_distributed
from mt_fsdp.export import TOKENIZER_FILES, export_hf
from mt_fsdp.load import load_hf_weights, materialize, parameters_on_meta
from mt_fsdp.shard import decoder_blocks, reshard_all, shard_model

__all__ = [
    "CheckpointError",
    "complete_checkpoints",
    "latest_checkpoint",
    "load_checkpoint",
    "load_model_weights",
    "save_checkpoint",
    "TOKENIZER_FILES",
    "DistContext",
    "decoder_blocks",
    "exit_rank",
    "export_hf",
    "init_distributed",
    "load_hf_weights",
    "materialize",
    "parameters_on_meta",
    "reshard_all",
    "shard_model",
    "shutdown_distributed",
]
