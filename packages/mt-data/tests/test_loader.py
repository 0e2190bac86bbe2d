import numpy as np
import pytest

from mt_data import InfiniteSampler, SampleDataset, StepLoader


@pytest.fixture
def dataset(make_store, sft_row):
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(60):
        length = int(rng.integers(2, 40))
        rows.append(
            sft_row(rng.integers(0, 1000, length).tolist(), masked=int(rng.integers(0, length - 1)))
        )
    return SampleDataset(make_store(rows))


@pytest.mark.parametrize("num_ranks", [1, 2, 3])
def test_ranks_together_collate_exactly_the_global_batch(dataset, num_ranks):
    loaders = [
        StepLoader(dataset, InfiniteSampler(len(dataset), 16, seed=1), 48, num_ranks, r)
        for r in range(num_ranks)
    ]
    reference = iter(InfiniteSampler(len(dataset), 16, seed=1))
    for _ in range(8):  # 8 x 16 ids cross two epoch boundaries
        steps = [next(iter(loader)) for loader in loaders]
        counts = {len(step.minibatches) for step in steps}
        assert len(counts) == 1  # every rank runs the same number of minibatches
        batch_ids = np.concatenate([mb.sample_ids for s in steps for mb in s.minibatches])
        # each id of the sampler's batch placed exactly once (a batch that crosses an epoch
        # boundary may legitimately hold an id twice, once per epoch)
        assert sorted(batch_ids.tolist()) == sorted(next(reference).tolist())
        total_targets = sum(mb.num_loss_tokens for s in steps for mb in s.minibatches)
        assert total_targets == steps[0].num_loss_tokens == dataset.loss_counts[batch_ids].sum()
        for step in steps:
            assert step.num_loss_tokens == steps[0].num_loss_tokens
            for mb in step.minibatches:
                assert mb.num_tokens <= 48
                assert mb.global_num_loss_tokens == step.num_loss_tokens


def test_state_resumes_the_same_steps(dataset):
    reference = iter(StepLoader(dataset, InfiniteSampler(len(dataset), 8, seed=3), 64))
    expected = [[mb.sample_ids.tolist() for mb in next(reference).minibatches] for _ in range(6)]
    first = StepLoader(dataset, InfiniteSampler(len(dataset), 8, seed=3), 64)
    steps = iter(first)
    head = [[mb.sample_ids.tolist() for mb in next(steps).minibatches] for _ in range(2)]
    resumed = StepLoader(dataset, InfiniteSampler(len(dataset), 8, seed=3), 64)
    resumed.load_state_dict(first.state_dict())
    steps = iter(resumed)
    tail = [[mb.sample_ids.tolist() for mb in next(steps).minibatches] for _ in range(4)]
    assert head + tail == expected


def test_items_longer_than_the_limit_are_refused(dataset):
    with pytest.raises(ValueError, match="more than max_tokens_per_rank=8"):
        StepLoader(dataset, InfiniteSampler(len(dataset), 4), 8)
