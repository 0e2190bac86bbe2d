"""The JSONL -> token store conversion: round trip, every error message, caching, atomicity."""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest

from mt_data import store as store_module
from mt_data.errors import DataError
from mt_data.jsonl import parse_int_lists, read_chunks
from mt_data.store import STORE_FORMAT_VERSION, TokenStore, open_token_store

SAMPLES = [
    ([5, 6, 7, 8], [-100, -100, 7, 8]),
    ([1], [-100]),
    ([0, 2, 3], [0, 2, 3]),
    ([9, 9], [-100, 9]),
]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def sample_line(ids, labels, with_len=True, **extra) -> str:
    record = {"input_ids": ids, "labels": labels, **extra}
    if with_len:
        record["len"] = len(ids)
    return json.dumps(record)


def store_dirs(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if p.is_dir()) if cache.exists() else []


def build_errors(path: Path, cache_name: str = "cache", **kwargs) -> list[str]:
    cache = path.parent / cache_name
    with pytest.raises(DataError) as info:
        open_token_store(path, cache_dir=cache, **kwargs)
    assert store_dirs(cache) == []  # nothing built, not even a temporary folder
    assert "nothing was built" in str(info.value)
    return info.value.problems


# --- round trip ---------------------------------------------------------------------------------


def test_round_trip_with_blank_lines(tmp_path):
    lines = [sample_line(*SAMPLES[0]), "", sample_line(*SAMPLES[1]), "   ", ""]
    lines += [sample_line(*SAMPLES[2], with_len=False), sample_line(*SAMPLES[3])]
    path = write_lines(tmp_path / "data.jsonl", lines)
    store = open_token_store(path, cache_dir=tmp_path / "cache")
    assert len(store) == 4
    assert store.line_numbers.tolist() == [1, 3, 6, 7]
    assert store.offsets.tolist() == [0, 4, 5, 8, 10]
    assert store.lengths.tolist() == [4, 1, 3, 2]
    assert store.input_ids.dtype == np.int32 and store.labels.dtype == np.int32
    for i, (ids, labels) in enumerate(SAMPLES):
        assert store.tokens(i).tolist() == ids
        assert store.sample_labels(i).tolist() == labels
    assert store.tokens(-1).tolist() == SAMPLES[-1][0]
    with pytest.raises(IndexError):
        store.tokens(4)
    assert store.location(2) == f"{path}:6"
    assert store.source == path and store.path.parent == tmp_path / "cache"
    assert store.meta["num_samples"] == 4 and store.meta["num_tokens"] == 10


def test_loss_counts_count_targets_after_the_shift(tmp_path):
    samples = [
        ([1, 2, 3, 4], [1, 2, 3, 4]),  # position 0 is never a target: 3
        ([1, 2, 3, 4], [-100, -100, -100, 4]),  # 1
        ([1, 2], [-100, -100]),  # 0
        ([7], [7]),  # 0: a lone token predicts nothing
        ([1, 2, 3], [5, -100, 6]),  # 1
    ]
    path = write_lines(tmp_path / "d.jsonl", [sample_line(*s) for s in samples])
    store = open_token_store(path, cache_dir=tmp_path / "cache")
    assert store.loss_counts.tolist() == [3, 1, 0, 0, 1]
    assert store.meta["num_loss_tokens"] == 5


def test_any_json_layout_gives_the_same_arrays(tmp_path):
    # compact, spaced, keys swapped, extra fields, tabs and odd spacing (json decides), escapes
    lines = [
        '{"input_ids":[1,2,3],"labels":[-100,2,3],"len":3}',
        '{"labels": [-100, 5], "input_ids": [4, 5], "text": "a \\"input_ids\\": [9]"}',
        '{ "input_ids" : [ 6 ,7 ] , "labels" :[6,\t-100], "len": 2 }',
        '{"input_ids": [-0, 10], "labels": [0, 10], "messages": [{"role": "user"}]}',
        '{"input\\u005fids": [11], "labels": [11]}',
        '{"input_ids": [12, 13], "labels": [12, 13], "x": {"input_ids": []}}',
        '{"input_ids": [2147483647], "labels": [-100]}\r',
    ]
    path = write_lines(tmp_path / "d.jsonl", lines)
    store = open_token_store(path, cache_dir=tmp_path / "cache")
    expected = [json.loads(line) for line in lines]
    assert len(store) == len(expected)
    for i, record in enumerate(expected):
        assert store.tokens(i).tolist() == record["input_ids"]
        assert store.sample_labels(i).tolist() == record["labels"]


def test_many_random_lines_match_json(tmp_path):
    # large enough to span several chunks, with a few lines only the json fallback takes
    rng = np.random.default_rng(0)
    lines, records = [], []
    for i in range(3000):
        ids = rng.integers(0, 200_000, rng.integers(1, 40)).tolist()
        labels = [x if rng.random() < 0.7 else -100 for x in ids]
        sep = [", ", ",", " ,"][i % 3] if i % 97 == 0 else ", "
        line = f'{{"input_ids": [{sep.join(map(str, ids))}], "labels": [{sep.join(map(str, labels))}]}}'
        lines.append(line)
        records.append((ids, labels))
    path = write_lines(tmp_path / "d.jsonl", lines)
    chunks = list(read_chunks(path, where="d", require_labels=True, chunk_bytes=16_384))
    assert len(chunks) > 10
    ids = np.concatenate([c.input_ids for c in chunks])
    labels = np.concatenate([c.labels for c in chunks])
    assert ids.tolist() == [x for r in records for x in r[0]]
    assert labels.tolist() == [x for r in records for x in r[1]]
    assert np.concatenate([c.line_numbers for c in chunks]).tolist() == list(range(1, 3001))


def test_parse_int_lists_grammar():
    good = [b"1, 2,3", b"-100", b"0", b"-0", b"10, 2147483648"]
    values, counts, bad = parse_int_lists(good)
    assert bad.tolist() == [] and counts.tolist() == [3, 1, 1, 1, 2]
    assert values.tolist() == [1, 2, 3, -100, 0, 0, 10, 2147483648]
    not_plain = [b"1 ,2", b"01", b"1,,2", b"1,", b"-", b"1.5", b"1e3", b"true", b"1  ,2", b"- 1"]
    for segment in not_plain:
        values, _, bad = parse_int_lists([b"7", segment, b"8"])
        # a neighbour may be sent to the json fallback too: that is only slower
        assert 1 in bad.tolist() and values.size == 0, segment


def test_without_labels(tmp_path):
    lines = ['{"input_ids": [1, 2, 3]}', '{"input_ids": [4], "labels": "anything", "len": 1}']
    path = write_lines(tmp_path / "pre.jsonl", lines)
    store = open_token_store(path, cache_dir=tmp_path / "cache", require_labels=False)
    assert store.labels is None and store.loss_counts is None
    assert store.input_ids.tolist() == [1, 2, 3, 4]
    assert store.path.name.endswith("-nolabels")
    assert not (store.path / "labels.npy").exists()
    with pytest.raises(ValueError, match="no labels"):
        store.sample_labels(0)
    # the same file with labels required is another store, and fails on its lines
    problems = build_errors(path, "cache2")
    assert problems == [f"{path}:1: missing field 'labels'", f"{path}:2: 'labels' must be a list "
                        "of integers, got a string"]  # fmt: skip


# --- error messages -----------------------------------------------------------------------------


def test_every_problem_is_reported_with_its_line(tmp_path):
    ok = sample_line([1, 2], [1, 2])
    lines = [
        ok,  # 1
        '{"input_ids": [1, 2], "labels": [1, 2]',  # 2: invalid JSON
        "[1, 2]",  # 3: not an object
        '{"labels": [1]}',  # 4: missing input_ids
        "",  # 5: blank
        '{"input_ids": [1, 2]}',  # 6: missing labels
        '{"input_ids": [1, true], "labels": [1, 2]}',  # 7: bool
        '{"input_ids": [1, 2.0], "labels": [1, 2]}',  # 8: float
        '{"input_ids": [], "labels": []}',  # 9: empty
        '{"input_ids": [4, -3], "labels": [4, 1]}',  # 10: negative id
        '{"input_ids": [1, 2, 3], "labels": [1, 2]}',  # 11: length mismatch
        '{"input_ids": [1, 2, 3], "labels": [1, -5, 3]}',  # 12: bad label
        '{"input_ids": [1, 2], "labels": [1, 2], "len": "2"}',  # 13: len not an int
        '{"input_ids": [1, 2], "labels": [1, 2], "len": 3}',  # 14: len wrong
        '{"input_ids": [1, 2147483648], "labels": [1, 2]}',  # 15: id beyond int32
        '{"input_ids": [1, 2], "labels": [1, 99999999999999999999999]}',  # 16: label beyond
        '{"input_ids": "1 2", "labels": [1, 2]}',  # 17: not a list
        '{"input_ids": [01], "labels": [1]}',  # 18: leading zero is not JSON
        ok,  # 19
    ]
    path = write_lines(tmp_path / "bad.jsonl", lines)
    problems = build_errors(path)
    assert problems[0].startswith(f"{path}:2: invalid JSON: ")
    assert "column" in problems[0]
    assert problems[1:] == [
        f"{path}:3: expected a JSON object, got a list",
        f"{path}:4: missing field 'input_ids'",
        f"{path}:6: missing field 'labels'",
        f"{path}:7: 'input_ids' must be a list of integers, but position 1 holds true (a boolean)",
        f"{path}:8: 'input_ids' must be a list of integers, but position 1 holds 2.0 (a float)",
        f"{path}:9: 'input_ids' is empty",
        f"{path}:10: token id -3 at position 1 in 'input_ids' is negative",
        f"{path}:11: 'labels' has 2 entries but 'input_ids' has 3",
        f"{path}:12: label -5 at position 1 is neither -100 nor a token id >= 0",
        f"{path}:13: 'len' must be an integer, got a string",
        f"{path}:14: 'len' is 3 but 'input_ids' has 2 tokens",
        f"{path}:15: token id 2147483648 at position 1 in 'input_ids' does not fit in int32",
        f"{path}:16: label 99999999999999999999999 at position 1 does not fit in int32",
        f"{path}:17: 'input_ids' must be a list of integers, got a string",
        problems[-1],
    ]
    assert problems[-1].startswith(f"{path}:18: invalid JSON: ")


def test_a_null_len_is_reported_not_taken_as_absent(tmp_path):
    # regression: the fast path read "len": null as a line without "len" and accepted it
    lines = [
        sample_line([1, 2], [1, 2]),
        sample_line([3, 4], [3, 4], with_len=False, len=None),
        sample_line([5, 6], [5, 6]),
    ]
    path = write_lines(tmp_path / "bad.jsonl", lines)
    assert build_errors(path) == [f"{path}:2: 'len' must be an integer, got null"]


def test_error_message_header_and_count(tmp_path):
    lines = ['{"input_ids": [-1], "labels": [1]}'] * 3
    path = write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError) as info:
        open_token_store(path, cache_dir=tmp_path / "cache")
    assert str(info.value).splitlines()[0] == f"{path}: 3 problem(s); nothing was built"


def test_problems_in_several_chunks_are_all_reported(tmp_path, monkeypatch):
    monkeypatch.setattr("mt_data.jsonl.CHUNK_BYTES", 1000)
    seen = []
    lines = [sample_line([1, 2, 3], [1, 2, 3])] * 200
    lines[10] = lines[150] = '{"input_ids": [1, -2], "labels": [1, 2]}'
    path = write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError) as info:
        open_token_store(path, cache_dir=tmp_path / "cache", progress=lambda d, t: seen.append(d))
    assert len(seen) > 5  # several chunks were read
    assert [p.split(": ")[0] for p in info.value.problems] == [f"{path}:11", f"{path}:151"]


def test_file_without_samples_is_an_error(tmp_path):
    path = write_lines(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(DataError, match="no samples"):
        open_token_store(path, cache_dir=tmp_path / "cache")
    assert store_dirs(tmp_path / "cache") == []
    with pytest.raises(DataError, match="no such file"):
        open_token_store(tmp_path / "missing.jsonl", cache_dir=tmp_path / "cache")


# --- caching, atomicity, concurrency --------------------------------------------------------------


def simple_file(tmp_path: Path, name: str = "data.jsonl") -> Path:
    return write_lines(tmp_path / name, [sample_line(*s) for s in SAMPLES])


def test_second_open_reuses_the_store_and_the_hash(tmp_path, monkeypatch):
    path = simple_file(tmp_path)
    cache = tmp_path / "cache"
    first = open_token_store(path, cache_dir=cache)
    inode = os.stat(first.path).st_ino
    assert first.path.name.startswith("data-") and first.path.name.endswith(
        f"-v{STORE_FORMAT_VERSION}"
    )

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt")

    def no_hash(*args, **kwargs):
        raise AssertionError("hashed again")

    monkeypatch.setattr(store_module, "_write_store", no_build)
    monkeypatch.setattr(store_module, "_sha256", no_hash)
    second = open_token_store(path, cache_dir=cache)
    assert second.path == first.path and os.stat(second.path).st_ino == inode
    assert np.array_equal(second.input_ids, first.input_ids)


def test_default_cache_dir_is_beside_the_file(tmp_path):
    store = open_token_store(simple_file(tmp_path))
    assert store.path.parent == tmp_path / ".mt_cache"


def test_changed_content_gives_a_new_store(tmp_path):
    path = simple_file(tmp_path)
    cache = tmp_path / "cache"
    first = open_token_store(path, cache_dir=cache)
    write_lines(path, [sample_line([3, 4], [3, 4])])
    second = open_token_store(path, cache_dir=cache)
    assert second.path != first.path
    assert second.input_ids.tolist() == [3, 4]
    assert len(store_dirs(cache)) == 2


def test_touched_file_with_same_content_rehashes_to_the_same_store(tmp_path, monkeypatch):
    path = simple_file(tmp_path)
    cache = tmp_path / "cache"
    first = open_token_store(path, cache_dir=cache)
    os.utime(path, ns=(1, 1))
    calls = []
    real = store_module._sha256
    monkeypatch.setattr(store_module, "_sha256", lambda p: calls.append(p) or real(p))
    assert open_token_store(path, cache_dir=cache).path == first.path
    assert len(calls) == 1


def test_folder_without_meta_is_rebuilt_and_leftovers_are_removed(tmp_path):
    path = simple_file(tmp_path)
    cache = tmp_path / "cache"
    good = open_token_store(path, cache_dir=cache)
    name = good.path.name
    expected = good.input_ids.tolist()
    del good
    # a killed build: a temporary folder, and a finished-looking folder that lacks meta.json
    (cache / name / "meta.json").unlink()
    (cache / name / "input_ids.npy").write_bytes(b"garbage")
    leftover = cache / f".{name}.tmp-999-dead"
    leftover.mkdir()
    (leftover / "input_ids.npy").write_bytes(b"half")
    with pytest.raises(FileNotFoundError):
        TokenStore.open(cache / name)
    store = open_token_store(path, cache_dir=cache)
    assert store.input_ids.tolist() == expected
    assert not leftover.exists()
    assert store_dirs(cache) == [cache / name]


def test_store_of_another_format_version_is_not_used(tmp_path):
    path = simple_file(tmp_path)
    cache = tmp_path / "cache"
    folder = open_token_store(path, cache_dir=cache).path
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "format_version": 0}))
    with pytest.raises(ValueError, match="format"):
        TokenStore.open(folder)
    assert open_token_store(path, cache_dir=cache).meta["format_version"] == STORE_FORMAT_VERSION


def test_open_maps_read_only(tmp_path):
    folder = open_token_store(simple_file(tmp_path), cache_dir=tmp_path / "cache").path
    store = TokenStore.open(folder)
    for array in (store.input_ids, store.labels, store.offsets, store.line_numbers):
        assert isinstance(array, np.memmap) and not array.flags.writeable
    assert isinstance(store.loss_counts, np.memmap)
    with pytest.raises(ValueError):
        store.input_ids[0] = 1
    assert store.source == tmp_path / "data.jsonl"


def test_progress_is_reported(tmp_path):
    path = simple_file(tmp_path)
    seen = []
    open_token_store(path, cache_dir=tmp_path / "cache", progress=lambda d, t: seen.append((d, t)))
    size = path.stat().st_size
    assert seen[0] == (0, size) and seen[-1] == (size, size)


def _open_in_child(path: str, cache: str, log: str, out: str) -> None:
    handler = logging.FileHandler(log)
    logger = logging.getLogger("mt_data")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    store = open_token_store(path, cache_dir=cache)
    np.savez(
        out, ids=store.input_ids, labels=store.labels, offsets=store.offsets, path=str(store.path)
    )


def test_concurrent_opens_build_once(tmp_path):
    rng = np.random.default_rng(1)
    lines = [sample_line(*([rng.integers(0, 1000, 50).tolist()] * 2)) for _ in range(2000)]
    path = write_lines(tmp_path / "shared.jsonl", lines)
    cache = tmp_path / "cache"
    ctx = multiprocessing.get_context("fork")
    procs = [
        ctx.Process(
            target=_open_in_child,
            args=(str(path), str(cache), str(tmp_path / f"log{i}"), str(tmp_path / f"out{i}.npz")),
        )
        for i in range(4)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    logs = "".join((tmp_path / f"log{i}").read_text() for i in range(4))
    assert logs.count("building token store") == 1
    assert logs.count("built token store") == 1
    assert len(store_dirs(cache)) == 1
    results = [np.load(tmp_path / f"out{i}.npz") for i in range(4)]
    for r in results[1:]:
        for key in ("ids", "labels", "offsets", "path"):
            assert np.array_equal(r[key], results[0][key])
    assert results[0]["offsets"][-1] == 2000 * 50


def test_a_store_built_meanwhile_by_another_node_is_used(tmp_path, monkeypatch):
    """Where file locks do not reach across nodes (some network file systems), two nodes can
    build one store at once: the second to finish finds the first's in place and uses it."""
    path = simple_file(tmp_path)
    cache = tmp_path / "cache"
    monkeypatch.setattr(store_module, "_locked", lambda *args: contextlib.nullcontext())
    real = store_module._write_store
    other_node = []

    def write_while_another_node_builds(*args):
        if not other_node:  # the other node finishes first, while this one writes
            other_node.append(None)
            other_node[0] = open_token_store(path, cache_dir=cache)
        real(*args)

    monkeypatch.setattr(store_module, "_write_store", write_while_another_node_builds)
    store = open_token_store(path, cache_dir=cache)
    assert store.path == other_node[0].path
    assert store.input_ids.tolist() == other_node[0].input_ids.tolist()
    assert [p.name for p in cache.iterdir() if ".tmp-" in p.name] == []  # ours removed
    assert store_dirs(cache) == [store.path]


def test_check_token_range_names_lines(tmp_path):
    lines = [
        sample_line([1, 2], [1, 2]),
        "",
        sample_line([1, 50, 60], [-100, 50, 60]),
        sample_line([3, 4], [3, 4]),
        sample_line([9, 8], [9, 77]),
    ]
    path = write_lines(tmp_path / "d.jsonl", lines)
    store = open_token_store(path, cache_dir=tmp_path / "cache")
    store.check_token_range(100)
    with pytest.raises(DataError) as info:
        store.check_token_range(40)
    assert info.value.problems == [
        f"{path}:3: token id 50 at position 1 is >= the model's vocabulary size 40",
        f"{path}:3: label 50 at position 1 is >= the model's vocabulary size 40",
        f"{path}:5: label 77 at position 1 is >= the model's vocabulary size 40",
    ]
