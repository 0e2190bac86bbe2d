"""What each step reports: FLOPs and MFU, the metrics.jsonl line, wandb, the progress display.

MFU counts real tokens only (never padding): FLOPs per token = 6N + 12·layers·hidden·c, where N
is the matmul parameter count and c the mean attended context of the step's tokens (a token at
position t of its document attends to t + 1 tokens).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "MetricsLog",
    "Progress",
    "attended_context",
    "flops_per_token",
    "peak_flops_of",
    "peak_flops_per_gpu",
    "step_text",
]

# Dense bf16 datasheet peaks (FLOP/s) by device-name fragment; MFU is reported against these.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "H800": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
}


def peak_flops_per_gpu(device: torch.device) -> float | None:
    """The datasheet bf16 peak of ``device``; None on CPU or an unknown GPU (no MFU then)."""
    if device.type != "cuda":
        return None
    return peak_flops_of(torch.cuda.get_device_name(device))


def peak_flops_of(device_name: str) -> float | None:
    """The datasheet bf16 peak of a GPU of this name (as CUDA reports it); None if unknown."""
    for fragment, peak in PEAK_BF16_FLOPS.items():
        if fragment in device_name:
            return peak
    return None


def attended_context(segment_lengths: np.ndarray) -> float:
    """Mean number of tokens each token attends to, over documents of these lengths."""
    lengths = np.asarray(segment_lengths, dtype=np.float64)
    total = lengths.sum()
    return float((lengths * (lengths + 1) / 2).sum() / total) if total else 0.0


def flops_per_token(matmul_params: int, layers: int, hidden: int, context: float) -> float:
    """Training FLOPs per token: 6N for the weights (forward + backward) plus attention scores
    and their weighted sum, 12·layers·hidden·context."""
    return 6.0 * matmul_params + 12.0 * layers * hidden * context


class MetricsLog:
    """``metrics.jsonl``, one JSON object per line, appended and flushed as each step ends (a
    crash loses at most the line being written); mirrored to the trackers (wandb, MLflow)."""

    def __init__(self, path: Path, trackers: list | None = None) -> None:
        self.path = path
        self.trackers = trackers or []
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - open for the run

    def write(self, record: dict[str, Any]) -> None:
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()
        }
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        present = {k: v for k, v in record.items() if v is not None}
        for tracker in self.trackers:
            tracker.log(present, step=record["step"])

    def close(self) -> None:
        self._file.close()
        for tracker in self.trackers:
            tracker.finish()


def step_text(record: dict[str, Any]) -> str:
    """What the progress display shows of a step's metrics line: loss, learning rate, speed, then
    MFU and peak memory where the record has them (no MFU on CPU or an unknown GPU)."""
    parts = [
        f"loss {record['loss']:.4f}",
        f"lr {record['lr']:.2e}",
        f"{record['tokens_per_s']:,.0f} tok/s",
    ]
    if record.get("mfu") is not None:
        parts.append(f"MFU {record['mfu']:.1%}")
    if record.get("peak_mem_gib") is not None:
        parts.append(f"peak mem {record['peak_mem_gib']:.2f} GiB")
    return "  ".join(parts)


class Progress:
    """A tqdm bar on a terminal; one plain line per step otherwise (logs, CI, SLURM files)."""

    def __init__(self, total: int | None, enabled: bool, done: int = 0) -> None:
        self.enabled = enabled
        self.bar = None
        if enabled and sys.stderr.isatty() and not os.environ.get("MT_PLAIN_PROGRESS"):
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, unit="step", dynamic_ncols=True)

    def update(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        text = step_text(record)
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        else:
            print(f"step {record['step']}  {text}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
