"""A held-out validation share of a source, the same on every rank and every run of a seed."""

from __future__ import annotations

import numpy as np

from mt_data.sources import TokenSource

__all__ = ["Subset", "split_validation"]


class Subset:
    """The items ``indices`` of ``source``, as a source of their own."""

    def __init__(self, source: TokenSource, indices: np.ndarray) -> None:
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        self.lengths = source.lengths[self.indices]
        self.loss_counts = source.loss_counts[self.indices]

    def __len__(self) -> int:
        return int(self.indices.size)

    def item(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.source.item(int(self.indices[index]))

    def location(self, index: int) -> str:
        return self.source.location(int(self.indices[index]))


def split_validation(
    source: TokenSource, fraction: float, seed: int
) -> tuple[TokenSource, Subset | None]:
    """``(train, validation)``: ``round(fraction * n)`` items (at least one) drawn by a seeded
    permutation are held out; ``fraction`` 0 holds out nothing (validation None)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0:
        return source, None
    n = len(source)
    count = max(1, round(fraction * n))
    if count >= n:
        raise ValueError(f"a validation share of {fraction} leaves no training item of {n}")
    # A generator of its own (seed, 1): the split never moves with the training order's seed use.
    order = np.random.default_rng([seed, 1]).permutation(n)
    held_out = np.sort(order[:count])
    kept = np.sort(order[count:])
    return Subset(source, kept), Subset(source, held_out)
