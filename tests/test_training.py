"""End to end through `mt run`: one step equals AdamW by hand on the unpadded batch, and two gloo
ranks with several minibatches and an empty slot equal one process with the whole batch."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from mt_data import InfiniteSampler
from mt_packing import pack_minibatches

VOCAB = 64  # conftest.TINY_LLAMA's


def make_data(path: Path, lengths: list[int]) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for length in lengths:
        tokens = rng.integers(0, VOCAB, length).tolist()
        masked = int(rng.integers(0, length // 2))
        rows.append({"input_ids": tokens, "labels": [-100] * masked + tokens[masked:]})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows


@pytest.fixture
def setup(tmp_path, llama_folder):
    common = dict(
        model_name_or_path=str(llama_folder),
        learning_rate=1e-2,
        num_warmup_steps=0,
        lr_scheduler="constant",
        training_mode="step",
        max_steps=1,
        seed=7,
        save_final_checkpoint=True,
        save_dtype="float32",
        train_dtype="float32",
        attn_backend="sdpa",
    )
    return tmp_path, common


@pytest.mark.slow(15)
def test_two_ranks_with_an_empty_slot_equal_one_process(setup, runs):
    tmp_path, common = setup
    make_data(tmp_path / "data.jsonl", [30] * 10)
    # 5 samples of 30 tokens at 32 tokens per minibatch: 5 minibatches in one process; on two
    # ranks 3 minibatches each, one slot of the six empty.
    plan = pack_minibatches(np.full(5, 30), 32, 2)
    assert [len(rank) for rank in plan] == [3, 3]
    assert sum(part.size == 0 for rank in plan for part in rank) == 1
    keys = dict(common, data_path=str(tmp_path / "data.jsonl"), batch_size=5, max_tokens_per_gpu=32,
                eps=1.0, max_grad_norm=1.0)  # fmt: skip
    run = runs.write_run(tmp_path / "run.toml", **keys)
    _, one = runs.train_here(tmp_path / "one", **keys)
    # the deferred gradient sync here (every other 2-rank test syncs after each minibatch)
    runs.launch("run", str(run), f"--output_dir={tmp_path / 'two'}",
                "--sync_gradients_every_minibatch=false", nproc=2)  # fmt: skip
    two = runs.metrics(tmp_path / "two")
    assert one[0]["num_minibatches"] == 5 and two[0]["num_minibatches"] == 3
    runs.same_first_step(tmp_path / "one", tmp_path / "two", tokens=5 * 30)


@pytest.mark.slow(15)
def test_experts_stored_one_by_one_load_into_uneven_shards(setup, runs):
    """A Mixtral checkpoint stores each expert's matrices apart; the model fuses them. Three
    experts on two ranks: rank 0 reads the pieces of experts 0-1, rank 1 those of expert 2, and
    the step equals one process reading them all."""
    from transformers import MixtralConfig

    tmp_path, common = setup
    torch.manual_seed(0)
    config = MixtralConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, num_local_experts=3, num_experts_per_tok=2,
        router_aux_loss_coef=0.0,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "moe")
    stored = load_file(tmp_path / "moe" / "model.safetensors")
    assert "model.layers.0.block_sparse_moe.experts.2.w3.weight" in stored  # one by one
    make_data(tmp_path / "data.jsonl", [7, 19, 3, 25, 12, 9, 30, 16])
    keys = dict(common, model_name_or_path=str(tmp_path / "moe"),
                data_path=str(tmp_path / "data.jsonl"), batch_size=8, max_tokens_per_gpu=64,
                eps=1.0, max_grad_norm=1.0)  # fmt: skip
    run = runs.write_run(tmp_path / "run.toml", **keys)
    runs.train_here(tmp_path / "one", **keys)
    runs.launch("run", str(run), f"--output_dir={tmp_path / 'two'}", nproc=2)
    runs.same_first_step(tmp_path / "one", tmp_path / "two", tokens=121)
    assert runs.exported_weights(tmp_path / "two").keys() == stored.keys()  # stored one by one


# ``python SCRIPT RUN.toml OUT_1 OUT_2 ...`` under torchrun: train() once per output folder in
# the same processes, as a script of several runs (a sweep, stages of a curriculum) calls it
SEVERAL_RUNS = """
import sys
from mt_core import load_run_file, train
for output_dir in sys.argv[2:]:
    train(load_run_file(sys.argv[1], {"output_dir": output_dir}))
"""


@pytest.mark.slow(10)
def test_train_runs_again_in_the_same_torchrun_job(setup, runs):
    """Each train() makes and ends its own process group; under torchrun a second one meets
    its peers under keys of its own in the agent store (it used to read the first group's and
    wait for those ranks until collective_timeout). The same run twice gives the same steps, bit
    for bit."""
    tmp_path, common = setup
    make_data(tmp_path / "data.jsonl", [7, 19, 3, 25, 12, 9, 30, 16])
    keys = dict(common, data_path=str(tmp_path / "data.jsonl"), batch_size=4,
                max_tokens_per_gpu=32, max_steps=2, collective_timeout=30)  # fmt: skip
    run = runs.write_run(tmp_path / "run.toml", **keys)
    (tmp_path / "several.py").write_text(SEVERAL_RUNS)
    outputs = [tmp_path / "first", tmp_path / "second"]
    runs.launch(str(run), *map(str, outputs), script=tmp_path / "several.py", nproc=2)
    first, second = (runs.metrics(output) for output in outputs)
    assert len(first) == 2
    for a, b in zip(first, second, strict=True):
        assert (b["loss"], b["grad_norm"]) == (a["loss"], a["grad_norm"])
    for name, weight in runs.exported_weights(outputs[0]).items():
        assert torch.equal(runs.exported_weights(outputs[1])[name], weight), name


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled blocks"])
def test_one_step_equals_adamw_by_hand(setup, compiled, equivalence, runs, llama_folder):
    tmp_path, common = setup
    lengths = [7, 19, 3, 25, 12, 9, 30, 16]
    rows = make_data(tmp_path / "data.jsonl", lengths)
    beta1, beta2, weight_decay, lr, max_norm = 0.8, 0.95, 0.1, 1e-2, 0.5

    # The reference, in float64: the plain HF model, each sample of the first global batch alone.
    batch = next(InfiniteSampler(len(rows), 6, seed=7))
    model = AutoModelForCausalLM.from_pretrained(llama_folder, dtype=torch.float64)
    total = sum(sum(label != -100 for label in rows[i]["labels"][1:]) for i in batch)
    loss = 0.0
    for i in batch:
        ids = torch.tensor([rows[i]["input_ids"]])
        labels = torch.tensor([rows[i]["labels"]])
        logits = model(ids).logits[0, :-1]
        loss = loss + torch.nn.functional.cross_entropy(
            logits, labels[0, 1:], ignore_index=-100, reduction="sum"
        )
    loss = loss / total
    loss.backward()
    norm = torch.sqrt(sum((p.grad**2).sum() for p in model.parameters())).item()
    assert norm > max_norm  # clipping is exercised
    clipped = {name: p.grad * max_norm / (norm + 1e-6) for name, p in model.named_parameters()}
    largest = max(g.abs().max().item() for g in clipped.values())
    # eps = the largest clipped gradient: |g| / (|g| + eps) spans 0..1/2, and the update's
    # sensitivity to a gradient error, lr / eps at most, stays small (see first_step_atol).
    eps = largest

    keys = dict(common, data_path=str(tmp_path / "data.jsonl"), batch_size=6,
                max_tokens_per_gpu=40, beta1=beta1, beta2=beta2, eps=eps,
                weight_decay=weight_decay, learning_rate=lr, max_grad_norm=max_norm)  # fmt: skip
    _, lines = runs.train_here(tmp_path / "out", **keys, torch_compile=compiled)
    logged = lines[0]

    # mt computes in float32: γ_n of the size, n summing the reductions behind a loss or gradient
    # (the batch's tokens, hidden and intermediate sizes, vocabulary); compiled blocks fuse and
    # reorder the same sums, so the same bound holds for them.
    rtol = equivalence.float32_rtol(sum(lengths), 32, 64, VOCAB)
    assert logged["loss"] == pytest.approx(loss.item(), rel=rtol)
    assert logged["grad_norm"] == pytest.approx(norm, rel=rtol)
    weights = dict(model.named_parameters())
    expected = equivalence.adamw_first_step(weights, clipped, lr=lr, eps=eps,
                                            weight_decay=weight_decay)  # fmt: skip
    got = runs.exported_weights(tmp_path / "out")
    for name, want in expected.items():
        atol = equivalence.first_step_atol(weights[name], lr=lr, eps=eps,
                                           grad_error=rtol * largest)  # fmt: skip
        error = (got[name].double() - want).abs()
        assert (error <= atol).all(), (name, (error / atol).max().item())
    # the bound is far below what a wrong step would show (lr wd |w|, lr / 2 at |g| = eps)
    assert max(first.max().item() for first in [
        equivalence.first_step_atol(w, lr=lr, eps=eps, grad_error=rtol * largest)
        for w in weights.values()
    ]) < lr * weight_decay * 1e-2  # fmt: skip
    assert math.isfinite(logged["tokens_per_s"]) and logged["mfu"] is None  # no MFU on CPU


@pytest.mark.slow(25)
def test_a_lower_activation_budget_keeps_less_and_trains_the_same(setup, monkeypatch,
                                                                  equivalence, runs):  # fmt: skip
    """activation_memory_budget: compiled blocks keep fewer bytes for the backward pass (every
    tensor saved by the forward is counted) and the steps are the same."""
    import mt_core.trainer.step as trainer_step

    tmp_path, common = setup
    make_data(tmp_path / "data.jsonl", [7, 19, 3, 25, 12, 9, 30, 16])
    keys = dict(common, data_path=str(tmp_path / "data.jsonl"), batch_size=4,
                max_tokens_per_gpu=40, max_steps=2, torch_compile=True, eps=1.0)  # fmt: skip
    saved: list[int] = []
    forward = trainer_step.minibatch_loss

    def counted(*args, **kwargs):
        total = 0

        def pack(tensor):
            nonlocal total
            total += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = forward(*args, **kwargs)
        saved.append(total)
        return loss

    monkeypatch.setattr(trainer_step, "minibatch_loss", counted)
    by_budget = {}
    for budget in (1.0, 0.0):
        torch._dynamo.reset()  # compile afresh: the budget is read when a block first runs
        saved.clear()
        _, lines = runs.train_here(tmp_path / f"budget{budget}", **keys,
                                   activation_memory_budget=budget)  # fmt: skip
        by_budget[budget] = (list(saved), lines)
    (kept, full_lines), (fewer, low_lines) = by_budget[1.0], by_budget[0.0]
    assert len(kept) == len(fewer) >= 4  # two steps of at least two minibatches
    for a, b in zip(kept, fewer, strict=True):
        assert b < 0.85 * a, (kept, fewer)  # measured: 0.74 to 0.76
    # Recomputed activations may be fused into other kernels: the same sums in another order,
    # 2γ_n. With eps = max_grad_norm = 1 the first step's weights then differ by about lr 2γ_n
    # (conftest.first_step_atol), which moves the second step's numbers by far less than that.
    rtol = 2 * equivalence.float32_rtol(sum([7, 19, 3, 25, 12, 9, 30, 16]), 32, 64, VOCAB)
    for a, b in zip(full_lines, low_lines, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=rtol)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=rtol)
    import torch._functorch.config as functorch_config

    assert functorch_config.activation_memory_budget == 1.0  # put back after the run


def test_blocks_kept_gathered_train_and_validate_the_same(setup, monkeypatch, runs):
    """On one GPU with room to spare the blocks stay gathered from forward to backward (chosen
    by the fit; forced here on CPU): the same losses, gradient norms, validation losses and
    weights as resharding after every forward, with validation's forward-only passes between
    the optimizer steps."""
    import mt_core.plan.fit as fit
    from mt_core.plan.fit import Fit

    tmp_path, common = setup
    make_data(tmp_path / "data.jsonl", [7, 19, 3, 25, 12, 9, 30, 16, 11, 22, 5, 14])
    keys = dict(common, data_path=str(tmp_path / "data.jsonl"), batch_size=4,
                max_tokens_per_gpu=32, max_steps=3, validation_split=0.25,
                validation_frequency=1)  # fmt: skip
    _, resharded = runs.train_here(tmp_path / "resharded", **keys)
    fits = []  # the trainer's fit, as a GPU with room to spare would choose it
    monkeypatch.setattr(
        fit, "fit_to_gpu", lambda *args, **kwargs: fits.append(1) or Fit(keep_gathered=True)
    )
    _, gathered = runs.train_here(tmp_path / "gathered", **keys)
    assert fits == [1]
    assert len(gathered) == len(resharded) == 3
    # one rank: the gathered weights are the same numbers, run through the same kernels in the
    # same order either way, so everything is equal bit for bit
    for a, b in zip(resharded, gathered, strict=True):
        assert (b["loss"], b["grad_norm"], b["val_loss"]) == (
            a["loss"], a["grad_norm"], a["val_loss"]
        )  # fmt: skip
    a = runs.exported_weights(tmp_path / "resharded")
    b = runs.exported_weights(tmp_path / "gathered")
    for name in a:
        assert torch.equal(b[name], a[name]), name


@pytest.mark.slow(60)
def test_the_bundled_example_learns(tmp_path, runs):
    """The README's example: `mt run examples/tiny/run.toml` learns to count on CPU, and its
    console is quiet and informative: no warning, and each step line shows the speed and the
    peak memory (no MFU on CPU: there is no peak FLOP/s to compare with)."""
    root = Path(__file__).resolve().parent.parent
    # what a user's shell gives: no warning filters or verbosity of the test environment
    env = {key: value for key, value in runs.ENV.items()
           if key not in ("PYTHONWARNINGS", "TRANSFORMERS_VERBOSITY")}  # fmt: skip
    command = [sys.executable, "-m", "mt", "run", "examples/tiny/run.toml",
               f"--output_dir={tmp_path}"]  # fmt: skip
    # Two threads, whose waits for each other sleep: beside the other test worker's busy core,
    # threads that spin in their waits (OpenMP's default) take turns on one core and burn it
    # (80-85 s and 94 CPU-seconds here instead of 44 s and 37)
    threads = {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"}
    result = subprocess.run(command, cwd=root, env={**env, **threads},
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    console = (result.stdout + result.stderr).splitlines()
    assert [line for line in console if "Warning" in line or "warn(" in line] == []
    step_lines = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert len(step_lines) == 126
    for line in step_lines:
        assert "tok/s" in line and "peak mem " in line and line.endswith(" GiB")
        assert "MFU" not in line
    losses = [line["loss"] for line in runs.metrics(tmp_path)]
    assert len(losses) == 126  # 2 epochs of 2,000 samples at 32 per step
    # From ln(256) = 5.5 at random init to a quarter of a nat: the stated margin is the mean of
    # the last 10 steps below 15% of step 1's loss.
    assert losses[0] > 5.0
    assert np.mean(losses[-10:]) < 0.15 * losses[0]
    (export,) = (tmp_path / "hf_format").iterdir()
    assert export.name == "samples_4000"
    model = AutoModelForCausalLM.from_pretrained(export)
    counting = torch.tensor([[9, 40, 77, 2, 100, 101, 102, 103, 104]])
    with torch.no_grad():
        predicted = model(counting).logits[0, 4:].argmax(-1)  # after 100, 101, ... 104
    assert predicted.tolist() == [101, 102, 103, 104, 105]  # it learnt the successor rule


@pytest.mark.parametrize(
    ("mode", "limits", "steps", "exports"),
    [
        # 10 samples at 4 per step: epochs of 3 steps (the last one short), two of them
        ("epoch", {"max_epochs": 2, "checkpoint_at_epoch": True}, 6, ["samples_10", "samples_20"]),
        # exports once at least 8 samples have passed since the last one, and at the end
        ("step", {"max_steps": 5, "min_samples_per_checkpoint": 8}, 5,
         ["samples_8", "samples_16", "samples_20"]),
        # 16 tokens per sample, 64 per step: stops at the first step that reaches 200 tokens
        ("token", {"max_tokens": 200}, 4, ["samples_16"]),
    ],
)  # fmt: skip
def test_training_modes_stop_and_export_on_schedule(setup, mode, limits, steps, exports, runs):
    tmp_path, common = setup
    make_data(tmp_path / "data.jsonl", [16] * 10)
    keys = {**common, "training_mode": mode, "max_steps": None, **limits}
    keys.update(data_path=str(tmp_path / "data.jsonl"), batch_size=4, max_tokens_per_gpu=64)
    result, lines = runs.train_here(tmp_path / mode, **keys)
    assert [line["step"] for line in lines] == list(range(1, steps + 1))
    assert result.steps == steps
    if mode == "epoch":
        assert [line["samples_seen"] for line in lines] == [4, 8, 10, 14, 18, 20]
        assert lines[-1]["epoch"] == 2.0
    if mode == "token":
        assert lines[-2]["tokens_seen"] < 200 <= lines[-1]["tokens_seen"]
    assert sorted(p.name for p in (tmp_path / mode / "hf_format").iterdir()) == sorted(exports)


def test_a_missing_model_is_one_clear_error(setup, monkeypatch, runs):
    from mt_core import ConfigError

    tmp_path, common = setup
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # tests never reach the network
    make_data(tmp_path / "data.jsonl", [16] * 4)
    keys = {**common, "data_path": str(tmp_path / "data.jsonl"), "batch_size": 2}
    keys["max_tokens_per_gpu"] = 64
    for name, message in [
        (str(tmp_path / "nowhere"), "is not a folder"),
        (str(tmp_path), "has no config.json"),
        ("some-org/no-such-model", "is no local folder and could not be downloaded"),
    ]:
        with pytest.raises(ConfigError, match=message):
            runs.train_here(tmp_path / "missing", **{**keys, "model_name_or_path": name})


def test_wandb_offline_logs_every_step(setup, monkeypatch, runs):
    pytest.importorskip("wandb")
    tmp_path, common = setup
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    make_data(tmp_path / "data.jsonl", [16] * 8)
    keys = {**common, "data_path": str(tmp_path / "data.jsonl"), "batch_size": 4,
            "max_tokens_per_gpu": 64, "max_steps": 3, "wandb_project": "mt-test",
            "wandb_run_name": "offline-check"}  # fmt: skip
    _, lines = runs.train_here(tmp_path / "wandb", **keys)
    assert len(lines) == 3
    (run_dir,) = (tmp_path / "wandb" / "wandb").glob("offline-run-*")
    history = list(run_dir.glob("*.wandb"))
    assert history and history[0].stat().st_size > 0


def test_mlflow_file_store_logs_every_step(setup, tmp_path, runs):
    mlflow = pytest.importorskip("mlflow")
    _, common = setup
    make_data(tmp_path / "data.jsonl", [16] * 8)
    store = tmp_path / "mlruns"
    keys = {**common, "data_path": str(tmp_path / "data.jsonl"), "batch_size": 4,
            "max_tokens_per_gpu": 64, "max_steps": 3, "mlflow_tracking_uri": f"file://{store}",
            "mlflow_experiment_name": "mt-test", "mlflow_run_name": "offline-check"}  # fmt: skip
    _, lines = runs.train_here(tmp_path / "mlflow", **keys)
    client = mlflow.tracking.MlflowClient(tracking_uri=f"file://{store}")
    (run,) = client.search_runs([client.get_experiment_by_name("mt-test").experiment_id])
    assert run.info.run_name == "offline-check"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3]
    assert [m.value for m in history] == [line["loss"] for line in lines]  # float64 both: equal
