"""A GPU out of memory ends the run with one message (mt_core.trainer.out_of_memory): the step,
the allocator's figures, the plan, fragmentation told apart from a plan that was too large, the
keys that make the run need less, and the newest checkpoint."""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from transformers import LlamaConfig

from mt_core import RunError, args_from_dict, train
from mt_core.plan.memory import GIB, estimate, usable_bytes
from mt_core.plan.resolve import Machine, resolve
from mt_core.plan.shape import model_shape
from mt_core.trainer.out_of_memory import GpuMemory, out_of_memory_message

TORCH_SAYS = (
    "CUDA out of memory. Tried to allocate 752.00 MiB. GPU 0 has a total capacity of 79.18 GiB "
    "of which 358.56 MiB is free."
)
H100 = 81559 * 2**20  # what torch.cuda reports as the H100's total memory
LLAMA_3B = LlamaConfig(
    hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
    num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=True,
)  # fmt: skip


def test_a_run_that_runs_out_of_memory_says_why_and_what_to_change(tiny, tmp_path, monkeypatch):
    """Step 2 of a run raises torch's out-of-memory error, the allocator holding 8.3 GiB free of
    77.0 reserved (the 3B run of tools/bench/RESULTS.md): one RunError names the step, its
    largest minibatch, torch's request, the figures, fragmentation with its fix, the keys, and
    the checkpoint of step 1."""
    import mt_core.trainer.loop as loop

    real_step, steps = loop.train_step, []

    def out_of_memory_in_step_2(run, batch, clock):
        steps.append(max(m.num_tokens for m in batch.minibatches))
        if len(steps) == 2:
            raise torch.OutOfMemoryError(TORCH_SAYS)
        return real_step(run, batch, clock)

    figures = GpuMemory(allocated=int(68.7 * GIB), reserved=int(77.0 * GIB), total=H100)
    monkeypatch.setattr(loop, "train_step", out_of_memory_in_step_2)
    monkeypatch.setattr(loop, "gpu_memory", lambda device: figures)
    out = tmp_path / "run"
    args = args_from_dict({**tiny, "output_dir": str(out), "max_steps": 3,
                           "checkpoint_every_steps": 1})  # fmt: skip
    with pytest.raises(RunError) as raised:
        train(args)
    message = str(raised.value)
    assert isinstance(raised.value.__cause__, torch.OutOfMemoryError)
    lines = message.splitlines()
    assert lines[0] == (
        f"step 2: rank 0's GPU ran out of memory in a step whose largest minibatch held "
        f"{steps[1]} tokens (CUDA out of memory. Tried to allocate 752.00 MiB)"
    )
    assert lines[1] == "torch held 77.0 of the GPU's 79.6 GiB: 68.7 GiB in tensors, 8.3 GiB free"
    assert "8.3 GiB torch held free were in pieces too small" in lines[2]
    assert "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in lines[2]
    # eager blocks on the CPU: no activation budget to lower
    assert lines[3].startswith("to need less: max_tokens_per_gpu = 32 (now 64), ")
    assert lines[4] == (
        f"nothing of this step was saved; the newest checkpoint is {out / 'checkpoints' / 'step_1'}"
    )
    assert (out / "checkpoints" / "step_1").is_dir()


def test_a_plan_too_large_is_not_called_fragmentation_and_the_plan_is_shown(tmp_path):
    """On a GPU (a planned H100, Llama-3.2-3B, 16k rows): the plan's settings and its estimated
    peak are in the message; with little held free (2 GiB, under 5% of the GPU) there is no
    fragmentation line, and the activation budget the fit chose is offered halved."""
    machine = Machine(gpu=True, world_size=1, liger_installed=True,
                      attention_backends=("sdpa",), gpu_bytes=usable_bytes(H100))  # fmt: skip
    args = args_from_dict({"model_name_or_path": str(tmp_path), "learning_rate": 1e-5,
                           "data_path": str(tmp_path / "d.jsonl"), "batch_size": 64,
                           "output_dir": str(tmp_path / "out"), "max_tokens_per_gpu": 16384,
                           "cpu_offload": False})  # fmt: skip
    shape = model_shape(LLAMA_3B)
    resolved = resolve(args, LLAMA_3B, machine, np.full(1000, 600), shape=shape, warn=False)
    budget = resolved.fit.activation_budget
    assert resolved.compile_blocks and 0 < budget < 1
    memory = GpuMemory(allocated=int(70 * GIB), reserved=int(72 * GIB), total=H100)
    message = out_of_memory_message(
        torch.OutOfMemoryError(TORCH_SAYS), step=1, rank=3, tokens=16000, memory=memory,
        resolved=resolved, max_tokens_per_gpu=16384, checkpoint=None,
    )  # fmt: skip
    lines = message.splitlines()
    assert lines[0].startswith("step 1: rank 3's GPU ran out of memory")
    planned = estimate(shape, resolved.settings).peak
    assert lines[2] == (
        f"the plan: {resolved.describe()}; its estimated peak {planned / GIB:.1f} GiB"
    )
    assert "expandable_segments" not in message
    assert re.match(
        rf"to need less: activation_memory_budget = {budget / 2:.2f} \(now {budget:.2f}\), "
        r"max_tokens_per_gpu = 8192 \(now 16384\), activation_checkpointing = true, or "
        r"cpu_offload = true; `mt check` on the run file shows what fits$",
        lines[3],
    )
    assert lines[4] == "nothing of this step was saved; there is no checkpoint yet"
    # at budget 0 the blocks already recompute everything: that lever is not offered
    spent = replace(resolved, fit=replace(resolved.fit, activation_budget=0.0))
    message = out_of_memory_message(
        torch.OutOfMemoryError(TORCH_SAYS), step=1, rank=0, tokens=16000, memory=memory,
        resolved=spent, max_tokens_per_gpu=16384, checkpoint=None,
    )  # fmt: skip
    assert "activation_memory_budget" not in message and "max_tokens_per_gpu = 8192" in message
