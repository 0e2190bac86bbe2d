"""Balanced assignment of one global batch to ranks and minibatches (LPT rule).

A plan has ``num_minibatches * num_ranks`` slots, each holding at most ``max_tokens_per_rank``
tokens. Samples are placed longest first, each into the currently least-loaded slot (Graham's
Longest Processing Time rule). Because the least-loaded slot of the whole plan is also the
least-loaded slot of its own minibatch, every minibatch obeys the list-scheduling bound
``max_rank_load <= mean_rank_load + (1 - 1/m) * longest_sample``, and a minibatch that fits in a
single round is within ``4/3 - 1/(3m)`` of the optimal makespan.

If the least-loaded slot cannot take a sample, no slot can, so that number of minibatches is
infeasible for LPT and the next one is tried, starting from the volume lower bound.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["pack_minibatches", "lpt_slot_assignment"]


@njit(cache=True)
def _sift_down(heap_load, heap_slot, size, pos):
    """Restore the min-heap order (load, then slot index) below ``pos``."""
    while True:
        left = 2 * pos + 1
        if left >= size:
            return
        child = left
        right = left + 1
        if right < size and (
            heap_load[right] < heap_load[left]
            or (heap_load[right] == heap_load[left] and heap_slot[right] < heap_slot[left])
        ):
            child = right
        if heap_load[child] < heap_load[pos] or (
            heap_load[child] == heap_load[pos] and heap_slot[child] < heap_slot[pos]
        ):
            heap_load[pos], heap_load[child] = heap_load[child], heap_load[pos]
            heap_slot[pos], heap_slot[child] = heap_slot[child], heap_slot[pos]
            pos = child
        else:
            return


@njit(cache=True)
def _lpt_place(lengths_desc, num_slots, capacity, slot_of_sorted):
    """Place samples (sorted longest first) into ``num_slots`` slots; False if one overflows.

    Ties in load go to the lowest slot index, which makes the plan deterministic.
    """
    heap_load = np.zeros(num_slots, dtype=np.int64)
    heap_slot = np.arange(num_slots).astype(np.int64)
    for i in range(lengths_desc.shape[0]):
        length = lengths_desc[i]
        if heap_load[0] + length > capacity:
            return False
        slot_of_sorted[i] = heap_slot[0]
        heap_load[0] += length
        _sift_down(heap_load, heap_slot, num_slots, 0)
    return True


@njit(cache=True)
def _lpt_plan(lengths_desc, num_ranks, capacity, first_num_minibatches):
    """Smallest minibatch count (from ``first_num_minibatches`` up) for which LPT fits."""
    num_samples = lengths_desc.shape[0]
    slot_of_sorted = np.empty(num_samples, dtype=np.int64)
    num_minibatches = first_num_minibatches
    # With at least as many slots as samples every sample gets an empty slot, so this ends.
    while not _lpt_place(lengths_desc, num_minibatches * num_ranks, capacity, slot_of_sorted):
        num_minibatches += 1
    return num_minibatches, slot_of_sorted


def _validated_lengths(lengths, max_tokens_per_rank: int, num_ranks: int) -> np.ndarray:
    if isinstance(max_tokens_per_rank, bool) or not isinstance(
        max_tokens_per_rank, (int, np.integer)
    ):
        raise TypeError(f"max_tokens_per_rank must be an int, got {max_tokens_per_rank!r}")
    if isinstance(num_ranks, bool) or not isinstance(num_ranks, (int, np.integer)):
        raise TypeError(f"num_ranks must be an int, got {num_ranks!r}")
    if max_tokens_per_rank < 1:
        raise ValueError(f"max_tokens_per_rank must be >= 1, got {max_tokens_per_rank}")
    if num_ranks < 1:
        raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
    array = np.asarray(lengths)
    if array.ndim != 1:
        raise ValueError(f"lengths must be one-dimensional, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"lengths must be integers, got dtype {array.dtype}")
    array = array.astype(np.int64, copy=False)
    if array.size:
        shortest = int(np.argmin(array))
        if array[shortest] < 1:
            raise ValueError(
                f"sample {shortest} has length {int(array[shortest])}; every sample needs >= 1 token"
            )
        longest = int(np.argmax(array))
        if array[longest] > max_tokens_per_rank:
            too_long = np.flatnonzero(array > max_tokens_per_rank)
            raise ValueError(
                f"sample {longest} has length {int(array[longest])}, more than "
                f"max_tokens_per_rank={max_tokens_per_rank} ({too_long.size} sample(s) too long, "
                f"indices {too_long[:10].tolist()}{' ...' if too_long.size > 10 else ''}); "
                "drop or truncate them, or raise the limit"
            )
    return array


def lpt_slot_assignment(
    lengths, max_tokens_per_rank: int, num_ranks: int
) -> tuple[int, np.ndarray]:
    """Return ``(num_minibatches, slot)`` where ``slot[i] = minibatch * num_ranks + rank``.

    This is the raw plan behind :func:`pack_minibatches`, useful when only loads are needed.
    """
    array = _validated_lengths(lengths, max_tokens_per_rank, num_ranks)
    if array.size == 0:
        return 0, np.empty(0, dtype=np.int64)
    order = np.argsort(-array, kind="stable")  # longest first; equal lengths by index
    capacity_per_minibatch = num_ranks * max_tokens_per_rank
    lower_bound = max(1, -(-int(array.sum()) // capacity_per_minibatch))
    num_minibatches, slot_of_sorted = _lpt_plan(
        array[order], num_ranks, max_tokens_per_rank, lower_bound
    )
    slot = np.empty_like(slot_of_sorted)
    slot[order] = slot_of_sorted
    return int(num_minibatches), slot


def pack_minibatches(
    lengths, max_tokens_per_rank: int, num_ranks: int, rank: int | None = None
) -> list[list[np.ndarray]] | list[np.ndarray]:
    """Split one global batch over ``num_ranks`` ranks and into token-limited minibatches.

    Args:
        lengths: token count of every sample of the global batch (1-D, integers >= 1).
        max_tokens_per_rank: most tokens one rank may hold in one minibatch.
        num_ranks: number of data-parallel ranks.
        rank: return only this rank's minibatches; ``None`` returns every rank's.

    Returns:
        For each rank (or for ``rank`` alone) the list of its minibatches, each a sorted int64
        array of indices into ``lengths``. Every rank has the same number of minibatches (the
        smallest for which the LPT placement fits); a slot without samples is an empty array.

    Raises:
        ValueError: a sample is longer than ``max_tokens_per_rank`` (its index and length are
            named), a length is below 1, or a count is out of range.
    """
    if rank is not None and not 0 <= rank < num_ranks:
        raise ValueError(f"rank must be in [0, {num_ranks}), got {rank}")
    num_minibatches, slot = lpt_slot_assignment(lengths, max_tokens_per_rank, num_ranks)
    by_slot = np.argsort(slot, kind="stable")  # indices grouped by slot, ascending within
    bounds = np.searchsorted(slot[by_slot], np.arange(num_minibatches * num_ranks + 1))
    ranks = range(num_ranks) if rank is None else (rank,)
    plan = [
        [
            by_slot[bounds[mb * num_ranks + r] : bounds[mb * num_ranks + r + 1]]
            for mb in range(num_minibatches)
        ]
        for r in ranks
    ]
    return plan if rank is None else plan[0]
