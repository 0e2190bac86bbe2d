"""Where a train step's time goes, from a torch.profiler Chrome trace of ``mt_core.train``.

    python3 tools/bench/trace_summary.py TRACE.json [--skip 2]

Steps are found by the trainer's named ranges (``mt.data`` opens each step; ``mt.clip`` and
``mt.optimizer`` mark gradient clipping and the optimizer on the GPU). For each step after the
first ``--skip``: GPU time in GEMMs, attention, communication (NCCL) and other kernels; the
optimizer's and clipping's kernels; and the GPU's idle time (data preparation on the host, host
synchronisation and launch gaps all show up there). Prints one table and the top kernels.
"""

from __future__ import annotations

import argparse
import bisect
import json
import re
from collections import defaultdict
from pathlib import Path

CATEGORIES = (  # first match wins (attention kernels' template names mention GEMMs)
    ("attention", re.compile(r"flash|fmha|attention|attn|varlen", re.I)),
    ("gemm", re.compile(r"gemm|cutlass|nvjet|xmma|cublas|matmul|splitk", re.I)),
    ("nccl", re.compile(r"nccl", re.I)),
)
# GPU ranges whose kernels are counted as theirs (by name prefix). The optimizer's kernels run
# inside torch.optim's own range too (Optimizer.step#AdamW.step); on the H100 traces of session 3
# no kernel fell in mt.optimizer's GPU range, so both names count.
PHASES = {"optimizer": ("mt.optimizer", "Optimizer.step#"), "clip": ("mt.clip",)}


def _gaps(intervals: list[tuple[float, float]], begin: float, end: float) -> list[tuple]:
    """The stretches of [begin, end) that no interval covers."""
    gaps, reached = [], begin
    for start, stop in sorted(intervals):
        if start > reached:
            gaps.append((reached, min(start, end)))
        reached = max(reached, stop)
    if reached < end:
        gaps.append((reached, end))
    return [(a, b) for a, b in gaps if b > a]


def _host_activity(host: list[dict], starts: list[float], at: float) -> str:
    """What the host was doing at ``at``: the innermost CPU op or runtime call running then
    (``host`` sorted by start; the innermost began recently, so only the last few are read)."""
    first = bisect.bisect_right(starts, at)
    running = [e for e in host[max(0, first - 5000) : first] if at < e["ts"] + e["dur"]]
    return min(running, key=lambda e: e["dur"])["name"][:60] if running else "(no op: Python)"


def category(name: str) -> str:
    return next((label for label, pattern in CATEGORIES if pattern.search(name)), "other")


def summarise(trace: dict, skip: int = 2) -> dict:
    """Per-step averages (milliseconds) over the steps after ``skip``, and the top kernels."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    starts = sorted(e["ts"] for e in events
                    if e.get("cat") == "user_annotation" and e["name"] == "mt.data")  # fmt: skip
    if len(starts) < skip + 2:
        raise ValueError(f"the trace has {len(starts)} steps; need more than {skip + 1}")
    windows = list(zip(starts[skip:-1], starts[skip + 1 :], strict=True))
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    phases = {phase: [(e["ts"], e["ts"] + e["dur"]) for e in events
                      if e.get("cat") == "gpu_user_annotation" and e["name"].startswith(names)]
              for phase, names in PHASES.items()}  # fmt: skip
    data = [e for e in events if e.get("cat") == "user_annotation" and e["name"] == "mt.data"]
    host = sorted((e for e in events if e.get("cat") in ("cpu_op", "cuda_runtime",
                                                         "user_annotation")),
                  key=lambda e: e["ts"])  # fmt: skip
    host_starts = [e["ts"] for e in host]
    idle_by_host: dict[str, float] = defaultdict(float)

    totals: dict[str, float] = defaultdict(float)
    by_name: dict[str, float] = defaultdict(float)
    for begin, end in windows:
        inside = [k for k in kernels if begin <= k["ts"] < end]
        totals["step"] += end - begin
        gaps = _gaps([(k["ts"], k["ts"] + k["dur"]) for k in inside], begin, end)
        totals["busy"] += (end - begin) - sum(b - a for a, b in gaps)
        for a, b in gaps:  # why the GPU waited: the host's activity in the middle of the gap
            short = b - a < 20  # microseconds: launch latency between kernels
            why = "(gaps under 20 us)" if short else _host_activity(host, host_starts, (a + b) / 2)
            idle_by_host[why] += b - a
        totals["data (host)"] += sum(e["dur"] for e in data if begin <= e["ts"] < end)
        for k in inside:
            phase = next((name for name, ranges in phases.items()
                          if any(a <= k["ts"] < b for a, b in ranges)), None)  # fmt: skip
            totals[phase or category(k["name"])] += k["dur"]
            by_name[k["name"]] += k["dur"]
    steps = len(windows)
    summary = {key: value / steps / 1000 for key, value in totals.items()}
    summary["idle"] = summary["step"] - summary["busy"]
    summary["steps"] = steps
    top = sorted(by_name.items(), key=lambda item: -item[1])[:12]
    summary["top_kernels"] = [(name[:90], ms / steps / 1000) for name, ms in top]
    waits = sorted(idle_by_host.items(), key=lambda item: -item[1])[:8]
    summary["idle_during"] = [(name, ms / steps / 1000) for name, ms in waits]
    return summary


def render(summary: dict) -> str:
    step = summary["step"]
    lines = [f"per step, mean of {summary['steps']} steps: {step:.1f} ms",
             "part | ms | share of step"]  # fmt: skip
    for key in ("gemm", "attention", "other", "nccl", "optimizer", "clip", "idle", "data (host)"):
        value = summary.get(key, 0.0)
        lines.append(f"{key} | {value:.1f} | {value / step:.1%}")
    overhead = sum(summary.get(key, 0.0) for key in ("optimizer", "clip", "idle"))
    lines.append(f"optimizer + clipping + GPU idle (data, host sync, launch gaps) | "
                 f"{overhead:.1f} | {overhead / step:.1%}")  # fmt: skip
    lines.append("GPU idle while the host ran | ms per step")
    lines += [f"{name} | {ms:.2f}" for name, ms in summary.get("idle_during", [])]
    lines.append("top kernels | ms per step")
    lines += [f"{name} | {ms:.2f}" for name, ms in summary["top_kernels"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", type=Path)
    parser.add_argument("--skip", type=int, default=2, help="first steps left out (compilation)")
    options = parser.parse_args()
    print(render(summarise(json.loads(options.trace.read_text()), options.skip)))


if __name__ == "__main__":
    main()
