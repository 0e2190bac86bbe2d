"""Offloading through the trainer (`mt_core.train` in this process, FSDP2 on one CPU rank): the
bundled tiny example with activation_offload = true trains exactly as without it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "examples" / "tiny"
STEPS = 3


@pytest.mark.parametrize(
    ("checkpointing", "compiled"),
    [(False, False), (True, False), pytest.param(False, True, marks=pytest.mark.slow(20))],
    ids=["kept", "checkpointing", "compiled blocks"],
)
def test_activation_offload_trains_the_tiny_example_bit_for_bit(
    tmp_path, monkeypatch, runs, checkpointing, compiled
):
    import mt_core.trainer.setup as trainer_setup
    from mt_core.model.activation_offload import ActivationOffload

    keys = dict(
        model_name_or_path=str(TINY / "model"), data_path=str(TINY / "data.jsonl"),
        training_mode="step", max_epochs=None, max_steps=STEPS, save_final_checkpoint=False,
        activation_checkpointing=checkpointing, torch_compile=compiled,
    )  # fmt: skip
    run_file = TINY / "run.toml"
    if compiled:
        torch._dynamo.reset()  # both runs compile afresh, the same way
    _, plain = runs.train_here(tmp_path / "plain", run_file, **keys)
    # The example's tensors are at most 1024 tokens x 256 x 4 bytes = 1 MiB, about the default
    # threshold: offload every one, and keep the offloader to read what it moved.
    made = []

    def every_tensor(device: torch.device) -> ActivationOffload:
        made.append(ActivationOffload(device, min_bytes=0))
        return made[-1]

    monkeypatch.setattr(trainer_setup, "ActivationOffload", every_tensor)
    _, offloaded = runs.train_here(tmp_path / "offloaded", run_file, **keys,
                                   activation_offload=True)  # fmt: skip
    assert len(plain) == len(offloaded) == STEPS
    # one rank: the same numbers through the same kernels in the same order, and each saved
    # tensor comes back with its bytes, so every step is equal bit for bit
    for a, b in zip(plain, offloaded, strict=True):
        assert (b["loss"], b["grad_norm"]) == (a["loss"], a["grad_norm"])
        assert "offloaded_gib" not in a
    (offload,) = made
    # the last minibatch's pass: three of the four blocks sent something, the same each
    sent = offload.block_bytes
    assert sent[-1] == 0 and sent[0] > 0 and len(set(sent[:-1])) == 1
    assert offloaded[-1]["offloaded_gib"] == offload.pass_bytes / 2**30
    if checkpointing:  # each block's input only: the minibatch's tokens x 128 x 4 bytes
        assert sent[0] % (128 * 4) == 0 and sent[0] // (128 * 4) <= 1024
    # the run file written for the run keeps the key as it was given
    assert "activation_offload = true" in (tmp_path / "offloaded" / "run.toml").read_text()
