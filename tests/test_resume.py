"""Resume: a run killed mid-step and resumed gives the uninterrupted run's losses bit for bit
(CPU, float32), on one process and on two gloo ranks; checkpoints reshard between rank counts;
SIGTERM stops at a step boundary with a checkpoint; a kill never leaves a half checkpoint."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

# the tests of the reference and killed runs go to one worker (pytest-xdist): they share them
SHARES_RUNS = pytest.mark.xdist_group("resume")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, killer_source, llama_folder, runs):
    root = tmp_path_factory.mktemp("resume")
    runs.write_counting_data(root / "data.jsonl")
    runs.write_run(
        root / "run.toml",
        model_name_or_path=str(llama_folder),
        data_path=str(root / "data.jsonl"),
        output_dir=str(root / "unused"),
        batch_size=6,
        max_tokens_per_gpu=24,
        learning_rate=3e-3,
        eps=1.0,  # = max_grad_norm: updates at most lr / eps sensitive to rounding
        lr_scheduler="cosine",
        num_warmup_steps=2,
        training_mode="step",
        max_steps=8,
        seed=5,
        attn_backend="sdpa",
        save_final_checkpoint=False,
        checkpoint_every_steps=2,
    )
    (root / "killer.py").write_text(killer_source)
    return root


@pytest.fixture(scope="module")
def launch(workspace, runs) -> Callable[..., subprocess.CompletedProcess]:
    """``launch(output, *overrides, nproc=1, killed=False)``: `mt run` of the workspace's run
    file into ``output``; ``killed``: the run SIGKILLs itself inside step 5 (conftest.KILLER)."""

    def start(output: Path, *extra: str, nproc: int = 1, killed: bool = False):
        if killed:
            return runs.launch(str(workspace / "run.toml"), str(output), nproc=nproc, check=False,
                               script=workspace / "killer.py", env={"KILL_AT_STEP": "5"})  # fmt: skip
        arguments = ["run", str(workspace / "run.toml"), f"--output_dir={output}", *extra]
        return runs.launch(*arguments, nproc=nproc, check=False)

    return start


def steps(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(workspace, launch) -> Callable[[int], Path]:
    """``reference(nproc)``: the uninterrupted run on ``nproc`` ranks, made once."""
    made: dict[int, Path] = {}

    def get(nproc: int) -> Path:
        if nproc not in made:
            made[nproc] = workspace / f"reference{nproc}"
            result = launch(made[nproc], nproc=nproc)
            assert result.returncode == 0, result.stderr[-3000:]
        return made[nproc]

    return get


@pytest.fixture(scope="module")
def killed(workspace, launch) -> Callable[[int], Path]:
    """``killed(nproc)``: a run on ``nproc`` ranks killed inside step 5, made once and left as the
    kill left it; tests resume copies of it."""
    made: dict[int, Path] = {}

    def get(nproc: int) -> Path:
        if nproc not in made:
            made[nproc] = workspace / f"killed{nproc}"
            assert launch(made[nproc], nproc=nproc, killed=True).returncode != 0
        return made[nproc]

    return get


@SHARES_RUNS
@pytest.mark.slow(35)
@pytest.mark.parametrize("nproc", [1, 2])
def test_killed_and_resumed_run_equals_the_uninterrupted_one(reference, killed, launch, nproc,
                                                             tmp_path):  # fmt: skip
    resumed = shutil.copytree(killed(nproc), tmp_path / "resumed")
    assert [s["step"] for s in steps(resumed)] == [1, 2, 3, 4]
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["step_2", "step_4"]
    result = launch(resumed, nproc=nproc)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout
    got, want = steps(resumed), steps(reference(nproc))
    assert [s["step"] for s in got] == list(range(1, 9))  # each step exactly once
    for key in ("loss", "grad_norm", "lr", "tokens", "samples_seen"):
        assert [s[key] for s in got] == [s[key] for s in want], key  # bitwise on CPU float32


@SHARES_RUNS
@pytest.mark.slow(20)
def test_checkpoints_reshard_between_rank_counts(reference, killed, launch, equivalence, runs,
                                                 workspace, llama_folder, tmp_path):  # fmt: skip
    params = sum(p.numel() for p in load_file(llama_folder / "model.safetensors").values())
    want = steps(reference(1))
    for written, read in ((2, 1), (1, 2)):
        out = shutil.copytree(killed(written), tmp_path / f"reshard{written}to{read}")
        if read == 1:  # in this process: the checkpoint, not the command line, is the subject
            runs.train_here(out, workspace / "run.toml")
        else:
            result = launch(out, nproc=read)
            assert result.returncode == 0, result.stderr[-3000:]
        got = steps(out)
        assert [s["step"] for s in got] == list(range(1, 9))
        # the same data order: identical token counts per step; losses equal up to the order of
        # float32 sums, which differs between rank counts (6 samples of <= 17 tokens a step)
        assert [s["tokens"] for s in got] == [s["tokens"] for s in want]
        for step, (a, b) in enumerate(zip(want, got, strict=True)):
            rtol = equivalence.trajectory_rtol(6 * 17, (32, 64, 64), steps=step, lr=3e-3,
                                               params=params)  # fmt: skip
            assert b["loss"] == pytest.approx(a["loss"], rel=rtol), a["step"]


@pytest.mark.slow(10)
def test_sigterm_under_torchrun_checkpoints_and_resumes(workspace, runs):
    out = workspace / "sigterm"
    command = [str(runs.BIN / "torchrun"), "--standalone", "--nproc-per-node=2", "--no-python",
               "mt", "run",
               str(workspace / "run.toml"), f"--output_dir={out}", "--max_steps=100000",
               "--checkpoint_every_steps=None", "--lr_scheduler=constant", "--num_warmup_steps=0"]  # fmt: skip
    process = subprocess.Popen(command, env=runs.ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)  # fmt: skip
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300  # start-up on a busy 2-core machine can be slow
    while time.time() < deadline and (not metrics.is_file() or len(steps_safe(metrics)) < 3):
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGTERM)  # as a preempting scheduler does: every process
    stdout, stderr = process.communicate(timeout=120)
    assert "run the same command again to resume" in stdout, stderr[-3000:]
    (checkpoint,) = (out / "checkpoints").iterdir()
    stopped_at = int(checkpoint.name.removeprefix("step_"))
    assert [s["step"] for s in steps(out)] == list(range(1, stopped_at + 1))
    # resumed on one process, in this one (the signal was the subject; resharding is tested above)
    runs.train_here(out, workspace / "run.toml", max_steps=stopped_at + 2,
                    checkpoint_every_steps=None, lr_scheduler="constant", num_warmup_steps=0)  # fmt: skip
    assert [s["step"] for s in steps(out)] == list(range(1, stopped_at + 3))


def steps_safe(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.endswith("}")]


def signal_after_two_steps(
    runs, workspace: Path, out: Path, number: int, *overrides: str
) -> tuple[subprocess.Popen, str, str]:
    """Start an endless `mt run` in one process, send it ``number`` once two steps are logged,
    and wait for it to end; returns the process, its stdout and its stderr."""
    process = subprocess.Popen(
        ["mt", "run", str(workspace / "run.toml"), f"--output_dir={out}", "--max_steps=100000",
         "--lr_scheduler=constant", "--num_warmup_steps=0", *overrides],
        env=runs.ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300  # start-up on a busy 2-core machine can be slow
    while time.time() < deadline and (not metrics.is_file() or len(steps_safe(metrics)) < 2):
        time.sleep(0.2)
    process.send_signal(number)
    stdout, stderr = process.communicate(timeout=120)
    return process, stdout, stderr


@pytest.mark.slow(10)
def test_sigint_in_one_process_exits_0_with_a_checkpoint(workspace, runs):
    out = workspace / "sigint"
    process, stdout, stderr = signal_after_two_steps(runs, workspace, out, signal.SIGINT)
    assert process.returncode == 0, stderr[-3000:]
    assert "resume" in stdout
    assert any(p.name.startswith("step_") for p in (out / "checkpoints").iterdir())


@SHARES_RUNS
def test_a_half_written_checkpoint_is_never_resumed(reference, tmp_path):
    from mt_fsdp import latest_checkpoint

    out = reference(1)
    root = tmp_path / "checkpoints"
    root.mkdir()
    for name in ("step_4", "step_6"):
        (root / name).symlink_to(out / "checkpoints" / name, target_is_directory=True)
    (root / ".step_8.tmp").mkdir()  # a kill while writing step 8: never picked
    (root / "step_9").mkdir()  # a folder without its state file: not a checkpoint
    assert latest_checkpoint(root).name == "step_6"
    # keep_last_checkpoints = 2 (the default) left only the newest two of step 2, 4, 6
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_4", "step_6"]
    state = json.loads((out / "checkpoints" / "step_6" / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["sampler"]["seed"] == 5


def test_a_second_run_on_the_same_output_dir_refuses(workspace, tmp_path, capsys):
    """`mt run` in this process (its status and its stderr, as the command ends them; any other
    exception, a traceback, fails here): a lock taken through another open file, as a running mt
    holds it, refuses this one as it does another process."""
    from mt.cli import main

    out = tmp_path / "busy"
    out.mkdir()
    with open(out / ".mt.lock", "a+") as lock, pytest.raises(SystemExit) as exit_:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running mt holds it
        main(["run", str(workspace / "run.toml"), f"--output_dir={out}"])
    assert exit_.value.code == 2
    assert "is in use by another run" in capsys.readouterr().err
    assert not (out / "metrics.jsonl").exists()


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(workspace, tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    from mt_core import RunError, load_run_file, train
    from mt_fsdp import latest_checkpoint

    original = dcp.save
    calls = []

    def fill_the_disk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return original(*args, **kwargs)

    monkeypatch.setattr(dcp, "save", fill_the_disk)
    out = tmp_path / "full"
    args = load_run_file(workspace / "run.toml", {"output_dir": str(out)})
    with pytest.raises(RunError, match=r"No space left.*previous checkpoint .*step_2 is intact"):
        train(args)
    assert latest_checkpoint(out / "checkpoints").name == "step_2"
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_2"]  # no half step_4
    monkeypatch.setattr(dcp, "save", original)
    resumed = train(load_run_file(workspace / "run.toml", {"output_dir": str(out)}))
    assert resumed.steps == 8


def test_nonfinite_steps_stop_or_are_skipped(workspace, tmp_path, monkeypatch):
    import mt_core.trainer.step as trainer_step
    from mt_core import NonFiniteError, load_run_file, train

    original = trainer_step.clip_gradients
    calls = []

    def nan_at_step_3(model, max_norm):
        calls.append(1)
        norm = original(model, max_norm)
        return torch.full_like(norm, float("nan")) if len(calls) == 3 else norm

    monkeypatch.setattr(trainer_step, "clip_gradients", nan_at_step_3)
    overrides = {"output_dir": str(tmp_path / "stop"), "save_final_checkpoint": True}
    with pytest.raises(
        NonFiniteError, match=r"step 3: .*gradient norm nan.*checkpoint is .*step_2"
    ):
        train(load_run_file(workspace / "run.toml", overrides))
    assert not (tmp_path / "stop" / "hf_format").exists()

    calls.clear()
    overrides = {"output_dir": str(tmp_path / "skip"), "skip_nonfinite_steps": True,
                 "save_final_checkpoint": True, "save_dtype": "float32"}  # fmt: skip
    train(load_run_file(workspace / "run.toml", overrides))
    lines = steps(tmp_path / "skip")
    assert [s["skipped_steps"] for s in lines] == [0, 0, 1, 1, 1, 1, 1, 1]
    (export,) = (tmp_path / "skip" / "hf_format").iterdir()
    assert all(torch.isfinite(t).all() for t in load_file(export / "model.safetensors").values())


@pytest.mark.slow(10)
def test_mini_trainer_on_demand_keys_checkpoint_on_sigusr1_and_resume(workspace, runs, capsys):
    out = workspace / "on_demand"
    process, stdout, stderr = signal_after_two_steps(
        runs, workspace, out, signal.SIGUSR1, "--checkpoint_every_steps=None",
        "--on_demand_checkpointing=true",
    )  # fmt: skip
    assert process.returncode == 0, stderr[-3000:]
    (checkpoint,) = (out / "checkpoints").iterdir()
    stopped_at = int(checkpoint.name.removeprefix("step_"))
    elsewhere = workspace / "on_demand_resumed"
    capsys.readouterr()
    runs.train_here(elsewhere, workspace / "run.toml",
                    resume_from_full_state_checkpoint=str(checkpoint), max_steps=stopped_at + 1,
                    lr_scheduler="constant", num_warmup_steps=0, checkpoint_every_steps=None)  # fmt: skip
    assert f"resumed from {checkpoint}" in capsys.readouterr().out
    assert [s["step"] for s in steps(elsewhere)] == [stopped_at + 1]
