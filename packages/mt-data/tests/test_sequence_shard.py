"""Sequence-parallel rows: the parts of a group's ranks put together are the row, plus a filler
segment that no document sees and that has no target."""

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mt_data import (
    InfiniteSampler,
    SampleDataset,
    StepLoader,
    collate_minibatch,
    rank_minibatches,
    sequence_shard,
)


@pytest.fixture
def dataset(make_store, sft_row):
    rng = np.random.default_rng(0)
    lengths = [int(n) for n in rng.integers(2, 64, 40)]  # up to a row of 2 x 32
    rows = [sft_row(rng.integers(0, 1000, n).tolist(), masked=int(rng.integers(0, n - 1)))
            for n in lengths]  # fmt: skip
    return SampleDataset(make_store(rows))


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ids=st.lists(st.integers(0, 39), max_size=6, unique=True),
    size=st.integers(1, 5),
    multiple=st.sampled_from([1, 3, 16]),
)
def test_parts_make_the_row_and_a_filler_that_adds_nothing(dataset, ids, size, multiple):
    unit = size * multiple
    assume(unit > 1)  # size = multiple = 1 is the row itself (below)
    row = collate_minibatch(dataset, np.array(ids, dtype=np.int64), global_num_loss_tokens=7)
    parts = [sequence_shard(row, size, index, multiple) for index in range(size)]
    filled = parts[0].cu_seqlens[-1]
    filler = filled - row.num_tokens
    # equal parts of a multiple of `multiple` tokens, together a multiple of size x multiple
    # (at least that), less than size x multiple tokens added (exactly that to an empty row)
    assert {p.num_tokens for p in parts} == {filled // size}
    assert parts[0].num_tokens % multiple == 0
    assert filled % unit == 0 and filled >= unit and 0 <= filler < unit + (row.num_tokens == 0)
    for key in ("input_ids", "labels", "position_ids"):
        joined = np.concatenate([getattr(p, key)[0] for p in parts])
        assert joined[: row.num_tokens].tolist() == getattr(row, key)[0].tolist()
    filler_labels = np.concatenate([p.labels[0] for p in parts])[row.num_tokens :]
    filler_positions = np.concatenate([p.position_ids[0] for p in parts])[row.num_tokens :]
    assert (filler_labels == -100).all()  # no target: adds nothing to the loss
    assert filler_positions.tolist() == list(range(filler))
    for part in parts:  # the whole row's documents, the filler its own segment
        expected = row.cu_seqlens.tolist() + ([int(filled)] if filler else [])
        assert part.cu_seqlens.tolist() == expected
        assert part.max_seqlen == max(row.max_seqlen, filler)
        assert part.global_num_loss_tokens == 7
    assert sum(p.num_loss_tokens for p in parts) == row.num_loss_tokens


def test_size_one_is_the_row_itself(dataset):
    row = collate_minibatch(dataset, np.array([3, 1]), global_num_loss_tokens=5)
    assert sequence_shard(row, 1, 0) is row
    with pytest.raises(ValueError, match="part 2 of 2"):
        sequence_shard(row, 2, 2)
    with pytest.raises(ValueError, match="multiple >= 1"):
        sequence_shard(row, 1, 0, 0)


@pytest.mark.parametrize(("num_ranks", "size"), [(2, 2), (4, 2), (3, 3), (4, 4)])
def test_groups_together_hold_the_global_batch_once(dataset, num_ranks, size):
    """Every rank of a group has the same documents (cu_seqlens) and its own part; each group's
    rows hold at most size x 32 tokens; every sample of the batch is in exactly one group."""
    loaders = [
        StepLoader(dataset, InfiniteSampler(len(dataset), 12, seed=2), 32, num_ranks, rank, size)
        for rank in range(num_ranks)
    ]
    reference = iter(InfiniteSampler(len(dataset), 12, seed=2))
    for _ in range(5):
        steps = [loader.step_batch(next(iter(loader.sampler))) for loader in loaders]
        assert len({len(step.minibatches) for step in steps}) == 1
        placed = []
        for group in range(num_ranks // size):
            members = steps[group * size : (group + 1) * size]
            for parts in zip(*(m.minibatches for m in members), strict=True):
                assert len({p.cu_seqlens.tobytes() for p in parts}) == 1
                assert len({p.sample_ids.tobytes() for p in parts}) == 1
                assert all(p.num_tokens <= 32 for p in parts)
                placed += parts[0].sample_ids.tolist()
        assert sorted(placed) == sorted(next(reference).tolist())


def test_a_row_longer_than_the_group_holds_is_refused(dataset):
    longest = int(dataset.lengths.max())
    half = -(-longest // 2)
    StepLoader(dataset, InfiniteSampler(len(dataset), 4), half, 2, 0, 2)  # fits two parts
    with pytest.raises(ValueError, match=r"more than a row's .* sequence_parallel_size=2"):
        StepLoader(dataset, InfiniteSampler(len(dataset), 4), half - 1, 2, 0, 2)
    with pytest.raises(ValueError, match="sequence_parallel_size=2 does not divide num_ranks=3"):
        StepLoader(dataset, InfiniteSampler(len(dataset), 4), 64, 3, 0, 2)


def test_an_empty_slot_gives_every_rank_of_its_group_one_filler_token(dataset):
    """Two groups, one sample: the other group's ranks each compute one token without a target
    (their collectives must still run)."""
    parts = [
        rank_minibatches(dataset, np.array([5]), 9, 64, 4, rank, sequence_parallel_size=2)
        for rank in range(4)
    ]
    assert [len(p) for p in parts] == [1, 1, 1, 1]
    empty = [p[0] for p in parts if p[0].sample_ids.size == 0]
    assert len(empty) == 2
    for part in empty:
        assert part.num_tokens == 1 and part.labels.tolist() == [[-100]]
        assert part.cu_seqlens.tolist() == [0, 2] and part.num_loss_tokens == 0
