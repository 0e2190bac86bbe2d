"""Balanced assignment of one global batch to ranks and minibatches (LPT rule).

A plan has ``num_minibatches * num_ranks`` slots (``slot = minibatch * num_ranks + rank``), each
holding at most ``max_tokens_per_rank`` tokens. Samples are always placed longest first (equal
lengths by index), and a plan is made in two steps.

1. The count. Plain LPT (Graham's Longest Processing Time rule) puts each sample into the
   least-loaded slot of the whole plan (ties: lowest slot). If that slot cannot take the sample,
   no slot can, so the count is infeasible for LPT and the next one is tried, starting from the
   volume lower bound ``ceil(total / (num_ranks * max_tokens_per_rank))``. The number of
   minibatches is the smallest for which plain LPT fits.

2. The placement, at that count. Plain LPT balances all slots alike, so a long sample can land in
   a minibatch whose other ranks stay light (with ~8 samples per slot, 1.07 max/mean per
   minibatch). The balance-aware placement puts each sample into the least-loaded slot (ties:
   lowest slot) among those where it fits without raising its minibatch's current most loaded
   rank; if there is none, into the least-loaded slot of the whole plan, as plain LPT does. Of the
   two placements the plan keeps the one with the lower step cost, the sum over minibatches of the
   most loaded rank's tokens (ties, or a balance-aware placement that does not fit: plain LPT).
   Neither is always the better one.

Both placements put every sample into the least-loaded slot of its own minibatch, so every
minibatch obeys the list-scheduling bound ``max_rank_load <= mean_rank_load + (1 - 1/m) *
longest_sample``. With one minibatch both are plain LPT, within ``4/3 - 1/(3m)`` of the optimal
makespan.

Cost: plain LPT is O(n log(slots)) per count tried; the balance-aware placement scans the
minibatches for each sample, O(n * num_minibatches).
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
    """Plain LPT: samples (sorted longest first) into ``num_slots`` slots; False if one overflows.

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
def _balanced_place(lengths_desc, num_minibatches, num_ranks, capacity, slot_of_sorted):
    """Balance-aware LPT at a fixed minibatch count; False if a sample does not fit.

    Each sample goes into the least-loaded slot among those where it does not raise its
    minibatch's most loaded rank, else into the least-loaded slot of the plan. Ties go to the
    lowest slot index (lowest minibatch, then lowest rank). One min-heap of rank loads per
    minibatch: its top is the minibatch's least-loaded rank.
    """
    heap_load = np.zeros((num_minibatches, num_ranks), dtype=np.int64)
    heap_rank = np.empty((num_minibatches, num_ranks), dtype=np.int64)
    for mb in range(num_minibatches):
        for r in range(num_ranks):
            heap_rank[mb, r] = r
    top = np.zeros(num_minibatches, dtype=np.int64)  # most loaded rank's tokens per minibatch
    for i in range(lengths_desc.shape[0]):
        length = lengths_desc[i]
        best = -1
        best_load = 0
        # With one rank the only slot is the most loaded one: every sample raises it.
        if num_ranks > 1:
            for mb in range(num_minibatches):
                load = heap_load[mb, 0]
                if load + length <= top[mb] and (best < 0 or load < best_load):
                    best = mb
                    best_load = load
        if best < 0:
            best = 0
            best_load = heap_load[0, 0]
            for mb in range(1, num_minibatches):
                if heap_load[mb, 0] < best_load:
                    best = mb
                    best_load = heap_load[mb, 0]
            if best_load + length > capacity:
                return False
        slot_of_sorted[i] = best * num_ranks + heap_rank[best, 0]
        heap_load[best, 0] = best_load + length
        if best_load + length > top[best]:
            top[best] = best_load + length
        _sift_down(heap_load[best], heap_rank[best], num_ranks, 0)
    return True


@njit(cache=True)
def _step_cost(lengths_desc, slot_of_sorted, num_minibatches, num_ranks):
    """Sum over minibatches of the most loaded rank's tokens."""
    loads = np.zeros(num_minibatches * num_ranks, dtype=np.int64)
    for i in range(lengths_desc.shape[0]):
        loads[slot_of_sorted[i]] += lengths_desc[i]
    cost = 0
    for mb in range(num_minibatches):
        most = 0
        for r in range(num_ranks):
            most = max(most, loads[mb * num_ranks + r])
        cost += most
    return cost


@njit(cache=True)
def _lpt_plan(lengths_desc, num_ranks, capacity, first_num_minibatches, balance_minibatches):
    """Smallest minibatch count (from ``first_num_minibatches`` up) for which plain LPT fits, and
    the placement at that count (the cheaper of plain and balance-aware LPT when asked)."""
    num_samples = lengths_desc.shape[0]
    slot_of_sorted = np.empty(num_samples, dtype=np.int64)
    num_minibatches = first_num_minibatches
    # With at least as many slots as samples every sample gets an empty slot, so this ends.
    while not _lpt_place(lengths_desc, num_minibatches * num_ranks, capacity, slot_of_sorted):
        num_minibatches += 1
    if balance_minibatches and num_minibatches > 1 and num_ranks > 1:
        # (One minibatch or one rank: the balance-aware placement is plain LPT itself.)
        balanced = np.empty(num_samples, dtype=np.int64)
        fits = _balanced_place(lengths_desc, num_minibatches, num_ranks, capacity, balanced)
        if fits and _step_cost(lengths_desc, balanced, num_minibatches, num_ranks) < _step_cost(
            lengths_desc, slot_of_sorted, num_minibatches, num_ranks
        ):
            return num_minibatches, balanced
    return num_minibatches, slot_of_sorted


@njit(cache=True)
def _group_by_slot(slot, num_slots):
    """Counting sort: sample indices grouped by slot (ascending within one), and the bounds of
    each slot's group (``num_slots + 1`` offsets). Same result as a stable argsort, in O(n)."""
    bounds = np.zeros(num_slots + 1, dtype=np.int64)
    for i in range(slot.shape[0]):
        bounds[slot[i] + 1] += 1
    for s in range(num_slots):
        bounds[s + 1] += bounds[s]
    fill = bounds[:-1].copy()
    by_slot = np.empty(slot.shape[0], dtype=np.int64)
    for i in range(slot.shape[0]):
        by_slot[fill[slot[i]]] = i
        fill[slot[i]] += 1
    return by_slot, bounds


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
    lengths, max_tokens_per_rank: int, num_ranks: int, *, balance_minibatches: bool = True
) -> tuple[int, np.ndarray]:
    """Return ``(num_minibatches, slot)`` where ``slot[i] = minibatch * num_ranks + rank``.

    This is the raw plan behind :func:`pack_minibatches`, useful when only loads are needed.
    ``num_minibatches`` is the smallest count for which plain LPT fits (0 for an empty batch).
    By default ``slot`` is the placement :func:`pack_minibatches` uses at that count: the
    balance-aware one where it fits and has a lower sum over minibatches of the most loaded
    rank's tokens, else plain LPT's (see the module docstring). ``balance_minibatches=False``
    gives plain LPT's placement (longest first, into the least-loaded slot, ties to the lowest
    slot); the count is the same either way.
    """
    array = _validated_lengths(lengths, max_tokens_per_rank, num_ranks)
    if array.size == 0:
        return 0, np.empty(0, dtype=np.int64)
    order = np.argsort(-array, kind="stable")  # longest first; equal lengths by index
    capacity_per_minibatch = num_ranks * max_tokens_per_rank
    lower_bound = max(1, -(-int(array.sum()) // capacity_per_minibatch))
    num_minibatches, slot_of_sorted = _lpt_plan(
        array[order], num_ranks, max_tokens_per_rank, lower_bound, bool(balance_minibatches)
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
        smallest for which plain LPT fits); a slot without samples is an empty array. Samples
        are placed by the cheaper of plain and balance-aware LPT at that count (module
        docstring).

    Raises:
        ValueError: a sample is longer than ``max_tokens_per_rank`` (its index and length are
            named), a length is below 1, or a count is out of range.
    """
    if rank is not None and not 0 <= rank < num_ranks:
        raise ValueError(f"rank must be in [0, {num_ranks}), got {rank}")
    num_minibatches, slot = lpt_slot_assignment(lengths, max_tokens_per_rank, num_ranks)
    by_slot, bounds = _group_by_slot(slot, num_minibatches * num_ranks)
    ranks = range(num_ranks) if rank is None else (rank,)
    plan = [
        [
            by_slot[bounds[mb * num_ranks + r] : bounds[mb * num_ranks + r + 1]]
            for mb in range(num_minibatches)
        ]
        for r in ranks
    ]
    return plan if rank is None else plan[0]
