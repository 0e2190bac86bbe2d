"""Reading and validating mini_trainer JSONL token files, one chunk of lines at a time.

Each line is one JSON object ``{"input_ids": [...], "labels": [...], "len": N}``. Building a Python
int for every token caps the json module at ~40 MB/s, so the fast path never does: it cuts the two
integer lists out of each line, checks their JSON grammar with numpy over the bytes of a whole chunk
and parses them in one call. The rest of the line (its "skeleton", with both lists emptied) still
goes through ``json.loads``, so every other field is checked as JSON. Any line the fast path cannot
vouch for, and any line with a problem, goes through ``json.loads`` whole, which is always right and
gives the exact message.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IGNORE_INDEX = -100
INT32_MAX = 2**31 - 1
CHUNK_BYTES = 8 << 20

# Byte classes of the fast grammar: 1-9, 0, minus, comma, space; 0 (other) is never allowed.
_D, _Z, _M, _C, _S = 1, 2, 3, 4, 5
_N_CLASSES = 6
_CLASS_TABLE = bytearray(256)
_CLASS_TABLE[ord("1") : ord("9") + 1] = bytes([_D]) * 9
_CLASS_TABLE[ord("0")] = _Z
_CLASS_TABLE[ord("-")] = _M
_CLASS_TABLE[ord(",")] = _C
_CLASS_TABLE[ord(" ")] = _S
_CLASS_TABLE = bytes(_CLASS_TABLE)
# JSON integer lists, with commas optionally followed by one space: the pairs of neighbouring byte
# classes that can occur. Leading zeros ("01") need the byte before as well: checked on their own.
_GOOD_PAIRS = {
    (_D, _D), (_D, _Z), (_D, _C), (_Z, _D), (_Z, _Z), (_Z, _C), (_M, _D), (_M, _Z),
    (_C, _S), (_C, _D), (_C, _Z), (_C, _M), (_S, _D), (_S, _Z), (_S, _M),
}  # fmt: skip
_BAD_PAIR_TABLE = bytes(
    0 if (code // _N_CLASSES, code % _N_CLASSES) in _GOOD_PAIRS else 1 for code in range(256)
)


@dataclass
class Chunk:
    """The samples of a run of lines; the arrays are empty when ``problems`` is not."""

    input_ids: np.ndarray  # int32, the samples' tokens one after the other
    labels: np.ndarray | None  # int32, aligned with input_ids; None when labels are not read
    lengths: np.ndarray  # int64, tokens per sample
    line_numbers: np.ndarray  # int64, 1-based line of each sample
    problems: list[str]
    bytes_done: int  # bytes of the file read so far


def read_chunks(
    path: Path, *, where: str, require_labels: bool, chunk_bytes: int | None = None
) -> Iterator[Chunk]:
    """Yields the file's samples in order, a chunk of about ``chunk_bytes`` (default
    :data:`CHUNK_BYTES`) at a time.

    ``where`` is how messages name the file (``f"{where}:{line}: ..."``).
    """
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    done = 0
    first_line = 1
    rest = b""
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk_bytes)
            done += len(block)
            data = rest + block if rest else block
            if block:
                cut = data.rfind(b"\n")
                if cut < 0:  # one line longer than a block: read on
                    rest = data
                    continue
                data, rest = data[:cut], data[cut + 1 :]
            elif not data:
                return
            lines = data.split(b"\n")
            chunk = parse_lines(lines, first_line, where=where, require_labels=require_labels)
            chunk.bytes_done = done
            yield chunk
            first_line += len(lines)
            if not block:
                return


def parse_lines(lines: list[bytes], first_line: int, *, where: str, require_labels: bool) -> Chunk:
    """Parses and checks ``lines`` (without their newlines); ``first_line`` is the first's number."""
    fast: list[int] = []  # indices into lines
    ids_segs: list[bytes] = []
    label_segs: list[bytes] = []
    declared: list[object] = []  # each fast line's "len", None when absent
    slow: list[int] = []
    labels: np.ndarray | None = None
    skeletons: dict[bytes, object] = {}  # lines mostly differ only in their lists: parse each once
    for i, line in enumerate(lines):
        if not line or line.isspace():
            continue
        cut = _split_line(line, require_labels, skeletons)
        if cut is None:
            slow.append(i)
            continue
        ids_seg, label_seg, length = cut
        fast.append(i)
        ids_segs.append(ids_seg)
        label_segs.append(label_seg)
        declared.append(length)

    # Integer lists of the fast lines; lines whose lists the grammar check rejects go slow.
    for _ in range(3):
        ids, ids_counts, bad = parse_int_lists(ids_segs)
        if require_labels:
            labels, label_counts, bad_labels = parse_int_lists(label_segs)
            bad = np.union1d(bad, bad_labels)
        if not bad.size:
            break
        keep = np.ones(len(fast), bool)
        keep[bad] = False
        slow.extend(fast[j] for j in bad.tolist())
        fast, ids_segs, declared = _keep(fast, keep), _keep(ids_segs, keep), _keep(declared, keep)
        label_segs = _keep(label_segs, keep)
    else:  # the check should settle at once; if it does not, trust only json
        slow.extend(fast)
        fast, ids_segs, label_segs, declared = [], [], [], []
        ids = labels = np.zeros(0, np.int64)
        ids_counts = label_counts = np.zeros(0, np.int64)

    # Value checks on every token at once; a line that fails one is diagnosed by json below.
    suspects = _suspect_lines(ids, ids_counts, declared)
    if require_labels:
        suspects = np.union1d(suspects, np.flatnonzero(label_counts != ids_counts))
        suspects = np.union1d(suspects, _bad_label_lines(labels, label_counts))
    slow.extend(fast[j] for j in suspects.tolist())

    problems: list[str] = []
    rescued: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
    for i in sorted(slow):
        found, sample = check_line(lines[i], f"{where}:{first_line + i}", require_labels)
        problems.extend(found)
        if sample is not None:
            rescued[i] = sample
    if problems:
        return _empty(require_labels, problems)
    if rescued:  # valid lines the fast path did not take: merge them back in file order
        samples = dict(
            zip(fast, _split(ids, ids_counts, labels if require_labels else None), strict=False)
        )
        samples.update(rescued)
        order = sorted(samples)
        ids = np.concatenate([samples[i][0] for i in order])
        if require_labels:
            labels = np.concatenate([samples[i][1] for i in order])
        ids_counts = np.array([samples[i][0].size for i in order], np.int64)
        fast = order
    return Chunk(
        input_ids=ids.astype(np.int32),
        labels=labels.astype(np.int32) if require_labels else None,
        lengths=np.asarray(ids_counts, np.int64),
        line_numbers=np.asarray(fast, np.int64) + first_line,
        problems=[],
        bytes_done=0,
    )


def parse_int_lists(segments: list[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Parses the insides of JSON integer lists (``b"1, -2,3"``), all at once.

    Returns (values (int64, one list after the other), how many values each list holds, indices of
    the lists that are not plain non-empty JSON integer lists). When any list is rejected the values
    are empty: call again without them. Values may be out of int32 (or saturated): check ranges.
    """
    n = len(segments)
    counts = np.fromiter((s.count(b",") + 1 for s in segments), np.int64, n)
    if not n:
        return np.zeros(0, np.int64), counts, np.zeros(0, np.int64)
    buf = b",".join(segments)
    cls = np.frombuffer(buf.translate(_CLASS_TABLE), np.uint8)
    bad_at: list[np.ndarray] = []  # byte positions of grammar errors
    if cls.size > 1:
        pair = cls[:-1] * np.uint8(_N_CLASSES)
        pair += cls[1:]
        bad_pairs = pair.tobytes().translate(_BAD_PAIR_TABLE)
        if b"\x01" in bad_pairs:
            at = np.flatnonzero(np.frombuffer(bad_pairs, np.uint8))
            bad_at += [at, at + 1]
        digit = (cls - np.uint8(_D)) < 2  # 1-9 or 0
        leading_zero = (cls[1:-1] == _Z) & digit[2:] & ~digit[:-2]
        if leading_zero.any():
            bad_at.append(np.flatnonzero(leading_zero) + 1)
        if cls[0] == _Z and digit[1]:
            bad_at.append(np.zeros(1, np.int64))
    if cls[0] not in (_D, _Z, _M):
        bad_at.append(np.zeros(1, np.int64))
    if cls[-1] not in (_D, _Z):
        bad_at.append(np.full(1, cls.size - 1))
    if bad_at:
        # list k ends at the comma ends[k] that join() put after it
        ends = np.cumsum(np.fromiter(map(len, segments), np.int64, n) + 1) - 1
        at = np.concatenate(bad_at)
        return np.zeros(0, np.int64), counts, np.unique(np.searchsorted(ends, at))
    values = np.fromstring(buf, dtype=np.int64, sep=",")
    if values.size != counts.sum():  # cannot happen after the grammar check; do not trust it
        return np.zeros(0, np.int64), counts, np.arange(n)
    return values, counts, np.zeros(0, np.int64)


def check_line(
    line: bytes, where: str, require_labels: bool
) -> tuple[list[str], tuple[np.ndarray, np.ndarray | None] | None]:
    """Checks one line with the json module: (problems, (input_ids, labels) when it has none)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return [f"{where}: invalid JSON: {e.msg} (column {e.colno})"], None
    except UnicodeDecodeError as e:
        return [f"{where}: invalid JSON: not UTF-8 text ({e.reason} at byte {e.start})"], None
    except RecursionError:
        return [f"{where}: invalid JSON: nested too deeply"], None
    if type(obj) is not dict:
        return [f"{where}: expected a JSON object, got {_json_type(obj)}"], None
    problems: list[str] = []
    ids = _int_list(obj, "input_ids", where, problems)
    if ids is not None:
        if not ids:
            problems.append(f"{where}: 'input_ids' is empty")
        for p, x in enumerate(ids):
            if x < 0 or x > INT32_MAX:
                what = "is negative" if x < 0 else "does not fit in int32"
                problems.append(f"{where}: token id {x} at position {p} in 'input_ids' {what}")
                break
    labels = _int_list(obj, "labels", where, problems) if require_labels else None
    if labels is not None:
        if ids is not None and len(labels) != len(ids):
            problems.append(
                f"{where}: 'labels' has {len(labels)} entries but 'input_ids' has {len(ids)}"
            )
        for p, x in enumerate(labels):
            if x != IGNORE_INDEX and (x < 0 or x > INT32_MAX):
                what = "does not fit in int32" if x > 0 else "is neither -100 nor a token id >= 0"
                problems.append(f"{where}: label {x} at position {p} {what}")
                break
    if "len" in obj:
        length = obj["len"]
        if type(length) is not int:
            problems.append(f"{where}: 'len' must be an integer, got {_json_type(length)}")
        elif ids is not None and length != len(ids):
            problems.append(f"{where}: 'len' is {length} but 'input_ids' has {len(ids)} tokens")
    if problems:
        return problems, None
    assert ids is not None
    return [], (np.array(ids, np.int64), None if labels is None else np.array(labels, np.int64))


def _split_line(
    line: bytes, require_labels: bool, skeletons: dict[bytes, object] | None = None
) -> tuple[bytes, bytes, object] | None:
    """(input_ids list inside, labels list inside, "len" or None) if the fast path can take it.

    ``skeletons`` caches the verdict on each skeleton seen (same bytes, same verdict).
    """
    ids = _list_span(line, b'"input_ids"')
    if ids is None:
        return None
    a, b = ids
    if require_labels:
        labels = _list_span(line, b'"labels"')
        if labels is None:
            return None
        c, d = labels
        if a < c:
            if b > c:
                return None
            skeleton = line[:a] + line[b:c] + line[d:]
        else:
            if d > a:
                return None
            skeleton = line[:c] + line[d:a] + line[b:]
        label_seg = line[c:d].strip(b" \t\r")
        if not label_seg:
            return None
    else:
        skeleton, label_seg = line[:a] + line[b:], b""
    ids_seg = line[a:b].strip(b" \t\r")
    if not ids_seg:
        return None
    if skeletons is None:
        length = _skeleton_len(skeleton, require_labels)
    else:
        length = skeletons.get(skeleton, _UNSEEN)
        if length is _UNSEEN:
            if len(skeletons) >= _MAX_SKELETONS:
                skeletons.clear()
            length = skeletons[skeleton] = _skeleton_len(skeleton, require_labels)
    if length is _REJECT:
        return None
    return ids_seg, label_seg, length


_UNSEEN = object()
_REJECT = object()
_MAX_SKELETONS = 10_000


def _skeleton_len(skeleton: bytes, require_labels: bool) -> object:
    """The line's "len" (None when absent) if its skeleton is fine, else ``_REJECT``.

    The skeleton must be an object whose lists are exactly the ones cut out: if the key was found
    anywhere else (inside another value, a second time) this fails and json decides.
    """
    try:
        obj = json.loads(skeleton)
    except (ValueError, RecursionError):
        return _REJECT
    if type(obj) is not dict or obj.get("input_ids") != []:
        return _REJECT
    if require_labels and obj.get("labels") != []:
        return _REJECT
    if "len" not in obj:
        return None
    length = obj["len"]
    return length if type(length) is int else _REJECT  # null, true, 3.0: json reports them


def _list_span(line: bytes, key: bytes) -> tuple[int, int] | None:
    """Start and end of the inside of the list after the only occurrence of ``key``."""
    k = line.find(key)
    if k < 0 or line.find(key, k + len(key)) >= 0:
        return None
    a = line.find(b"[", k + len(key))
    if a < 0:
        return None
    b = line.find(b"]", a)
    return None if b < 0 else (a + 1, b)


def _suspect_lines(ids: np.ndarray, counts: np.ndarray, declared: list[object]) -> np.ndarray:
    bad = np.flatnonzero((ids < 0) | (ids > INT32_MAX))
    wrong_len = [
        j
        for j, (x, n) in enumerate(zip(declared, counts.tolist(), strict=False))
        if x is not None and x != n
    ]
    return np.union1d(_line_of(bad, counts), np.array(wrong_len, np.int64))


def _bad_label_lines(labels: np.ndarray, counts: np.ndarray) -> np.ndarray:
    bad = np.flatnonzero((labels != IGNORE_INDEX) & ((labels < 0) | (labels > INT32_MAX)))
    return _line_of(bad, counts)


def _line_of(positions: np.ndarray, counts: np.ndarray) -> np.ndarray:
    if not positions.size:
        return np.zeros(0, np.int64)
    return np.unique(np.searchsorted(np.cumsum(counts), positions, side="right"))


def _split(ids: np.ndarray, counts: np.ndarray, labels: np.ndarray | None) -> list[tuple]:
    cuts = np.cumsum(counts)[:-1]
    ids_parts = np.split(ids, cuts)
    label_parts = np.split(labels, cuts) if labels is not None else [None] * len(ids_parts)
    return list(zip(ids_parts, label_parts, strict=False))


def _keep(items: list, keep: np.ndarray) -> list:
    return [x for x, k in zip(items, keep.tolist(), strict=False) if k]


def _empty(require_labels: bool, problems: list[str]) -> Chunk:
    none = np.zeros(0, np.int64)
    labels = np.zeros(0, np.int32) if require_labels else None
    return Chunk(np.zeros(0, np.int32), labels, none, none, problems, 0)


def _int_list(obj: dict, key: str, where: str, problems: list[str]) -> list[int] | None:
    if key not in obj:
        problems.append(f"{where}: missing field '{key}'")
        return None
    value = obj[key]
    if type(value) is not list:
        problems.append(f"{where}: '{key}' must be a list of integers, got {_json_type(value)}")
        return None
    for p, x in enumerate(value):
        if type(x) is not int:  # also rejects True/False, which Python counts as ints
            shown = json.dumps(x)
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            problems.append(
                f"{where}: '{key}' must be a list of integers, but position {p} holds "
                f"{shown} ({_json_type(x)})"
            )
            return None
    return value


def _json_type(x: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    names.update({int: "an integer", float: "a float", type(None): "null"})
    return names.get(type(x), type(x).__name__)
