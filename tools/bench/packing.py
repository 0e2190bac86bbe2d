"""mt-packing benchmark: first-call and per-plan time, load balance, minibatch count.

    uv run python tools/bench/packing.py [--plans 1000] [--sigma 1.0] [--seed 0]

Prints one table, one row per case (global batch size / ranks / max tokens per rank). Lengths
are log-normal (mean ~600 tokens, ``--sigma`` of the log), rounded and clipped to [1, 8192]; each
plan packs a new random batch. Columns:

* first call, cold: ``pack_minibatches`` once in a fresh process with an empty numba cache
  (``NUMBA_CACHE_DIR`` in a temp folder): compile + run. Warm: a second fresh process with the
  same cache folder: load from the disk cache + run. Import time is not included (shown apart).
* plan: median (and 95th percentile) wall time of ``pack_minibatches(lengths, ...)`` for all ranks,
  after the JIT.
* max/mean: per minibatch, the most loaded rank's tokens over the mean rank's tokens (empty slots
  count as 0), averaged over the plan's minibatches, then over plans; and the worst minibatch
  seen. ``sum max / ideal`` is the step's real cost, the sum over minibatches of the most loaded
  rank's tokens, over the ideal total / num_ranks.
* minibatches: mean count, and mean (max) excess over the volume bound
  ceil(total / (num_ranks * max_tokens_per_rank)).
* plain LPT: max/mean and sum max / ideal of plain LPT's placement of the same batches at the same
  count (``lpt_slot_assignment(..., balance_minibatches=False)``), what the plan improves on; and
  the share of plans that kept the balance-aware placement.

Targets (issue #3): < 1 ms per 4,096/64 plan; max/mean <= 1.02 averaged over plans.
Not a timed test: run it by hand and record the figures in tools/bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numba
import numpy as np

from mt_packing import lpt_slot_assignment, pack_minibatches

CASES = ((4096, 64, 16384), (128, 8, 8192))  # (samples, ranks, max_tokens_per_rank)
MEAN_TOKENS = 600
MAX_LENGTH = 8192

# Run in a fresh interpreter: import, then time the first call (compile or cache load + run).
FIRST_CALL = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
from mt_packing import pack_minibatches
t1 = time.perf_counter()
n, m, limit = map(int, sys.argv[1:4])
lengths = np.random.default_rng(0).integers(1, 1000, n)
t2 = time.perf_counter()
pack_minibatches(lengths, limit, m)
t3 = time.perf_counter()
print("RESULT " + json.dumps({"import_s": t1 - t0, "first_call_s": t3 - t2}))
"""


def draw_lengths(rng: np.random.Generator, n: int, sigma: float) -> np.ndarray:
    mu = np.log(MEAN_TOKENS) - sigma**2 / 2  # log-normal mean = exp(mu + sigma^2 / 2)
    return np.clip(np.rint(rng.lognormal(mu, sigma, n)), 1, MAX_LENGTH).astype(np.int64)


def first_call(n: int, m: int, limit: int, cache_dir: str) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    env["NUMBA_CACHE_DIR"] = cache_dir
    done = subprocess.run(
        [sys.executable, "-c", FIRST_CALL, str(n), str(m), str(limit)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def balance_of(slot: np.ndarray, lengths: np.ndarray, k: int, m: int) -> tuple[float, float, float]:
    """(mean max/mean over minibatches, worst minibatch's max/mean, sum max / ideal)."""
    loads = np.bincount(slot, weights=lengths, minlength=k * m).reshape(k, m)
    ratio = loads.max(axis=1) / loads.mean(axis=1)
    return ratio.mean(), ratio.max(), loads.max(axis=1).sum() / (lengths.sum() / m)


def bench_case(n: int, m: int, limit: int, plans: int, sigma: float, seed: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="numba-cache-") as cache:
        cold = first_call(n, m, limit, cache)
        warm = first_call(n, m, limit, cache)
    rng = np.random.default_rng(seed)
    pack_minibatches(draw_lengths(rng, n, sigma), limit, m)  # JIT (or cache load) out of the way
    times, balance, worst, cost, counts, excess = [], [], [], [], [], []
    plain_balance, plain_cost, kept = [], [], []
    for _ in range(plans):
        lengths = draw_lengths(rng, n, sigma)
        start = time.perf_counter()
        plan = pack_minibatches(lengths, limit, m)
        times.append(time.perf_counter() - start)
        k, slot = lpt_slot_assignment(lengths, limit, m)  # the same plan, as slots
        assert k == len(plan[0])
        mean_ratio, worst_ratio, step_cost = balance_of(slot, lengths, k, m)
        balance.append(mean_ratio)
        worst.append(worst_ratio)
        cost.append(step_cost)
        k_plain, plain = lpt_slot_assignment(lengths, limit, m, balance_minibatches=False)
        assert k_plain == k
        mean_ratio, _, step_cost = balance_of(plain, lengths, k, m)
        plain_balance.append(mean_ratio)
        plain_cost.append(step_cost)
        kept.append(not np.array_equal(slot, plain))
        counts.append(k)
        excess.append(k - -(-int(lengths.sum()) // (m * limit)))
    times_ms = 1e3 * np.asarray(times)
    return {
        "cold_s": cold["first_call_s"],
        "warm_s": warm["first_call_s"],
        "import_s": warm["import_s"],
        "plan_ms": float(np.median(times_ms)),
        "plan_p95_ms": float(np.percentile(times_ms, 95)),
        "balance": float(np.mean(balance)),
        "worst": float(np.max(worst)),
        "cost": float(np.mean(cost)),
        "minibatches": float(np.mean(counts)),
        "excess": float(np.mean(excess)),
        "excess_max": int(np.max(excess)),
        "plain_balance": float(np.mean(plain_balance)),
        "plain_cost": float(np.mean(plain_cost)),
        "kept": float(np.mean(kept)),
    }


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plans", type=int, default=1000, help="random batches per case")
    parser.add_argument("--sigma", type=float, default=1.0, help="sigma of log(length)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    header = (
        "case (samples/ranks/max tok)",
        "first call cold",
        "first call warm",
        "plan median (p95)",
        "max/mean avg (worst mb)",
        "sum max / ideal",
        "minibatches (excess: mean, max)",
        "plain LPT: max/mean, sum max (plans balance-aware)",
    )
    rows = []
    for n, m, limit in CASES:
        r = bench_case(n, m, limit, args.plans, args.sigma, args.seed)
        rows.append(
            (
                f"{n:,} / {m} / {limit:,}",
                f"{r['cold_s'] * 1e3:.0f} ms",
                f"{r['warm_s'] * 1e3:.1f} ms",
                f"{r['plan_ms']:.3f} ms ({r['plan_p95_ms']:.3f})",
                f"{r['balance']:.4f} ({r['worst']:.3f})",
                f"{r['cost']:.4f}",
                f"{r['minibatches']:.2f} (+{r['excess']:.3f}, +{r['excess_max']})",
                f"{r['plain_balance']:.4f}, {r['plain_cost']:.4f} ({100 * r['kept']:.0f}%)",
            )
        )
    print(
        f"\nmt-packing benchmark - {cpu_model()}, {os.cpu_count()} CPUs, python "
        f"{platform.python_version()}, numba {numba.__version__}, numpy {np.__version__}\n"
        f"{args.plans} plans per case; lengths log-normal, mean {MEAN_TOKENS}, sigma "
        f"{args.sigma}, clipped to [1, {MAX_LENGTH}]; import of mt_packing "
        f"{r['import_s'] * 1e3:.0f} ms (not in first call)\n"
        "targets: plan < 1 ms at 4,096/64; max/mean <= 1.02 averaged over plans"
    )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print(" | ".join(cells).rstrip())


if __name__ == "__main__":
    main()
