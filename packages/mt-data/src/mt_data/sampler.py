"""Global-batch samplers: which sample ids make up each optimizer step.

Every rank builds the same sampler with the same seed and so draws the same global batch; the
packer then gives each rank its share. Epoch ``e`` visits the samples in the order of a
permutation seeded by ``(seed, e)``, so the order depends only on the seed and the epoch, never on
how many steps ran before: the state is two integers (epoch, position) and a resumed run, on any
number of ranks, continues with exactly the same batches.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

__all__ = ["EpochSampler", "InfiniteSampler", "epoch_permutation"]


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The visiting order of epoch ``epoch``: a permutation of ``range(num_samples)``."""
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


class _SeededOrder:
    """Position in the endless sequence epoch 0, epoch 1, ... of seeded permutations."""

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.epoch = 0
        self.position = 0  # samples of the current epoch already handed out
        self._cached_epoch = -1
        self._cached_order = np.empty(0, dtype=np.int64)

    def _order(self) -> np.ndarray:
        if self._cached_epoch != self.epoch:
            self._cached_order = epoch_permutation(self.num_samples, self.seed, self.epoch)
            self._cached_epoch = self.epoch
        return self._cached_order

    def _take(self, count: int) -> np.ndarray:
        """Up to ``count`` ids from the current epoch; moves to the next epoch at its end."""
        taken = self._order()[self.position : self.position + count].copy()
        self.position += taken.size
        if self.position == self.num_samples:
            self.epoch += 1
            self.position = 0
        return taken

    def batches_per_epoch(self) -> int:
        """Batches that start in one epoch (an epoch sampler's last one may be short)."""
        return -(-self.num_samples // self.batch_size)

    def state_dict(self) -> dict[str, int]:
        """A few integers that restore the exact position (JSON- and weights_only-safe)."""
        return {
            "seed": self.seed,
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "epoch": self.epoch,
            "position": self.position,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue where ``state`` left off. The batch size may change; the data may not."""
        for key in ("seed", "num_samples"):
            if int(state[key]) != getattr(self, key):
                raise ValueError(
                    f"sampler state was saved with {key}={state[key]}, but this run has "
                    f"{key}={getattr(self, key)}: resume with the same data and seed"
                )
        if not 0 <= int(state["position"]) < self.num_samples:
            raise ValueError(f"sampler state has position {state['position']} out of range")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])


class InfiniteSampler(_SeededOrder):
    """Endless global batches of exactly ``batch_size`` ids.

    A batch that reaches the end of an epoch is completed from the next epoch's permutation, so
    there is never a short batch and training can be measured in steps, samples or tokens.
    """

    def __iter__(self) -> Iterator[np.ndarray]:
        return self

    def __next__(self) -> np.ndarray:
        parts = []
        missing = self.batch_size
        while missing:
            part = self._take(missing)
            parts.append(part)
            missing -= part.size
        return np.concatenate(parts)


class EpochSampler(_SeededOrder):
    """Global batches of one epoch at a time; the epoch's last batch may be short.

    Iterating yields the rest of the current epoch and then stops, with the sampler already at
    the start of the next epoch: ``for epoch in ...: for batch in sampler: ...``.
    """

    def __iter__(self) -> Iterator[np.ndarray]:
        epoch = self.epoch
        while self.epoch == epoch:
            yield self._take(self.batch_size)
