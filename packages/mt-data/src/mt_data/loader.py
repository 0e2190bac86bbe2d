"""One optimizer step's data for one rank: sample a global batch, pack it, collate our share.

Every rank runs the same sampler and the same deterministic packer on the same lengths, so all
ranks agree on the whole plan without communicating; each then collates only its own
minibatches. The state to checkpoint is the sampler's.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from mt_data.collate import PackedMinibatch, collate_minibatch
from mt_data.sampler import EpochSampler, InfiniteSampler
from mt_data.sources import TokenSource
from mt_packing import pack_minibatches

__all__ = ["StepBatch", "StepLoader"]


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
    ) -> None:
        longest = int(np.max(source.lengths))
        if longest > max_tokens_per_rank:
            raise ValueError(
                f"the source holds an item of {longest} tokens, more than "
                f"max_tokens_per_rank={max_tokens_per_rank}: filter it first (SampleDataset)"
            )
        self.source = source
        self.sampler = sampler
        self.max_tokens_per_rank = int(max_tokens_per_rank)
        self.num_ranks = int(num_ranks)
        self.rank = int(rank)

    def __iter__(self) -> Iterator[StepBatch]:
        for batch in self.sampler:
            yield self.step_batch(batch)

    def step_batch(self, batch: np.ndarray) -> StepBatch:
        """Pack and collate one global batch of item ids."""
        batch = np.asarray(batch, dtype=np.int64)
        lengths = self.source.lengths[batch]
        num_loss_tokens = int(self.source.loss_counts[batch].sum())
        plan = pack_minibatches(lengths, self.max_tokens_per_rank, self.num_ranks, self.rank)
        minibatches = [
            collate_minibatch(self.source, batch[positions], num_loss_tokens) for positions in plan
        ]
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
