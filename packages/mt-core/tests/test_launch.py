"""run_training: the same run as the `mt` command, failures with their cause, no process left
behind when interrupted; and TorchrunArgs' checks. CPU, gloo; each torchrun start costs seconds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from mt_core.config import ConfigError, TrainingArgs
from mt_core.launch import (
    TorchrunArgs,
    TrainingFailed,
    _cause_lines,
    _end_run,
    run_training,
    torchrun_command,
)

BIN = Path(sys.executable).parent


@pytest.fixture
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def losses(output_dir: Path) -> list[float]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if '"step"' in line]


@pytest.mark.slow(30)
def test_two_processes_equal_the_mt_command(tiny, tmp_path, one_thread):
    if not (BIN / "mt").is_file():
        pytest.skip("the mt command (apps/mt) is not installed next to this Python")
    ours = tmp_path / "ours"
    run_training(TorchrunArgs(nproc_per_node=2), TrainingArgs(**tiny, output_dir=str(ours)))

    cli = tmp_path / "cli"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(
        [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "--no-python", "mt",
         "run", str(ours / "run.toml"), f"--output_dir={cli}"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]

    assert len(losses(ours)) == 2
    # the same two processes doing the same arithmetic: equal bit for bit
    assert losses(ours) == losses(cli)
    log = (ours / "training.log").read_text()
    assert "step 1 " in log and "step 2 " in log, log[-2000:]


@pytest.mark.slow(15)
def test_a_failing_run_raises_with_its_cause(tiny, tmp_path, one_thread):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        Path(tiny["data_path"]).read_text() + '{"input_ids": [1, 2, 3], "labels": [1]}\n'
    )
    args = TrainingArgs(**{**tiny, "data_path": str(bad)}, output_dir=str(tmp_path / "out"))
    with pytest.raises(TrainingFailed) as failed:
        run_training(TorchrunArgs(nproc_per_node=1), args)
    error = failed.value
    assert error.exit_code != 0
    cause = [line for line in error.last_lines if line.startswith("mt: error:") and ":13:" in line]
    assert cause and "bad.jsonl:13: 'labels'" in cause[0], error.last_lines
    assert "ChildFailedError" not in "\n".join(error.last_lines)  # torchrun's report: log only
    assert f"exit code {error.exit_code}" in str(error) and cause[0] in str(error)
    assert cause[0] in (tmp_path / "out" / "training.log").read_text()


INTERRUPTED = """
import signal, sys
import mt_core.launch as launch
from mt_core import TrainingArgs

signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
if {stub!r}:
    launch.torchrun_command = lambda *_: [sys.executable, "-c", {stub!r}, {output_dir!r}]
args = TrainingArgs(**{keys}, output_dir={output_dir!r})
launch.run_training(launch.TorchrunArgs(nproc_per_node=2), args, grace_period_s=20)
"""

# torchrun in miniature, started instead of it: a worker in a session of its own, stopped when
# SIGTERM comes, and a step line
STUB = """
import signal, subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", sys.argv[1]],
                          start_new_session=True)
def stop(*_):
    worker.terminate(); worker.wait(); sys.exit(1)
signal.signal(signal.SIGTERM, stop)
print("step 1  loss 1.0", flush=True)
time.sleep(600)
"""


def run_processes(marker: str) -> list[str]:
    """Command lines of live processes that name ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if marker in command:
                found.append(f"{entry.name}: {command}")
    return found


def interrupt_launch(output_dir: Path, keys: dict, stop: signal.Signals, stub: str = "") -> int:
    """Starts run_training in a child, signals it at the first step line; its exit status."""
    script = INTERRUPTED.format(keys=keys, output_dir=str(output_dir), stub=stub)
    caller = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        log = output_dir / "training.log"
        deadline = time.monotonic() + 240
        while not (log.exists() and "\nstep " in log.read_text()):
            assert caller.poll() is None, caller.stderr.read().decode()[-4000:]
            assert time.monotonic() < deadline, "no step line in training.log"
            time.sleep(0.2)
        assert len(run_processes(str(output_dir))) >= 3  # torchrun (or the stub), 2 workers
        caller.send_signal(stop)
        return caller.wait(timeout=60)
    finally:
        caller.kill()
        caller.wait()


needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")


@needs_proc
@pytest.mark.slow(20)
def test_ctrl_c_leaves_no_process_of_the_run(tiny, tmp_path, one_thread):
    output_dir = tmp_path / f"endless-{os.getpid()}"
    keys = {**tiny, "training_mode": "infinite", "max_steps": 0}
    assert interrupt_launch(output_dir, keys, signal.SIGINT) != 0
    assert run_processes(str(output_dir)) == []
    # the workers stopped as SIGTERM asks: at a step boundary, with a checkpoint
    assert "stopped by signal" in (output_dir / "training.log").read_text()


@needs_proc
def test_sigterm_ends_the_run_then_the_caller(tiny, tmp_path):
    output_dir = tmp_path / f"stub-{os.getpid()}"
    status = interrupt_launch(output_dir, tiny, signal.SIGTERM, stub=STUB)
    assert status == -signal.SIGTERM  # the caller ends as SIGTERM ends it, once the run is gone
    assert run_processes(str(output_dir)) == []


def test_what_ignores_sigterm_is_killed_after_the_grace_period(tmp_path):
    # a stand-in for torchrun that ignores SIGTERM, with a child in a session of its own (as
    # torchrun's workers are) that ignores it too and would otherwise outlive its parent
    marker = f"stubborn-{os.getpid()}"
    child = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
    parent = (
        "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        f"subprocess.Popen([sys.executable, '-c', {child!r}, {marker!r}], "
        "start_new_session=True); time.sleep(600)"
    )
    process = subprocess.Popen([sys.executable, "-c", parent, marker], start_new_session=True)
    while len(run_processes(marker)) < 2:
        time.sleep(0.05)
    started = time.monotonic()
    _end_run(process, grace_period_s=1.0)
    assert time.monotonic() - started < 10
    assert run_processes(marker) == []


def test_cause_lines_leave_out_torchruns_report():
    worker = [f"step {n}" for n in range(30)] + ["mt: error: data.jsonl:4: labels too short"]
    report = [
        "W1125 09:10:47.226000 29994 torch/distributed/elastic/multiprocessing/api.py:1028] "
        "Sending process 30002 closing signal SIGTERM",
        "Traceback (most recent call last):",
        '  File "torchrun", line 10, in <module>',
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ",
        "=" * 60,
        "mt_core FAILED",
    ] + ["  details"] * 20
    lines = _cause_lines(worker + report)
    assert lines[-1] == worker[-1] and len(lines) == 20
    assert _cause_lines(["only", "lines"]) == ["only", "lines"]


def test_torchrun_args_checks():
    with pytest.raises(ConfigError, match="not both"):
        TorchrunArgs(rdzv_endpoint="node0:29400", master_addr="node0")
    with pytest.raises(ConfigError, match="rdzv_endpoint has its port"):
        TorchrunArgs(rdzv_endpoint="node0:29400", master_port=29500)
    with pytest.raises(ConfigError, match="need rdzv_endpoint or master_addr"):
        TorchrunArgs(nnodes=2)
    with pytest.raises(ConfigError, match="node_rank: must be < nnodes"):
        TorchrunArgs(nnodes=2, node_rank=2, master_addr="node0")
    with pytest.raises(ConfigError, match="positive integer or 'gpu'"):
        TorchrunArgs(nproc_per_node=0)
    with pytest.raises(ConfigError, match="host:port"):
        TorchrunArgs(rdzv_endpoint="node0")
    with pytest.raises(ConfigError, match="port number"):
        TorchrunArgs(master_addr="node0", master_port=70000)


def test_gpu_needs_a_gpu(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    args = TrainingArgs(**tiny, output_dir=str(tmp_path / "out"))
    with pytest.raises(ConfigError, match="no GPU"):
        run_training(TorchrunArgs(nproc_per_node="gpu"), args)
    assert not (tmp_path / "out").exists()  # refused before anything is written
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert "--nproc-per-node=4" in torchrun_command(TorchrunArgs(), "run.toml")


def test_torchrun_command_line():
    tail = ["-m", "mt_core", "run", "out/run.toml"]
    one = torchrun_command(TorchrunArgs(nproc_per_node=2), "out/run.toml")
    assert one[1:] == ["--nnodes=1", "--nproc-per-node=2", "--node-rank=0", "--standalone", *tail]
    module_form = [sys.executable, "-m", "torch.distributed.run"]
    assert Path(one[0]).name == "torchrun" or one[:3] == module_form
    rdzv = torchrun_command(
        TorchrunArgs(nnodes=2, nproc_per_node=8, node_rank=1, rdzv_id=7, rdzv_endpoint="n0:29400"),
        "out/run.toml",
    )
    assert rdzv[1:] == ["--nnodes=2", "--nproc-per-node=8", "--node-rank=1", "--rdzv-id=7",
                        "--rdzv-backend=c10d", "--rdzv-endpoint=n0:29400", *tail]  # fmt: skip
    static = torchrun_command(
        TorchrunArgs(nnodes=2, nproc_per_node=8, master_addr="n0", master_port=29501), "r.toml"
    )
    assert static[4:6] == ["--master-addr=n0", "--master-port=29501"]
