"""What each step reports: the metrics.jsonl line, its mirror to the trackers, the progress display."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["MetricsLog", "ProgressBar", "step_text"]


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


class ProgressBar:
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
