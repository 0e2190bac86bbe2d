"""One optimizer step's data for one rank: sample a global batch, pack it, collate our share.

Every rank runs the same sampler and the same deterministic packer on the same lengths, so all
ranks agree on the whole plan without communicating; each then collates only its own
minibatches. The state to checkpoint is the sampler's.

With sequence parallelism, ``sequence_parallel_size`` consecutive ranks form a group that computes
one row of up to ``sequence_parallel_size x max_tokens_per_rank`` tokens together: the packer
balances the batch over the groups, and each rank takes its consecutive part of its group's rows
(:func:`mt_data.collate.sequence_shard`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from mt_data.collate import PackedMinibatch, collate_minibatch, sequence_shard
from mt_data.sampler import EpochSampler, InfiniteSampler
from mt_data.sources import TokenSource
from mt_packing import pack_minibatches

__all__ = ["StepBatch", "StepLoader", "rank_minibatches"]


@dataclass(frozen=True)
class StepBatch:
    """This rank's minibatches of one global batch, and the global batch's totals."""

    minibatches: list[PackedMinibatch]  # the same count on every rank; some may be empty
    num_samples: int  # in the global batch, all ranks
    num_tokens: int  # in the global batch, all ranks
    num_loss_tokens: int  # targets in the global batch, all ranks: the loss denominator


class StepLoader:
    """Turns a sampler's global batches into this rank's padding-free minibatches."""

    def __init__(
        self,
        source: TokenSource,
        sampler: InfiniteSampler | EpochSampler,
        max_tokens_per_rank: int,
        num_ranks: int = 1,
        rank: int = 0,
        sequence_parallel_size: int = 1,
        token_multiple: int = 1,
    ) -> None:
        if num_ranks % sequence_parallel_size:
            raise ValueError(
                f"sequence_parallel_size={sequence_parallel_size} does not divide "
                f"num_ranks={num_ranks}"
            )
        longest = int(np.max(source.lengths))
        row = max_tokens_per_rank * sequence_parallel_size
        if longest > row:
            limit = f"max_tokens_per_rank={max_tokens_per_rank}"
            if sequence_parallel_size > 1:
                limit = f"a row's {row} ({limit} x sequence_parallel_size={sequence_parallel_size})"
            raise ValueError(
                f"the source holds an item of {longest} tokens, more than {limit}: "
                "filter it first (SampleDataset)"
            )
        self.source = source
        self.sampler = sampler
        self.max_tokens_per_rank = int(max_tokens_per_rank)
        self.num_ranks = int(num_ranks)
        self.rank = int(rank)
        self.sequence_parallel_size = int(sequence_parallel_size)
        self.token_multiple = int(token_multiple)

    def __iter__(self) -> Iterator[StepBatch]:
        for batch in self.sampler:
            yield self.step_batch(batch)

    def step_batch(self, batch: np.ndarray) -> StepBatch:
        """Pack and collate one global batch of item ids."""
        batch = np.asarray(batch, dtype=np.int64)
        lengths = self.source.lengths[batch]
        num_loss_tokens = int(self.source.loss_counts[batch].sum())
        minibatches = rank_minibatches(
            self.source, batch, num_loss_tokens, self.max_tokens_per_rank, self.num_ranks,
            self.rank, self.sequence_parallel_size, self.token_multiple,
        )  # fmt: skip
        return StepBatch(
            minibatches=minibatches,
            num_samples=int(batch.size),
            num_tokens=int(lengths.sum()),
            num_loss_tokens=num_loss_tokens,
        )

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.load_state_dict(state)


def rank_minibatches(
    source: TokenSource,
    batch: np.ndarray,
    global_num_loss_tokens: int,
    max_tokens_per_rank: int,
    num_ranks: int,
    rank: int,
    sequence_parallel_size: int = 1,
    token_multiple: int = 1,
) -> list[PackedMinibatch]:
    """``rank``'s minibatches of the items ``batch`` of ``source``: the batch is packed over the
    ``num_ranks / sequence_parallel_size`` groups of ranks, into rows of at most
    ``max_tokens_per_rank x sequence_parallel_size`` tokens, and ``rank`` takes its part of each
    of its group's rows, filled to a multiple of ``token_multiple`` tokens
    (:func:`mt_data.collate.sequence_shard`). Every rank gets the same number of minibatches; an
    empty one on a rank without sequence parallelism or a token multiple has no token."""
    size = sequence_parallel_size
    plan = pack_minibatches(
        source.lengths[batch], max_tokens_per_rank * size, num_ranks // size, rank // size
    )
    return [
        sequence_shard(
            collate_minibatch(source, batch[positions], global_num_loss_tokens),
            size,
            rank % size,
            token_multiple,
        )  # fmt: skip
        for positions in plan
    ]
