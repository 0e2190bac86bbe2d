"""Benchmark of the JSONL -> token store conversion (mt_data.store): build MB/s and open time.

    uv run python tools/bench/data_store.py [--size-mb 200] [--workdir DIR]

The functions are also called from the main data benchmark. Files are generated, then read while
still in the page cache: the figures are CPU cost, not disk speed.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from mt_data.store import TokenStore, open_token_store


def generate_jsonl(
    path: str | Path,
    target_bytes: int,
    seed: int = 0,
    *,
    mean_tokens: float = 600.0,
    vocab_size: int = 128_256,
    max_tokens: int = 16_384,
) -> int:
    """Writes mini_trainer-style lines until the file holds >= ``target_bytes``; returns samples.

    Lengths are log-normal (mean ``mean_tokens``), ids uniform below ``vocab_size``, and a random
    prefix of each sample's labels (up to 40%, the "prompt") is masked with -100.
    """
    rng = np.random.default_rng(seed)
    sigma = 0.8
    mu = np.log(mean_tokens) - sigma**2 / 2
    samples = written = 0
    with open(path, "w") as f:
        while written < target_bytes:
            lengths = np.clip(rng.lognormal(mu, sigma, 1000).astype(np.int64), 1, max_tokens)
            tokens = rng.integers(0, vocab_size, int(lengths.sum())).tolist()
            prompts = (rng.random(lengths.size) * 0.4 * lengths).astype(np.int64).tolist()
            lines = []
            start = 0
            for n, prompt in zip(lengths.tolist(), prompts, strict=False):
                ids = tokens[start : start + n]
                start += n
                text_ids = ", ".join(map(str, ids))
                text_labels = ", ".join(["-100"] * prompt + list(map(str, ids[prompt:])))
                lines.append(
                    f'{{"input_ids": [{text_ids}], "labels": [{text_labels}], "len": {n}}}\n'
                )
            block = "".join(lines)
            f.write(block)
            written += len(block)
            samples += lengths.size
    return samples


def bench_build(path: str | Path, cache_dir: str | Path | None = None) -> dict:
    """Times a first ``open_token_store`` (hash + validate + write) into an empty cache folder.

    With ``cache_dir`` the store is built there (in a fresh sub-folder) and kept, so the caller can
    open it again (``result["cache_dir"]``); without it, it goes to a temporary folder, then away.
    """
    path = Path(path)
    size_mb = path.stat().st_size / 1e6
    if cache_dir is None:
        with tempfile.TemporaryDirectory(dir=path.parent) as cache:
            return bench_build(path, cache)
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    cache = Path(tempfile.mkdtemp(prefix="store-", dir=cache_dir))  # empty: nothing cached yet
    start = time.perf_counter()
    store = open_token_store(path, cache_dir=cache)
    seconds = time.perf_counter() - start
    samples, tokens = len(store), store.num_tokens
    del store
    return {
        "mb_per_s": size_mb / seconds,
        "seconds": seconds,
        "size_mb": size_mb,
        "samples": samples,
        "tokens": tokens,
        "cache_dir": cache,
    }


def bench_open_1m(
    tmpdir: str | Path, samples: int = 1_000_000, repeats: int = 5
) -> dict[str, float]:
    """Builds a store of ``samples`` short samples (mean ~20 tokens), then times ``TokenStore.open``
    plus ``len(store)`` and ``store.lengths`` (best and median of ``repeats``)."""
    tmpdir = Path(tmpdir)
    tmpdir.mkdir(parents=True, exist_ok=True)
    path = tmpdir / "open_1m.jsonl"
    # ~220 bytes a line: stop once the wanted count is reached, then cut the file there
    made = generate_jsonl(path, samples * 160, seed=1, mean_tokens=20, vocab_size=32_000)
    while made < samples:
        made = generate_jsonl(path, int(path.stat().st_size * samples / made * 1.05) + 1, seed=1,
                              mean_tokens=20, vocab_size=32_000)  # fmt: skip
    _keep_lines(path, samples)
    start = time.perf_counter()
    built = open_token_store(path, cache_dir=tmpdir / "cache")
    build_seconds = time.perf_counter() - start
    folder = built.path
    del built
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        store = TokenStore.open(folder)
        assert len(store) == samples
        assert store.lengths.size == samples
        times.append(time.perf_counter() - start)
        del store
    return {
        "seconds": float(np.median(times)),
        "best_seconds": min(times),
        "samples": samples,
        "build_seconds": build_seconds,
        "build_mb_per_s": path.stat().st_size / 1e6 / build_seconds,
        "size_mb": path.stat().st_size / 1e6,
    }


def _keep_lines(path: Path, count: int) -> None:
    with open(path, "rb") as f:
        head = b"".join(line for _, line in zip(range(count), f, strict=False))
    path.write_bytes(head)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=200.0)
    parser.add_argument("--workdir", default=None, help="where the files go (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        path = Path(work) / "bench.jsonl"
        start = time.perf_counter()
        samples = generate_jsonl(path, int(args.size_mb * 1e6), seed=0)
        print(f"generated {samples} samples in {time.perf_counter() - start:.1f} s")
        build = bench_build(path)
        opened = bench_open_1m(work)
    rows = [
        ("build, ~600-token lines", f"{build['size_mb']:.0f} MB, {build['samples']} samples",
         f"{build['seconds']:.2f} s", f"{build['mb_per_s']:.0f} MB/s"),
        ("build, ~20-token lines", f"{opened['size_mb']:.0f} MB, {opened['samples']} samples",
         f"{opened['build_seconds']:.2f} s", f"{opened['build_mb_per_s']:.0f} MB/s"),
        ("TokenStore.open + len + lengths", f"{opened['samples']} samples",
         f"{opened['seconds'] * 1e3:.1f} ms", f"best {opened['best_seconds'] * 1e3:.1f} ms"),
    ]  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    print(
        " | ".join(
            h.ljust(w) for h, w in zip(("what", "input", "time", "rate"), widths, strict=False)
        )
    )
    print("-+-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)))


if __name__ == "__main__":
    main()
