"""Validation: a seeded held-out share, its loss through the training loss's padding-free path
with global-token normalisation, equal on 1 and 2 ranks, best-loss exports."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from mt_data import SampleDataset, open_token_store, split_validation

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def run_file(tmp_path_factory, llama_folder, runs):
    root = tmp_path_factory.mktemp("validation")
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(50):
        tokens = rng.integers(0, 64, int(rng.integers(4, 20))).tolist()
        rows.append({"input_ids": tokens, "labels": [-100] + tokens[1:]})
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return runs.write_run(
        root / "run.toml",
        model_name_or_path=str(llama_folder),
        data_path=str(root / "data.jsonl"),
        output_dir=str(root / "unused"),
        batch_size=8,
        max_tokens_per_gpu=40,
        learning_rate=5e-3,
        eps=1.0,  # = max_grad_norm: updates at most lr / eps sensitive to rounding
        lr_scheduler="constant",
        training_mode="step",
        max_steps=6,
        attn_backend="sdpa",
        save_final_checkpoint=False,
        validation_split=0.2,
        validation_frequency=2,
    )


def test_split_is_seeded_disjoint_and_complete(tmp_path):
    path = tmp_path / "d.jsonl"
    row = {"input_ids": [1, 2, 3], "labels": [1, 2, 3]}
    path.write_text("".join(json.dumps(row) + "\n" for _ in range(30)))
    source = SampleDataset(open_token_store(path, cache_dir=tmp_path / "c"))
    train, held_out = split_validation(source, 0.2, seed=3)
    again, same = split_validation(source, 0.2, seed=3)
    _, other = split_validation(source, 0.2, seed=4)
    assert len(held_out) == 6 and len(train) == 24
    assert held_out.indices.tolist() == same.indices.tolist() != other.indices.tolist()
    assert sorted(train.indices.tolist() + held_out.indices.tolist()) == list(range(30))


@pytest.mark.slow(20)
def test_validation_loss_is_the_same_on_one_and_two_ranks(run_file, tmp_path, equivalence, runs,
                                                          llama_folder):  # fmt: skip
    _, one = runs.train_here(tmp_path / "one", run_file)
    runs.launch("run", str(run_file), f"--output_dir={tmp_path / 'two'}", nproc=2)
    two = runs.metrics(tmp_path / "two")
    val_one = [(s["step"], s["val_loss"]) for s in one if "val_loss" in s]
    val_two = [(s["step"], s["val_loss"]) for s in two if "val_loss" in s]
    assert [step for step, _ in val_one] == [2, 4, 6]
    assert [step for step, _ in val_two] == [2, 4, 6]
    model = AutoModelForCausalLM.from_pretrained(llama_folder)
    params = sum(p.numel() for p in model.parameters())
    for (step, a), (_, b) in zip(val_one, val_two, strict=True):
        # float32 sums in another order, after `step` updates (held-out: <= 10 x 19 tokens)
        rtol = equivalence.trajectory_rtol(190, (32, 64, 64), steps=step, lr=5e-3, params=params)
        assert b == pytest.approx(a, rel=rtol)
    assert val_one[0][1] != val_one[-1][1]  # it follows the model as it trains


def test_validation_loss_equals_the_plain_model_on_the_held_out_samples(
    run_file, tmp_path, equivalence, runs, llama_folder
):
    """Before any update the validation loss is the HF model's mean token loss on the held-out
    samples, each run alone (one global normalisation over all of them)."""
    _, lines = runs.train_here(tmp_path / "first", run_file, max_steps=1, validation_frequency=1,
                               learning_rate=1e-12)  # fmt: skip
    root = run_file.parent
    source = SampleDataset(open_token_store(root / "data.jsonl", cache_dir=tmp_path / "cache"))
    _, held_out = split_validation(source, 0.2, seed=42)
    model = AutoModelForCausalLM.from_pretrained(llama_folder, dtype=torch.float32)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(held_out)):
            ids, targets, _ = held_out.item(i)
            logits = model(torch.from_numpy(ids.astype(np.int64))[None]).logits[0]
            target = torch.from_numpy(targets)
            total += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
            count += int((target != -100).sum())
    # two float32 computations of the same sums (lr 1e-12 moves no weight by a rounding step)
    rtol = 2 * equivalence.float32_rtol(count, 32, 64, 64)
    assert lines[0]["val_loss"] == pytest.approx(total / count, rel=rtol)


def test_best_validation_loss_is_exported(run_file, tmp_path, runs):
    _, lines = runs.train_here(tmp_path / "best", run_file, save_best_val_loss=True,
                               val_loss_improvement_threshold=0.0)  # fmt: skip
    best, expected = None, []
    for line in lines:
        if "val_loss" in line and (best is None or line["val_loss"] < best):
            best = line["val_loss"]
            expected.append(f"samples_{line['samples_seen']}")
    exported = sorted(p.name for p in (tmp_path / "best" / "hf_format").iterdir())
    assert exported == sorted(expected) and expected


def test_a_separate_validation_file_with_epoch_and_final_triggers(run_file, tmp_path, runs):
    root = run_file.parent
    held_out = tmp_path / "val.jsonl"
    held_out.write_text("".join((root / "data.jsonl").read_text().splitlines(True)[:6]))
    _, lines = runs.train_here(tmp_path / "file", run_file, validation_split=0.0,
                               validation_data_path=str(held_out), validation_frequency=None,
                               validate_at_final=True, min_samples_per_validation=16)  # fmt: skip
    # every 16 samples (8 per step: steps 2, 4, 6) and at the end (step 6): once per step
    assert [s["step"] for s in lines if "val_loss" in s] == [2, 4, 6]
