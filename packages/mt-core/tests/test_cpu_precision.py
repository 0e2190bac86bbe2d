"""Half-precision weights on a CPU: the run computes in them there where the CPU has fast kernels
for them; on x86 CPUs without oneDNN's kernels (AVX-512 for bfloat16) PyTorch multiplies them in
a scalar loop, 10-100x slower than float32, so the run computes in float32 there instead and
says so in its first lines (``note: ...``), as ``mt check`` says its notes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig

import mt_core.plan.resolve as resolving
from mt_core.config import args_from_dict
from mt_core.plan.memory import GIB
from mt_core.plan.resolve import Machine, Resolved, resolve

CONFIG = LlamaConfig(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=256,
)  # fmt: skip


def _resolved(train_dtype: str, *, gpu: bool = False, slow: tuple[str, ...] = ()) -> Resolved:
    args = args_from_dict(
        {"model_name_or_path": "m", "data_path": "d.jsonl", "output_dir": "out",
         "learning_rate": 1e-5, "batch_size": 8, "max_tokens_per_gpu": 256,
         "train_dtype": train_dtype, "stochastic_rounding": train_dtype == "bfloat16"}
    )  # fmt: skip
    machine = Machine(
        gpu=gpu, world_size=1, liger_installed=False, attention_backends=("sdpa",),
        gpu_bytes=80 * GIB if gpu else None, slow_cpu_dtypes=slow,
    )  # fmt: skip
    return resolve(args, CONFIG, machine, np.full(8, 32), warn=False)


@pytest.mark.parametrize("train_dtype", ["bfloat16", "float16"])
def test_half_precision_computes_in_float32_on_a_cpu_without_its_kernels_and_says_so(train_dtype):
    slow = ("bfloat16", "float16")
    resolved = _resolved(train_dtype, slow=slow)
    (note,) = resolved.notes
    assert note.startswith(f"train_dtype = {train_dtype!r} computes in float32 on this CPU")
    assert (resolved.train_dtype, resolved.compute_dtype) == (train_dtype, "float32")
    # a CPU with the kernels, float32 weights, a GPU (it computes in bfloat16 on its own cores)
    for resolved, compute in [
        (_resolved(train_dtype, slow=()), train_dtype),
        (_resolved(train_dtype, slow=tuple(d for d in slow if d != train_dtype)), train_dtype),
        (_resolved("float32", slow=slow), "float32"),
        (_resolved(train_dtype, gpu=True, slow=slow), "bfloat16"),
    ]:
        assert (resolved.notes, resolved.compute_dtype) == ((), compute)


@pytest.mark.parametrize(
    ("cpu", "bf16", "fp16", "slow"),
    [
        ("x86_64", False, False, ("bfloat16", "float16")),  # AVX2
        ("x86_64", True, False, ("float16",)),  # AVX-512 without FP16
        ("AMD64", True, True, ()),  # AMX (Windows names x86-64 so)
        ("aarch64", False, False, ()),  # not oneDNN's x86 rule: nothing said
    ],
)
def test_the_slow_dtypes_are_those_onednn_has_no_kernel_for(monkeypatch, cpu, bf16, fp16, slow):
    monkeypatch.setattr("platform.machine", lambda: cpu)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: bf16)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", lambda: fp16)
    assert resolving.slow_cpu_dtypes() == slow


def test_the_run_prints_its_notes_after_its_settings(tiny, tmp_path, capsys, monkeypatch):
    """`mt run` (here its function) prints every note of the resolver, not only `mt check`."""
    from mt_core import train

    monkeypatch.setattr(resolving, "slow_cpu_dtypes", lambda: ("bfloat16",))
    keys = {**tiny, "output_dir": str(tmp_path), "max_steps": 1, "train_dtype": "bfloat16",
            "stochastic_rounding": True}  # fmt: skip
    train(args_from_dict(keys))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("settings weights bfloat16, compute float32")
    notes = [line for line in lines if line.startswith("note: ")]
    assert len(notes) == 1 and "train_dtype = 'bfloat16' computes in float32" in notes[0]
    assert lines.index(notes[0]) < next(i for i, x in enumerate(lines) if x.startswith("step 1"))


@pytest.mark.parametrize("slow", [("bfloat16",), ()], ids=["no bfloat16 kernels", "with them"])
def test_bfloat16_weights_compute_in_float32_exactly_where_the_cpu_is_slow(
    tiny, tmp_path, monkeypatch, slow
):
    """On a CPU without bfloat16 kernels, a run of bfloat16 weights computes what a float32 run
    of the same (bfloat16-rounded) weights computes: FSDP2 casts each weight to float32 exactly,
    and every operation after that is the float32 run's, so the first loss is the same to the
    bit. Where the CPU has the kernels the run computes in bfloat16, whose rounding of every
    activation (up to 2^-8 of its size) moves the loss: the comparison tells the two apart."""
    from transformers import AutoModelForCausalLM

    from mt_core import train

    rounded = tmp_path / "rounded"
    model = AutoModelForCausalLM.from_pretrained(tiny["model_name_or_path"])
    model.to(torch.bfloat16).to(torch.float32).save_pretrained(rounded)

    def first_loss(**keys) -> float:  # the loss of step 1, the run's only step
        return train(args_from_dict({**tiny, "max_steps": 1, **keys})).last_loss

    exact = first_loss(model_name_or_path=str(rounded), output_dir=str(tmp_path / "float32"))
    monkeypatch.setattr(resolving, "slow_cpu_dtypes", lambda: slow)
    weights = first_loss(train_dtype="bfloat16", output_dir=str(tmp_path / "bfloat16"))
    assert (weights == exact) == bool(slow), (weights, exact)
