"""cpu_offload (FSDP2's CPU offload policy: sharded weights, gradients and optimizer state in host
memory, the optimizer step on the CPU): it changes where tensors live, not the arithmetic, and a
node without the host memory for it is told so before any weight is loaded."""

from __future__ import annotations

from pathlib import Path

import pytest

from mt_core import ConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tiny"


def example_keys(**setting) -> dict:
    keys = dict(model_name_or_path=str(EXAMPLE / "model"), data_path=str(EXAMPLE / "data.jsonl"),
                batch_size=32, max_tokens_per_gpu=1024, learning_rate=1e-3, lr_scheduler="cosine",
                training_mode="step", max_steps=3, seed=1, save_final_checkpoint=False,
                attn_backend="sdpa")  # fmt: skip
    return {**keys, **setting}


@pytest.mark.parametrize("sync", [True, False], ids=["sync every minibatch", "sync once a step"])
@pytest.mark.parametrize(
    "setting",
    [{}, dict(train_dtype="bfloat16", stochastic_rounding=True, optimizer_state_dtype="bfloat16")],
    ids=["float32 AdamW", "bfloat16 weights, stochastic rounding, bfloat16 moments"],
)
def test_offloaded_run_trains_bit_for_bit_like_the_plain_one(runs, tmp_path, setting, sync):
    """On a CPU run the policy moves nothing, so the arithmetic is the same operations in the
    same order: the losses and gradient norms are equal, not close. (On a GPU the policy's
    copies add no arithmetic either; what differs there is only where the step runs.) Both
    reduce the gradients alike: after every minibatch, or once a step (the fit's choice under
    cpu_offload on a GPU with room for the whole gradient); the two sum the minibatches'
    gradients in other orders, so each is compared with its like."""
    setting = dict(setting, sync_gradients_every_minibatch=sync)
    _, plain = runs.train_here(tmp_path / "plain", **example_keys(**setting))
    _, offloaded = runs.train_here(tmp_path / "offloaded", **example_keys(cpu_offload=True,
                                                                           **setting))  # fmt: skip
    assert len(plain) == 3
    for key in ("loss", "grad_norm"):
        assert [s[key] for s in offloaded] == [s[key] for s in plain], key


def test_too_little_host_memory_is_one_clear_error_before_any_weight(runs, tmp_path, monkeypatch):
    """Under cpu_offload every parameter of the tiny example keeps 16 bytes in host memory
    (float32 weight, gradient and two moments): with less than that available the run stops
    with one message naming the sizes and the fix. build_model would fail the test."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import mt_core.plan.room as room
    import mt_core.trainer.setup as trainer_setup

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(EXAMPLE / "model"))
    needed = 16 * sum(p.numel() for p in model.parameters())  # a tied weight counts once
    monkeypatch.setattr(trainer_setup, "build_model", lambda *args, **kwargs: pytest.fail("loaded"))
    monkeypatch.setattr(room, "available_host_bytes", lambda: needed - 1.0)
    with pytest.raises(ConfigError) as error:
        runs.train_here(tmp_path / "out", **example_keys(cpu_offload=True))
    (message,) = error.value.problems
    assert f"cpu_offload = true keeps {needed / 2**20:.1f} MiB per process" in message
    assert f"but only {(needed - 1) / 2**20:.1f} MiB is available" in message
    assert "optimizer_state_dtype = 'bfloat16'" in message
    # exactly enough is enough: the run goes on to build the model
    monkeypatch.setattr(room, "available_host_bytes", lambda: float(needed))
    with pytest.raises(pytest.fail.Exception, match="loaded"):
        runs.train_here(tmp_path / "enough", **example_keys(cpu_offload=True))


def test_the_step_time_counts_the_optimizer_step_but_not_validation(runs, tmp_path, monkeypatch):
    """Under cpu_offload the optimizer step runs on the host, after the step's one sync: its
    time belongs to the step (it once did not: the clock restarted after it). The trainer's
    clock is made to jump 100 s in the optimizer step and 1000 s in validation: step 2's time
    (from step 1's sync to its own) holds the first jump and none of the second; the real
    seconds of a tiny step are far from either."""
    import time
    from types import SimpleNamespace

    import mt_core.trainer.after_step as trainer_after_step
    import mt_core.trainer.setup as trainer_setup
    import mt_core.trainer.step as trainer_step

    jumped = [0.0]
    monkeypatch.setattr(trainer_step, "time", SimpleNamespace(perf_counter=lambda: time.perf_counter()
                                                         + jumped[0]))  # fmt: skip

    def jump(seconds: float) -> None:
        jumped[0] += seconds

    build = trainer_setup.build_optimizer

    def slow_optimizer(*args, **kwargs):
        optimizer = build(*args, **kwargs)
        optimizer.register_step_pre_hook(lambda *hook_args: jump(100.0))
        return optimizer

    monkeypatch.setattr(trainer_setup, "build_optimizer", slow_optimizer)
    monkeypatch.setattr(trainer_after_step, "validation_due", lambda *args: True)
    monkeypatch.setattr(trainer_after_step, "validation_loss", lambda *args: (jump(1000.0), 1.0)[1])
    _, lines = runs.train_here(tmp_path / "out", **example_keys(max_steps=2, cpu_offload=True))
    assert [line["val_loss"] for line in lines] == [1.0, 1.0]
    assert lines[0]["step_time_s"] < 100  # before any optimizer step
    assert 100 <= lines[1]["step_time_s"] < 1000
