"""A run's life around the loop: its output folder, stop signals, and where a resume starts.

* The output folder is checked writable and locked, so a second run started on it refuses (a
  lock held for the run's lifetime and dropped by the kernel when the process dies: no stale
  lock after a crash).
* SIGTERM and SIGINT (preemption, Ctrl-C) ask the loop to stop at the next step boundary; the
  ranks agree on it with one small all-reduce per step, so all of them stop at the same step and
  write the same checkpoint. A second Ctrl-C stops at once.
* On resume, metrics.jsonl keeps only the lines up to the checkpoint's step, so each step
  appears exactly once however often the run was cut off.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
from pathlib import Path
from typing import IO

import torch.distributed as dist

from mt_core.config import ConfigError, TrainingArgs
from mt_fsdp import DistContext, latest_checkpoint

__all__ = ["OutputDir", "StopRequest", "resume_folder", "truncate_metrics"]


class OutputDir:
    """``output_dir``, created, checked writable and locked by rank 0 for the run."""

    def __init__(self, args: TrainingArgs, ctx: DistContext) -> None:
        self.path = Path(args.output_dir)
        self.checkpoints = self.path / "checkpoints"
        self._lock: IO[str] | None = None
        problem = self._claim() if ctx.is_main else ""
        # Rank 0's verdict reaches every rank, so none of them goes on alone.
        verdict = [problem]
        dist.broadcast_object_list(verdict, src=0)
        if verdict[0]:
            raise ConfigError([verdict[0]])

    def _claim(self) -> str:
        if self.path.exists() and not self.path.is_dir():
            return f"output_dir: {self.path} is a file, not a folder; choose a folder"
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as error:
            return f"output_dir: cannot write to {self.path} ({error.strerror or error}); choose a writable folder"
        self._lock = open(self.path / ".mt.lock", "a+")  # noqa: SIM115 - held for the run
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.seek(0)
            holder = self._lock.read().strip() or "another process"
            self._lock.close()
            self._lock = None
            return (
                f"output_dir: {self.path} is in use by another run ({holder}); wait for it to "
                "end or choose another output_dir"
            )
        self._lock.truncate(0)
        self._lock.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        self._lock.flush()
        return ""

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing drops the flock
            self._lock = None


class StopRequest:
    """Turns SIGTERM/SIGINT (and with ``on_demand`` SIGUSR1/SIGUSR2) into a request to write a
    checkpoint and stop at the next step boundary."""

    def __init__(self, on_demand: bool = False) -> None:
        self.received: int | None = None
        self._previous = {}
        numbers = [signal.SIGTERM, signal.SIGINT]
        if on_demand:
            numbers += [signal.SIGUSR1, signal.SIGUSR2]
        for number in numbers:
            # outside the main thread signals stay with whoever handles them (ValueError)
            with contextlib.suppress(ValueError):
                self._previous[number] = signal.signal(number, self._handle)

    def _handle(self, number: int, frame) -> None:
        if self.received == signal.SIGINT and number == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        self.received = number

    @property
    def requested(self) -> bool:
        """Whether this process was asked to stop. Ranks agree by summing it with the step's
        loss (one collective a step): a stop is due when any rank's vote is in the sum."""
        return self.received is not None

    def restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)


def resume_folder(args: TrainingArgs, checkpoints: Path) -> Path | None:
    """The checkpoint this run continues from, or None to start fresh."""
    chosen = args.resume_from_full_state_checkpoint or args.resume
    if chosen == "off":
        return None
    if chosen == "auto":
        return latest_checkpoint(checkpoints)
    folder = Path(chosen)
    if not (folder / "trainer_state.json").is_file():
        raise ConfigError(
            [f"resume: {folder} is not a complete mt checkpoint (no trainer_state.json); give "
             "a checkpoints/step_<N> folder, 'auto' or 'off'"]
        )  # fmt: skip
    return folder


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only the metrics lines of steps up to ``step`` (written atomically)."""
    if not path.is_file():
        return
    kept = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and _step_of(line) is not None and _step_of(line) <= step
    ]
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("".join(line + "\n" for line in kept))
    os.replace(temporary, path)


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None  # a line cut off by a kill: dropped
