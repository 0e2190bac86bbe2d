import json

import numpy as np
import pytest

from mt_data import EpochSampler, InfiniteSampler, epoch_permutation


def take(sampler, count):
    return [next(sampler) for _ in range(count)]


@pytest.mark.parametrize("num_samples,batch_size", [(10, 3), (10, 10), (7, 16), (1, 1)])
def test_infinite_batches_are_full_and_follow_the_epoch_permutations(num_samples, batch_size):
    batches = take(InfiniteSampler(num_samples, batch_size, seed=5), 9)
    assert all(batch.size == batch_size for batch in batches)  # never a short batch
    stream = np.concatenate(batches)
    epochs = -(-stream.size // num_samples)
    expected = np.concatenate([epoch_permutation(num_samples, 5, e) for e in range(epochs)])
    np.testing.assert_array_equal(stream, expected[: stream.size])


def test_each_epoch_visits_every_sample_once():
    stream = np.concatenate(take(InfiniteSampler(12, 5, seed=1), 12))  # 60 ids = 5 epochs
    for epoch in range(5):
        assert sorted(stream[epoch * 12 : (epoch + 1) * 12]) == list(range(12))
    # the epochs are differently shuffled
    assert not np.array_equal(stream[:12], stream[12:24])


def test_same_seed_same_batches_other_seed_other_batches():
    a = np.concatenate(take(InfiniteSampler(100, 8, seed=3), 4))
    b = np.concatenate(take(InfiniteSampler(100, 8, seed=3), 4))
    c = np.concatenate(take(InfiniteSampler(100, 8, seed=4), 4))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def draw(sampler, count):
    """The next ``count`` batches, crossing epoch ends for the epoch sampler."""
    out = []
    while len(out) < count:
        batches = take(sampler, 1) if isinstance(sampler, InfiniteSampler) else sampler
        out.extend(batch.tolist() for batch in batches)
    return out[:count]


@pytest.mark.parametrize("cls", [InfiniteSampler, EpochSampler])
def test_resume_from_state_continues_with_the_same_batches(cls):
    expected = draw(cls(23, 4, seed=9), 20)
    first = cls(23, 4, seed=9)
    iterator = iter(first)
    head = [next(iterator).tolist() for _ in range(4)]  # stop mid-epoch (6 batches per epoch)
    state = json.loads(json.dumps(first.state_dict()))  # plain integers survive JSON
    assert all(isinstance(v, int) for v in state.values())
    resumed = cls(23, 4, seed=9)
    resumed.load_state_dict(state)
    assert head + draw(resumed, 16) == expected


def test_epoch_sampler_yields_one_epoch_with_a_short_last_batch():
    sampler = EpochSampler(10, 4, seed=2)
    first = list(sampler)
    assert [b.size for b in first] == [4, 4, 2] and sampler.batches_per_epoch() == 3
    np.testing.assert_array_equal(np.concatenate(first), epoch_permutation(10, 2, 0))
    second = list(sampler)
    np.testing.assert_array_equal(np.concatenate(second), epoch_permutation(10, 2, 1))
    assert sampler.epoch == 2 and sampler.position == 0


def test_state_from_other_data_or_seed_is_refused():
    state = InfiniteSampler(10, 2, seed=1).state_dict()
    with pytest.raises(ValueError, match="num_samples"):
        InfiniteSampler(11, 2, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        InfiniteSampler(10, 2, seed=2).load_state_dict(state)
