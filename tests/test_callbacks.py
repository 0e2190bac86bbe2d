"""Callbacks named by import path run in every torchrun process, in hook order; one that raises
is reported and training finishes anyway."""

from __future__ import annotations

import json

import pytest

CALLBACKS = """
import os
from mt_core import TrainerCallback

class Recorder(TrainerCallback):
    def _record(self, hook, **info):
        path = os.path.join(os.environ["HOOK_DIR"], f"rank{info['rank']}.txt")
        with open(path, "a") as out:
            out.write(f"{hook} {info['step']} {info['time']!r}\\n")

for _hook in ("on_train_begin", "on_train_end", "on_epoch_begin", "on_epoch_end",
              "on_step_begin", "on_step_end", "on_before_forward", "on_after_backward",
              "on_before_optimizer_step", "on_after_optimizer_step", "on_log", "on_save"):
    setattr(Recorder, _hook, (lambda name: lambda self, **info: self._record(name, **info))(_hook))

class Broken(TrainerCallback):
    def on_step_end(self, **info):
        raise RuntimeError("this callback is broken")
"""


@pytest.mark.slow(15)
def test_hooks_run_in_order_on_every_rank_and_a_broken_callback_does_not_stop_training(
    tmp_path, llama_folder, runs
):
    rows = [{"input_ids": list(range(i, i + 6)), "labels": list(range(i, i + 6))} for i in range(8)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "my_callbacks.py").write_text(CALLBACKS)
    run = runs.write_run(
        tmp_path / "run.toml",
        model_name_or_path=str(llama_folder),
        data_path=str(tmp_path / "data.jsonl"),
        output_dir=str(tmp_path / "out"),
        batch_size=4,
        max_tokens_per_gpu=64,
        learning_rate=1e-3,
        lr_scheduler="constant",
        training_mode="step",
        max_steps=2,
        attn_backend="sdpa",
        save_final_checkpoint=True,
        callbacks=["my_callbacks:Recorder", "my_callbacks:Broken"],
    )
    (tmp_path / "hooks").mkdir()
    env = {"PYTHONPATH": str(tmp_path), "HOOK_DIR": str(tmp_path / "hooks")}
    result = runs.launch("run", str(run), nproc=2, env=env)
    assert "callback Broken failed in on_step_end" in result.stderr
    # reported once per process (errors are the one thing every rank prints), not once per step
    assert result.stderr.count("this callback is broken") == 2
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # training finished both steps
    step = ["on_step_begin", "on_before_forward", "on_after_backward", "on_before_optimizer_step",
            "on_after_optimizer_step", "on_log", "on_step_end"]  # fmt: skip
    expected = ["on_train_begin", "on_epoch_begin", *step, *step, "on_save", "on_epoch_end",
                "on_train_end"]  # fmt: skip
    for rank in (0, 1):
        hooks = (tmp_path / "hooks" / f"rank{rank}.txt").read_text().split("\n")
        names = [line.split()[0] for line in hooks if line]
        # on_save comes before on_step_end of the last step (the export is part of the step)
        assert sorted(names) == sorted(expected), rank
        assert names[:9] == expected[:9]
        assert names[-2:] == ["on_epoch_end", "on_train_end"]
        # each hook carries the moment it fired, in order
        stamps = [float(line.split()[2]) for line in hooks if line]
        assert stamps == sorted(stamps) and stamps[0] < stamps[-1]
