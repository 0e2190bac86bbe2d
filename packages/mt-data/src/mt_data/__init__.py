"""mt-data: the data pipeline of mt, numpy only (no torch).

JSONL -> validated, memory-mapped token store -> seeded global batches -> LPT packing across
ranks and minibatches -> padding-free rows (input_ids, labels, position_ids, cu_seqlens).
"""

from mt_data.collate import PackedMinibatch, collate_minibatch, sequence_shard
from mt_data.errors import DataError, DataWarning
from mt_data.loader import StepBatch, StepLoader, rank_minibatches
from mt_data.sampler import EpochSampler, InfiniteSampler, epoch_permutation
from mt_data.sources import IGNORE_INDEX, PretrainingBlocks, SampleDataset, TokenSource
from mt_data.split import Subset, split_validation
from mt_data.store import TokenStore, open_token_store

__all__ = [
    "IGNORE_INDEX",
    "DataError",
    "DataWarning",
    "EpochSampler",
    "InfiniteSampler",
    "PackedMinibatch",
    "PretrainingBlocks",
    "SampleDataset",
    "StepBatch",
    "StepLoader",
    "Subset",
    "TokenSource",
    "TokenStore",
    "collate_minibatch",
    "epoch_permutation",
    "open_token_store",
    "rank_minibatches",
    "sequence_shard",
    "split_validation",
]
__version__ = "0.1.0"
