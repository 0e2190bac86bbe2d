"""mt-data benchmark: JSONL -> store throughput, store open time, per-step data cost.

    uv run python tools/bench/data.py [--size-mb 200] [--workdir DIR]

Prints one table. Targets (issue #3): build >= 50 MB/s on a >= 200 MB file; opening a
1M-sample store < 1 s; sample + pack + collate of a 4,096-sample global batch, per rank.
Not a timed test: run it by hand and record the figures in tools/bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numba
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from data_store import bench_build, bench_open_1m, generate_jsonl  # noqa: E402
from packing import cpu_model  # noqa: E402

from mt_data import InfiniteSampler, SampleDataset, StepLoader, open_token_store  # noqa: E402


def bench_step(dataset: SampleDataset, num_ranks: int, max_tokens: int, steps: int = 20) -> dict:
    """Median seconds of one rank's sample + pack + collate for a 4,096-sample global batch."""
    loader = StepLoader(
        dataset,
        InfiniteSampler(len(dataset), 4096, seed=0),
        max_tokens,
        num_ranks=num_ranks,
        rank=0,
    )
    steps_iter = iter(loader)
    next(steps_iter)  # JIT load and first-touch of the memory map
    times, minibatches, tokens = [], [], []
    for _ in range(steps):
        start = time.perf_counter()
        step = next(steps_iter)
        times.append(time.perf_counter() - start)
        minibatches.append(len(step.minibatches))
        tokens.append(sum(mb.num_tokens for mb in step.minibatches))
    return {
        "ms": 1e3 * float(np.median(times)),
        "minibatches": float(np.mean(minibatches)),
        "rank_tokens": float(np.mean(tokens)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=200, help="size of the generated JSONL")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: tmp)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        path = tmp / "sft.jsonl"
        samples = generate_jsonl(path, args.size_mb * 1_000_000, seed=0)
        build = bench_build(path, tmp / "cache")
        opened = bench_open_1m(tmp / "open")
        dataset = SampleDataset(open_token_store(path, cache_dir=build["cache_dir"]))
        rows = [
            (
                "JSONL -> store",
                f"{build['size_mb']:.0f} MB, {samples:,} samples",
                f"{build['mb_per_s']:.0f} MB/s ({build['seconds']:.1f} s)",
                ">= 50 MB/s",
            ),
            (
                "JSONL -> store",
                f"{opened['size_mb']:.0f} MB, {opened['samples']:,} short samples (~20 tokens)",
                f"{opened['build_mb_per_s']:.0f} MB/s ({opened['build_seconds']:.1f} s)",
                "",
            ),
            (
                "open store",
                f"{opened['samples']:,} samples (TokenStore.open + len + lengths)",
                f"{opened['seconds'] * 1e3:.1f} ms (median of 5)",
                "< 1 s",
            ),
        ]
        for ranks, max_tokens in ((1, 4096 * 8192), (8, 65536), (64, 16384)):
            step = bench_step(dataset, ranks, max_tokens)
            rows.append(
                (
                    "step data, rank 0",
                    f"4,096 samples / {ranks} rank(s), {max_tokens:,} tok/rank",
                    f"{step['ms']:.1f} ms ({step['minibatches']:.1f} minibatches, "
                    f"{step['rank_tokens']:,.0f} tokens)",
                    "",
                )
            )
    print(
        f"\nmt-data benchmark - {cpu_model()}, {os.cpu_count()} CPUs, "
        f"python {platform.python_version()}, numpy {np.__version__}, numba {numba.__version__}"
    )
    widths = [max(len(str(row[i])) for row in rows + [HEADER]) for i in range(4)]
    for row in [HEADER, tuple("-" * w for w in widths), *rows]:
        print(" | ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=False)))


HEADER = ("what", "case", "measured", "target")


if __name__ == "__main__":
    main()
