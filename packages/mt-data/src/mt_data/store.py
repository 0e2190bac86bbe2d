"""JSONL -> memory-mapped token store, built once per file content and shared by every process.

A store is a folder of flat .npy arrays (``input_ids``, ``labels``, ``offsets``, ``line_numbers``,
``loss_counts``) and ``meta.json``, written last. It is built in a temporary folder and renamed into
place, under an exclusive lock, so a store that has ``meta.json`` is complete and every other
process of the node waits for the one builder and then maps the same files.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from mt_data.errors import DataError
from mt_data.jsonl import IGNORE_INDEX, read_chunks

STORE_FORMAT_VERSION = 1
MAX_PROBLEMS_KEPT = 1000  # a wrong file can have a problem on every line: keep the first ones
_HASH_BLOCK = 4 << 20

logger = logging.getLogger("mt_data")

Progress = Callable[[int, int], None]


@dataclass(frozen=True, eq=False)
class TokenStore:
    """A built store, every array memory-mapped read-only.

    Sample ``i`` is ``input_ids[offsets[i]:offsets[i + 1]]`` (labels likewise, aligned and unshifted),
    from line ``line_numbers[i]`` of ``source``. ``loss_counts[i]`` counts the positions t >= 1 with
    ``labels[t] != -100``: the targets a causal LM learns from the sample after the one-token shift.
    """

    source: Path
    path: Path
    input_ids: np.ndarray
    labels: np.ndarray | None
    offsets: np.ndarray
    line_numbers: np.ndarray
    loss_counts: np.ndarray | None
    meta: dict[str, Any] = field(repr=False)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, source: Path | None = None) -> TokenStore:
        """Maps the store folder ``path``; ``source`` overrides the JSONL path it names in messages."""
        path = Path(path)
        meta = _read_meta(path)
        if meta is None:
            raise FileNotFoundError(f"{path}: not a complete token store (no meta.json)")
        if meta.get("format_version") != STORE_FORMAT_VERSION:
            raise ValueError(
                f"{path}: token store format {meta.get('format_version')!r}, this mt-data reads "
                f"{STORE_FORMAT_VERSION}; delete the folder to rebuild it"
            )
        with_labels = bool(meta["require_labels"])

        def load(name: str, dtype: type) -> np.ndarray:
            array = np.load(path / f"{name}.npy", mmap_mode="r", allow_pickle=False)
            if array.dtype != dtype or array.ndim != 1:
                raise ValueError(
                    f"{path}: {name}.npy is {array.dtype}{array.shape}, not 1-D {dtype}"
                )
            return array

        store = cls(
            source=Path(source) if source is not None else Path(meta["source"]),
            path=path,
            input_ids=load("input_ids", np.int32),
            labels=load("labels", np.int32) if with_labels else None,
            offsets=load("offsets", np.int64),
            line_numbers=load("line_numbers", np.int64),
            loss_counts=load("loss_counts", np.int64) if with_labels else None,
            meta=meta,
        )
        n = meta["num_samples"]
        sizes_ok = (
            store.offsets.size == n + 1
            and store.line_numbers.size == n
            and int(store.offsets[-1]) == store.input_ids.size == meta["num_tokens"]
            and (store.labels is None or store.labels.size == store.input_ids.size)
            and (store.loss_counts is None or store.loss_counts.size == n)
        )
        if not sizes_ok:
            raise ValueError(f"{path}: array sizes disagree with meta.json; delete the folder")
        return store

    def __len__(self) -> int:
        return self.offsets.size - 1

    @property
    def num_tokens(self) -> int:
        return self.input_ids.size

    @cached_property
    def lengths(self) -> np.ndarray:
        """Tokens per sample (int64)."""
        return np.diff(self.offsets)

    def tokens(self, i: int) -> np.ndarray:
        """The input_ids of sample ``i`` (a read-only view)."""
        start, end = self._span(i)
        return self.input_ids[start:end]

    def sample_labels(self, i: int) -> np.ndarray:
        """The labels of sample ``i``, aligned with :meth:`tokens` (a read-only view)."""
        if self.labels is None:
            raise ValueError(
                f"{self.path}: the store has no labels (built with require_labels=False)"
            )
        start, end = self._span(i)
        return self.labels[start:end]

    def location(self, i: int) -> str:
        """``path:line`` of sample ``i`` in the source JSONL."""
        return f"{self.source}:{int(self.line_numbers[i])}"

    def check_token_range(self, vocab_size: int) -> None:
        """Raises DataError naming ``path:line`` of every sample with a token id >= ``vocab_size``."""
        if self.num_tokens == 0:
            return
        starts = self.offsets[:-1]
        problems = []
        arrays = [("token id", self.input_ids)]
        if self.labels is not None:
            arrays.append(("label", self.labels))
        for what, array in arrays:
            # the largest id of each sample in one pass; only the offending samples are looked at
            for i in np.flatnonzero(np.maximum.reduceat(array, starts) >= vocab_size).tolist():
                values = array[self.offsets[i] : self.offsets[i + 1]]
                p = int(np.argmax(values >= vocab_size))
                problems.append(
                    f"{self.location(i)}: {what} {int(values[p])} at position {p} is >= the "
                    f"model's vocabulary size {vocab_size}"
                )
        if problems:
            raise DataError(
                problems,
                header=f"{self.source}: {len(problems)} problem(s) with vocabulary size "
                f"{vocab_size}; was the data tokenized with this model's tokenizer?",
            )

    def _span(self, i: int) -> tuple[int, int]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {i} out of range for a store of {n} samples")
        i %= n
        return int(self.offsets[i]), int(self.offsets[i + 1])


def open_token_store(
    jsonl_path: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    require_labels: bool = True,
    progress: Progress | None = None,
) -> TokenStore:
    """Validates ``jsonl_path`` and builds its store once (per content); then maps it.

    Safe to call from every process of a node at once: one builds, the others wait and map it.
    Bad lines raise :class:`DataError` listing ``path:line: what is wrong``; nothing is built then.
    ``progress(bytes_done, bytes_total)`` is called now and then while a build reads the file.
    """
    source = Path(os.path.abspath(jsonl_path))
    if not source.is_file():
        raise DataError([f"{source}: no such file"])
    cache = Path(cache_dir) if cache_dir is not None else source.parent / ".mt_cache"
    cache.mkdir(parents=True, exist_ok=True)
    digest, size, mtime_ns = _content_hash(source, cache)
    name = store_name(source, digest, require_labels)
    final = cache / name
    if not _is_complete(final):
        with _locked(cache / f".{name}.lock", f"another process builds {final}"):
            if not _is_complete(final):  # it may have been built while we waited
                _build(source, cache, name, digest, (size, mtime_ns), require_labels, progress)
    return TokenStore.open(final, source=source)


def store_name(source: Path, digest: str, require_labels: bool) -> str:
    """Folder name of a store: ``<stem>-<16 hex of the content hash>-v<format>[-nolabels]``."""
    suffix = "" if require_labels else "-nolabels"
    return f"{source.stem}-{digest[:16]}-v{STORE_FORMAT_VERSION}{suffix}"


def _build(
    source: Path,
    cache: Path,
    name: str,
    digest: str,
    stamp: tuple[int, int],
    require_labels: bool,
    progress: Progress | None,
) -> None:
    """Builds into a temporary folder, then renames it into place (caller holds the lock). On
    a network file system whose locks do not reach across nodes another node may build the same
    store at once (and take this one's folder for a killed build's): its copy is used."""
    for leftover in cache.glob(f".{name}.tmp-*"):  # from killed builds: nobody else builds now
        shutil.rmtree(leftover, ignore_errors=True)
    final = cache / name
    if final.exists():  # no meta.json (or another format): never complete, so replace it
        shutil.rmtree(final)
    tmp = cache / f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        _write_store(source, tmp, name, digest, stamp, require_labels, progress)
        os.rename(tmp, final)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (isinstance(error, OSError) and _is_complete(final)):
            raise  # else another node built it at once (where locks do not reach across nodes)


def _write_store(
    source: Path,
    folder: Path,
    name: str,
    digest: str,
    stamp: tuple[int, int],
    require_labels: bool,
    progress: Progress | None,
) -> None:
    size = stamp[0]
    start = time.perf_counter()
    logger.info("building token store %s from %s (%.1f MB)", name, source, size / 1e6)
    names = ["input_ids", "offsets", "line_numbers"]
    if require_labels:
        names += ["labels", "loss_counts"]
    dtypes = {"input_ids": np.int32, "labels": np.int32}
    out = {k: _NpyWriter(folder / f"{k}.npy", dtypes.get(k, np.int64)) for k in names}
    problems: list[str] = []
    num_problems = num_samples = num_tokens = num_loss = 0
    try:
        out["offsets"].append(np.zeros(1, np.int64))
        if progress is not None:
            progress(0, size)
        for chunk in read_chunks(source, where=str(source), require_labels=require_labels):
            if chunk.problems or num_problems:  # keep scanning to report them all; write no more
                num_problems += len(chunk.problems)
                problems.extend(chunk.problems[: MAX_PROBLEMS_KEPT - len(problems)])
            else:
                ends = np.cumsum(chunk.lengths)
                out["input_ids"].append(chunk.input_ids)
                out["offsets"].append(num_tokens + ends)
                out["line_numbers"].append(chunk.line_numbers)
                if chunk.labels is not None:
                    out["labels"].append(chunk.labels)
                    counts = loss_counts(chunk.labels, ends - chunk.lengths)
                    out["loss_counts"].append(counts)
                    num_loss += int(counts.sum())
                num_samples += chunk.lengths.size
                num_tokens += chunk.input_ids.size
            if progress is not None:
                progress(chunk.bytes_done, size)
    finally:
        for writer in out.values():
            writer.close()
    if num_problems:
        kept = "" if num_problems == len(problems) else f" (the first {len(problems)} listed)"
        header = f"{source}: {num_problems} problem(s){kept}; nothing was built"
        raise DataError(problems, header=header)
    if not num_samples:
        raise DataError([f"{source}: no samples (the file is empty or has only blank lines)"])
    if _stamp(source) != stamp:
        raise DataError([f"{source}: the file changed while it was read; try again"])
    meta = {
        "format_version": STORE_FORMAT_VERSION,
        "source": str(source),
        "source_bytes": size,
        "source_mtime_ns": stamp[1],
        "content_sha256": digest,
        "require_labels": require_labels,
        "num_samples": num_samples,
        "num_tokens": num_tokens,
        "num_loss_tokens": num_loss if require_labels else None,
        "build_seconds": round(time.perf_counter() - start, 3),
    }
    _write_json(folder / "meta.json", meta)  # last: its presence marks the store complete
    seconds = time.perf_counter() - start
    logger.info(
        "built token store %s: %d samples, %d tokens from %.1f MB in %.2f s (%.1f MB/s)",
        name, num_samples, num_tokens, size / 1e6, seconds, size / 1e6 / max(seconds, 1e-9),
    )  # fmt: skip


def loss_counts(labels: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Per sample, the positions t >= 1 with a label (samples start at ``starts``, none empty)."""
    learns = labels != IGNORE_INDEX
    learns[starts] = False  # position 0 is never a target after the shift
    return np.add.reduceat(learns, starts, dtype=np.int64) if starts.size else starts


def _content_hash(source: Path, cache: Path) -> tuple[str, int, int]:
    """(sha256 hex, size, mtime_ns) of ``source``, reusing the fingerprint file while they match."""
    real = str(source.resolve())
    key = hashlib.sha256(real.encode()).hexdigest()[:16]
    fingerprint = cache / f".source-{key}.json"
    stamp = _stamp(source)
    digest = _read_fingerprint(fingerprint, stamp)
    if digest is None:
        with _locked(cache / f".source-{key}.lock", f"another process hashes {source}"):
            stamp = _stamp(source)
            digest = _read_fingerprint(fingerprint, stamp)  # hashed while we waited?
            if digest is None:
                digest = _sha256(source)
                if _stamp(source) != stamp:
                    raise DataError([f"{source}: the file changed while it was read; try again"])
                record = {"path": real, "size": stamp[0], "mtime_ns": stamp[1], "sha256": digest}
                _write_json(fingerprint, record)
    return digest, stamp[0], stamp[1]


def _read_fingerprint(path: Path, stamp: tuple[int, int]) -> str | None:
    try:
        record = json.loads(path.read_text())
        if (record["size"], record["mtime_ns"]) == stamp:
            return str(record["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    block = bytearray(_HASH_BLOCK)
    view = memoryview(block)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(block):
            h.update(view[:n])
    return h.hexdigest()


def _read_meta(folder: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _is_complete(folder: Path) -> bool:
    meta = _read_meta(folder)
    return meta is not None and meta.get("format_version") == STORE_FORMAT_VERSION


def _write_json(path: Path, record: dict[str, Any]) -> None:
    """Writes atomically: readers see the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)


@contextmanager
def _locked(path: Path, waiting_for: str) -> Iterator[None]:
    """Exclusive ``flock`` on ``path`` (released when the descriptor closes, even on a crash)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting: %s", waiting_for)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class _NpyWriter:
    """Appends to a 1-D .npy file chunk by chunk; the header gets the final length on close."""

    def __init__(self, path: Path, dtype: type) -> None:
        self.dtype = np.dtype(dtype)
        self.count = 0
        self.file = open(path, "wb")  # noqa: SIM115 (closed by close())
        self.header_size = len(_npy_header(self.dtype, 0))
        self.file.write(b"\0" * self.header_size)

    def append(self, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values, self.dtype)
        self.file.write(memoryview(values).cast("B"))
        self.count += values.size

    def close(self) -> None:
        if self.file.closed:
            return
        # numpy pads the header so that the length can grow in place: the size cannot change
        header = _npy_header(self.dtype, self.count)
        if len(header) != self.header_size:
            raise RuntimeError("the .npy header changed size; cannot write the store")
        self.file.seek(0)
        self.file.write(header)
        self.file.close()


def _npy_header(dtype: np.dtype, count: int) -> bytes:
    buf = io.BytesIO()
    descr = np.lib.format.dtype_to_descr(dtype)
    header = {"descr": descr, "fortran_order": False, "shape": (count,)}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()
