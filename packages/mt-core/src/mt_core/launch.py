"""Launch a multi-process run from Python, as mini_trainer's ``api_train`` does:
``run_training(TorchrunArgs(nproc_per_node=8), TrainingArgs(...))``.

The run file is written to ``<output_dir>/run.toml`` and torchrun runs ``python -m mt_core run``
on it (mt-core's own entry: the ``mt`` command sits above mt-core and may not be used from here).
Every line the run prints goes to the console and to ``<output_dir>/training.log`` as it comes
(on several nodes ``training-<host>.log``: lines appended to one file from several machines can
be lost on a network file system).

torchrun starts in a session of its own, so a Ctrl-C at the terminal reaches only the caller; the
caller then ends the run as a whole: SIGTERM to torchrun (which passes it to its workers, and
mt's loop stops at the next step boundary), a grace period, then SIGKILL for every process left
in the run's sessions (torchrun's workers start sessions of their own, found through /proc). No
process of the run outlives the call, unless the caller itself is SIGKILLed.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import FrameType
from typing import IO, Any

import attrs

from mt_core.config import ConfigError, TrainingArgs, write_run_file
from mt_core.config.fields import KeyedConfigError, at_least, field, greater_than, not_empty

__all__ = ["TrainingFailed", "TorchrunArgs", "run_training", "torchrun_command"]

_GROUP = "torchrun"
GRACE_PERIOD_S = 60.0  # above torchrun's own 30 s wait for its workers, so it can finish first
LAST_LINES = 20


def _nproc_check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value == "gpu" or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return
    raise KeyedConfigError(
        [(attribute.name, f"expected a positive integer or 'gpu', got {value!r}")]
    )


def _rdzv_id_check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None or (isinstance(value, (int, str)) and not isinstance(value, bool)):
        return
    raise KeyedConfigError([(attribute.name, f"expected a string or an integer, got {value!r}")])


def _host_port(value: str) -> str | None:
    host, _, port = value.rpartition(":")
    if host and port.isdigit() and 0 < int(port) < 65536:
        return None
    return f"expected 'host:port', got {value!r}"


def _port(value: int) -> str | None:
    return None if 0 < value < 65536 else f"must be a port number (1 to 65535), got {value}"


@attrs.define(kw_only=True)
class TorchrunArgs:
    """How torchrun starts the run's processes: mini_trainer's ``TorchrunArgs``, same names.

    One node: leave the rendezvous fields unset (a free local port is chosen). Several nodes:
    every node gets the same arguments but its own ``node_rank``, and either ``rdzv_endpoint``
    (c10d rendezvous) or ``master_addr`` (+ ``master_port``), never both."""

    nnodes: int = field(
        "Number of nodes (machines).", _GROUP, "integer", greater_than(0), default=1
    )
    nproc_per_node: int | str = attrs.field(
        default="gpu",
        validator=_nproc_check,
        metadata={
            "help": "Processes on this node: a number, or 'gpu' for one per visible GPU "
            "(an error on a machine without GPUs).",
            "group": _GROUP,
        },
    )
    node_rank: int = field(
        "This node's rank, 0 to nnodes - 1.", _GROUP, "integer", at_least(0), default=0
    )
    rdzv_id: str | int | None = attrs.field(
        default=None,
        validator=_rdzv_id_check,
        metadata={"help": "Rendezvous id, the same on every node of the job.", "group": _GROUP},
    )
    rdzv_endpoint: str | None = field(
        "Rendezvous 'host:port' (c10d), reachable from every node.",
        _GROUP,
        "string",
        _host_port,
        default=None,
        optional=True,
    )
    master_addr: str | None = field(
        "Address of the node of rank 0 (static rendezvous); not with rdzv_endpoint.",
        _GROUP,
        "string",
        not_empty,
        default=None,
        optional=True,
    )
    master_port: int | None = field(
        "Port on master_addr (static rendezvous); torchrun's 29500 if unset.",
        _GROUP,
        "integer",
        _port,
        default=None,
        optional=True,
    )

    def __attrs_post_init__(self) -> None:
        problems = []
        if self.rdzv_endpoint is not None and self.master_addr is not None:
            problems.append(
                ("master_addr", "give rdzv_endpoint or master_addr (+ master_port), not both")
            )
        elif self.rdzv_endpoint is not None and self.master_port is not None:
            problems.append(("master_port", "goes with master_addr; rdzv_endpoint has its port"))
        if self.nnodes > 1 and self.rdzv_endpoint is None and self.master_addr is None:
            problems.append(
                ("nnodes", f"{self.nnodes} nodes need rdzv_endpoint or master_addr to meet at")
            )
        if self.node_rank >= self.nnodes:
            problems.append(
                ("node_rank", f"must be < nnodes ({self.nnodes}), got {self.node_rank}")
            )
        if problems:
            raise KeyedConfigError(problems)


class TrainingFailed(RuntimeError):
    """The run ended with a non-zero exit code. ``last_lines`` are the run's last output lines
    before torchrun's own failure report (the report, which names no cause, stays in the log)."""

    def __init__(self, exit_code: int, last_lines: list[str], log_file: Path) -> None:
        self.exit_code = exit_code
        self.last_lines = last_lines
        self.log_file = log_file
        shown = "\n".join(f"  {line}" for line in last_lines) or "  (no output)"
        super().__init__(
            f"training failed with exit code {exit_code}; its last lines ({log_file} has all):\n"
            f"{shown}"
        )


def torchrun_command(torchrun_args: TorchrunArgs, run_file: str | os.PathLike) -> list[str]:
    """The torchrun command line that trains ``run_file``; 'gpu' is resolved to a number here."""
    t = torchrun_args
    nproc = _visible_gpus() if t.nproc_per_node == "gpu" else t.nproc_per_node
    torchrun = Path(sys.executable).parent / "torchrun"
    command = (
        [str(torchrun)] if torchrun.is_file() else [sys.executable, "-m", "torch.distributed.run"]
    )
    command += [f"--nnodes={t.nnodes}", f"--nproc-per-node={nproc}", f"--node-rank={t.node_rank}"]
    if t.rdzv_id is not None:
        command.append(f"--rdzv-id={t.rdzv_id}")
    if t.rdzv_endpoint is not None:
        command += ["--rdzv-backend=c10d", f"--rdzv-endpoint={t.rdzv_endpoint}"]
    elif t.master_addr is not None or t.master_port is not None:
        command += [f"--master-addr={t.master_addr}"] if t.master_addr is not None else []
        command += [f"--master-port={t.master_port}"] if t.master_port is not None else []
    elif t.rdzv_id is None:
        # one node, nothing given: a free local port, so that runs side by side don't collide
        command.append("--standalone")
    return command + ["-m", "mt_core", "run", str(run_file)]


def _visible_gpus() -> int:
    import torch  # device_count asks NVML where it can: CUDA is not initialised in the caller

    count = torch.cuda.device_count()
    if count == 0:
        raise ConfigError(
            "nproc_per_node: 'gpu' means one process per GPU, but this machine shows no GPU "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
            "give a number of processes instead"
        )
    return count


def run_training(
    torchrun_args: TorchrunArgs,
    training_args: TrainingArgs,
    *,
    log_file: str | os.PathLike | None = None,
    grace_period_s: float = GRACE_PERIOD_S,
) -> None:
    """Train ``training_args`` under torchrun and return when the run has ended.

    Writes ``<output_dir>/run.toml``, streams the run's output to stdout and to ``log_file``
    (default ``<output_dir>/training.log``, on several nodes ``training-<host>.log``; appended
    to), and raises :class:`TrainingFailed` if
    the run fails. Interrupted (KeyboardInterrupt; SIGTERM or SIGHUP where no handler is set),
    it stops the run: SIGTERM, ``grace_period_s`` to stop, then SIGKILL; a second interrupt
    kills at once. Then the KeyboardInterrupt propagates, or the signal ends the caller as it
    would have."""
    output_dir = Path(training_args.output_dir)
    run_file = output_dir / "run.toml"
    command = torchrun_command(torchrun_args, run_file)  # first: may refuse ('gpu', no GPU)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_run_file(training_args, run_file)
    several = torchrun_args.nnodes > 1
    default_log = output_dir / (
        f"training-{socket.gethostname()}.log" if several else "training.log"
    )
    log_path = Path(log_file) if log_file is not None else default_log
    log_path.parent.mkdir(parents=True, exist_ok=True)

    with open(log_path, "a", encoding="utf-8") as log, _stop_signals():
        log.write(f"$ {subprocess.list2cmdline(command)}\n")
        log.flush()
        process = output = None
        try:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: signalled as one, not by Ctrl-C
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            output = _Output(process.stdout, log)
            output.start()
            exit_code = process.wait()
        except BaseException:  # KeyboardInterrupt, _Stopped: end the run, then let it propagate
            if process is not None:
                _end_run(process, grace_period_s)
            if output is not None:
                output.join(timeout=5)
            raise
        output.join(timeout=30)  # EOF once every process holding the pipe is gone
    if exit_code != 0:
        raise TrainingFailed(exit_code, _cause_lines(output.tail), log_path)


# ---------------------------------------------------------------------------------------------
# Output


class _Output(threading.Thread):
    """Copies the run's output, line by line as it comes, to stdout and the log; keeps a tail."""

    def __init__(self, stream: IO[bytes], log: IO[str]) -> None:
        super().__init__(name="mt-run-output", daemon=True)
        self.stream = stream
        self.log = log
        self.tail: collections.deque[str] = collections.deque(maxlen=200)

    def run(self) -> None:
        for raw in iter(self.stream.readline, b""):
            text = raw.decode("utf-8", "replace")
            self.tail.append(text.rstrip("\r\n"))
            with contextlib.suppress(ValueError):  # the log is closed once the caller gives up
                self.log.write(text)
                self.log.flush()
            if sys.stdout is not None:
                # the pipe must be drained whatever the console does, or the run blocks on it
                with contextlib.suppress(OSError, ValueError):
                    sys.stdout.write(text)
                    sys.stdout.flush()
        self.stream.close()


# torchrun's own log lines, e.g. "W1125 09:10:47.226000 29994 torch/distributed/elastic/...] ..."
_TORCHRUN_NOTE = re.compile(r"^[IW]\d{4} [\d:.]+ +\d+ \S*torch/distributed/")


def _cause_lines(tail: Iterable[str]) -> list[str]:
    """The last lines of a failed run without torchrun's closing report (its own traceback and
    the per-rank summary, printed after the workers' output) and its notices."""
    lines = list(tail)
    report = next(
        (i for i in range(len(lines) - 1, -1, -1) if "ChildFailedError" in lines[i]), None
    )
    if report is not None:
        start = next(
            (i for i in range(report, -1, -1) if lines[i].startswith("Traceback (most recent")),
            report,
        )
        lines = lines[:start]
    lines = [line for line in lines if not _TORCHRUN_NOTE.match(line)]
    return lines[-LAST_LINES:] or list(tail)[-LAST_LINES:]


# ---------------------------------------------------------------------------------------------
# Interruption


class _Stopped(BaseException):
    """SIGTERM or SIGHUP arrived while the caller waited for the run."""

    def __init__(self, number: int) -> None:
        super().__init__(signal.Signals(number).name)
        self.number = number


class _StopState:
    signal: int | None = None


@contextlib.contextmanager
def _stop_signals() -> Iterator[_StopState]:
    """SIGTERM and SIGHUP, where they would kill the caller outright (no handler set), raise
    :class:`_Stopped` instead, so the run is ended first; afterwards the signal is delivered
    again with its default action, and the caller ends as it would have."""
    state = _StopState()
    previous: dict[int, Any] = {}

    def handle(number: int, frame: FrameType | None) -> None:
        state.signal = number
        raise _Stopped(number)

    if threading.current_thread() is threading.main_thread():
        for number in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(number) == signal.SIG_DFL:
                previous[number] = signal.signal(number, handle)
    try:
        yield state
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if state.signal is not None:
            signal.raise_signal(state.signal)
            raise SystemExit(128 + state.signal)  # only if the signal did not end the process


def _end_run(process: subprocess.Popen, grace_period_s: float) -> None:
    """SIGTERM to torchrun's group (torchrun stops its workers), up to ``grace_period_s`` for
    the run to end, then SIGKILL to every process left in the run's sessions."""
    sessions = _run_sessions(process.pid, {process.pid})
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_period_s
    try:
        while time.monotonic() < deadline:
            sessions = _run_sessions(process.pid, sessions)
            if process.poll() is not None and not _members(sessions):
                break
            time.sleep(0.2)
    except BaseException:  # a second interrupt: kill now
        pass
    finally:
        for _ in range(50):  # until none is left (a dying process may still fork)
            sessions = _run_sessions(process.pid, sessions)
            alive = _members(sessions)
            if not alive:
                break
            for pid in alive:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)  # where /proc is missing
        process.wait()


def _processes() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, session id, state) of every process, from /proc; {} without it."""
    table = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as file:
                    stat = file.read().decode("ascii", "replace")
            except OSError:
                continue
            # "pid (comm) state ppid pgrp session ...": comm may hold spaces and parentheses
            fields = stat[stat.rindex(")") + 2 :].split()
            table[int(entry.name)] = (int(fields[1]), int(fields[3]), fields[0])
    return table


def _run_sessions(root: int, sessions: set[int]) -> set[int]:
    """``sessions`` and the session of every descendant of ``root`` (torchrun's workers start
    their own), so that a process stays found after torchrun is gone and it is reparented."""
    table = _processes()
    children: dict[int, list[int]] = collections.defaultdict(list)
    for pid, (parent, _, _) in table.items():
        children[parent].append(pid)
    found = set(sessions)
    stack = [root]
    while stack:
        pid = stack.pop()
        if pid in table:
            found.add(table[pid][1])
        stack += children.get(pid, [])
    found.discard(os.getsid(0))  # never the caller's own session
    return found


def _members(sessions: set[int]) -> list[int]:
    """Live (not zombie) processes of ``sessions``, the caller excepted."""
    me = os.getpid()
    return [
        pid
        for pid, (_, session, state) in _processes().items()
        if session in sessions and state != "Z" and pid != me
    ]
