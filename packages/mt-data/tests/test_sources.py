import numpy as np
import pytest

from mt_data import DataError, DataWarning, PretrainingBlocks, SampleDataset


def test_sample_targets_are_the_next_token_of_the_same_sample(make_store, sft_row):
    store = make_store([sft_row([5, 6, 7, 8], masked=2), sft_row([9, 10, 11])])
    dataset = SampleDataset(store)
    ids, targets, segments = dataset.item(0)
    assert ids.tolist() == [5, 6, 7, 8]
    # labels [-100, -100, 7, 8] -> position t predicts label t+1; the last position nothing
    assert targets.tolist() == [-100, 7, 8, -100]
    assert segments.tolist() == [4]
    assert dataset.loss_counts.tolist() == [2, 2]


def test_too_long_samples_are_dropped_with_count_and_token_share(make_store, sft_row):
    rows = [sft_row([1] * 3), sft_row([2] * 10), sft_row([3] * 4), sft_row([4] * 30)]
    store = make_store(rows)
    with pytest.warns(DataWarning, match=r"2 of 4 sample\(s\) \(85\.11% of the tokens\)"):
        dataset = SampleDataset(store, max_tokens=8)
    assert dataset.kept.tolist() == [0, 2]
    assert dataset.lengths.tolist() == [3, 4]
    assert dataset.location(1).endswith(":3")  # sample 2 of the file is on line 3


def test_too_long_samples_can_be_refused_naming_path_and_line(make_store, sft_row):
    store = make_store([sft_row([1] * 3), sft_row([2] * 10)])
    with pytest.raises(DataError) as error:
        SampleDataset(store, max_tokens=8, too_long="error")
    assert error.value.problems == [
        f"{store.source}:2: sample has 10 tokens, more than max_tokens_per_gpu=8"
    ]


def test_samples_without_a_target_are_dropped_with_one_warning(make_store, sft_row):
    rows = [
        sft_row([1, 2, 3]),
        sft_row([4, 5], masked=2),
        sft_row([6, 7], masked=1),
        sft_row([8, 9, 10], masked=3),
    ]
    store = make_store(rows)
    with pytest.warns(DataWarning, match=r"dropped 2 sample\(s\) with no loss-counted token"):
        dataset = SampleDataset(store)
    assert dataset.kept.tolist() == [0, 2]


def test_nothing_left_is_one_error_that_says_why(make_store, sft_row, recwarn):
    with pytest.raises(DataError, match=r"no sample is left.*-100 \(nothing to learn\)"):
        SampleDataset(make_store([sft_row([1, 2], masked=2), sft_row([3, 4, 5], masked=3)]))
    store = make_store([sft_row([1, 2], masked=2), sft_row([1, 2, 3, 4, 5], masked=1)])
    with pytest.raises(DataError, match=r"2 sample\(s\) are longer than max_tokens_per_gpu=1 "):
        SampleDataset(store, max_tokens=1)
    with pytest.raises(DataError, match=r"1 sample\(s\) are longer .* at least 5 "):
        SampleDataset(store, max_tokens=4)  # the masked sample fits, the learnable one does not
    assert not recwarn.list  # one message, no warnings before it


DOCS = [[10, 11, 12], [20, 21], [30, 31, 32, 33, 34], [40]]


@pytest.mark.parametrize("block_size", [1, 2, 3, 4, 5, 10, 11, 20])
@pytest.mark.parametrize("segment_documents", [True, False])
def test_blocks_cover_the_stream_with_every_token_a_target(
    make_store, block_size, segment_documents
):
    store = make_store([{"input_ids": doc} for doc in DOCS], require_labels=False)
    blocks = PretrainingBlocks(store, block_size, segment_documents=segment_documents)
    stream = [token for doc in DOCS for token in doc]  # 11 tokens, 10 (input, target) pairs
    assert len(blocks) == -(-10 // block_size)
    assert blocks.lengths[:-1].tolist() == [block_size] * (len(blocks) - 1)
    items = [blocks.item(i) for i in range(len(blocks))]
    assert np.concatenate([ids for ids, _, _ in items]).tolist() == stream[:-1]
    assert np.concatenate([t for _, t, _ in items]).tolist() == stream[1:]
    assert blocks.loss_counts.sum() == 10
    for i, (ids, _, segments) in enumerate(items):
        assert segments.sum() == ids.size == blocks.lengths[i]
    if not segment_documents:
        assert all(segments.size == 1 for _, _, segments in items)


def test_blocks_segment_at_document_starts(make_store):
    store = make_store([{"input_ids": doc} for doc in DOCS], require_labels=False)
    blocks = PretrainingBlocks(store, 4)
    # inputs 10 11 12 20 | 21 30 31 32 | 33 34 ; document starts at stream offsets 3, 5, 10
    assert [blocks.item(i)[2].tolist() for i in range(3)] == [[3, 1], [1, 3], [2]]
    assert blocks.location(1).endswith(":2 (block 1)")


def test_a_one_token_corpus_is_an_error(make_store):
    store = make_store([{"input_ids": [7]}], require_labels=False)
    with pytest.raises(DataError, match="at least 2 tokens"):
        PretrainingBlocks(store, 8)
