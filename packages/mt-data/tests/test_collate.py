import numpy as np

from mt_data import PretrainingBlocks, SampleDataset, collate_minibatch

SAMPLES = [[11, 12, 13, 14], [21, 22], [31, 32, 33], [41, 42]]


def collated(make_store, ids, masked=0):
    rows = []
    for tokens in SAMPLES:
        keep = min(masked, len(tokens) - 1)  # every sample keeps at least one target
        rows.append({"input_ids": tokens, "labels": [-100] * keep + tokens[keep:]})
    dataset = SampleDataset(make_store(rows))
    return dataset, collate_minibatch(dataset, np.array(ids), global_num_loss_tokens=99)


def test_one_row_with_positions_restarting_per_sample(make_store):
    _, batch = collated(make_store, [2, 0, 1])
    assert batch.input_ids.tolist() == [[31, 32, 33, 11, 12, 13, 14, 21, 22]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 1]]
    assert batch.cu_seqlens.tolist() == [0, 3, 7, 9] and batch.cu_seqlens.dtype == np.int32
    assert batch.max_seqlen == 4
    assert batch.input_ids.dtype == batch.labels.dtype == batch.position_ids.dtype == np.int64
    assert batch.sample_ids.tolist() == [2, 0, 1]
    assert batch.global_num_loss_tokens == 99


def test_no_position_targets_a_token_of_another_sample(make_store):
    _, batch = collated(make_store, [0, 1, 2, 3])
    ids, labels = batch.input_ids[0], batch.labels[0]
    starts, ends = batch.cu_seqlens[:-1], batch.cu_seqlens[1:]
    for start, end in zip(starts, ends, strict=False):
        # inside a sample, position t predicts token t+1 of that same sample ...
        assert labels[start : end - 1].tolist() == ids[start + 1 : end].tolist()
        # ... and its last position predicts nothing, not the next sample's first token
        assert labels[end - 1] == -100
    assert batch.num_loss_tokens == sum(len(s) - 1 for s in SAMPLES) == 7


def test_loss_count_is_the_targets_of_the_row(make_store):
    dataset, batch = collated(make_store, [0, 2], masked=2)
    assert batch.labels.tolist() == [[-100, 13, 14, -100, -100, 33, -100]]
    assert batch.num_loss_tokens == 3 == dataset.loss_counts[[0, 2]].sum()


def test_empty_minibatch_is_explicit(make_store):
    _, batch = collated(make_store, [])
    assert batch.is_empty and batch.num_tokens == 0
    assert batch.input_ids.shape == (1, 0) and batch.cu_seqlens.tolist() == [0]
    assert batch.max_seqlen == 0 and batch.num_loss_tokens == 0


def test_pretraining_block_segments_restart_positions(make_store):
    store = make_store(
        [{"input_ids": d} for d in ([1, 2, 3], [4, 5], [6, 7, 8, 9])], require_labels=False
    )
    blocks = PretrainingBlocks(store, 4)
    batch = collate_minibatch(blocks, np.array([0, 1]), global_num_loss_tokens=8)
    # block 0: 1 2 3 | 4 ; block 1: 5 | 6 7 8
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]]
    assert batch.labels.tolist() == [[2, 3, 4, 5, 6, 7, 8, 9]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 0, 0, 1, 2]]
    assert batch.cu_seqlens.tolist() == [0, 3, 4, 5, 8]
