"""The run-file key ``deterministic`` (issue #30): what it sets for the span of a run and puts
back after it, the attention backend the resolver picks under it, and the one clear error for a
backend without a deterministic backward pass. (Bit-identical GPU runs are checked on a GPU:
tools/gpu/deterministic_check.py; the flash-attn kernels' own flag: test_attention_backends.)"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from transformers import LlamaConfig

from mt_core.config import ConfigError, args_from_dict, load_run_file, place_problems
from mt_core.model.determinism import deterministic_kernels
from mt_core.plan.memory import GIB
from mt_core.plan.resolve import Machine, resolve

CONFIG = LlamaConfig(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=64,
)  # fmt: skip
INSTALLED = ("flash_attn_4", "flash_attn", "torch_varlen", "sdpa")  # the order auto prefers


def _global_settings() -> tuple:
    import torch._inductor.config as inductor_config
    import torch.utils.deterministic as deterministic

    return (
        os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        inductor_config.deterministic,
        torch.backends.cuda.cudnn_sdp_enabled(),
        deterministic.fill_uninitialized_memory,
    )


def test_the_key_sets_what_it_promises_for_the_run_and_puts_it_back(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = _global_settings()
    assert before == (None, False, False, False, True, True)  # torch's defaults
    with deterministic_kernels(False):
        assert _global_settings() == before
    with deterministic_kernels(True):
        # cuBLAS's deterministic workspace, torch's deterministic algorithms (errors, not
        # warnings, where an op has none), the compiler's untimed kernel choices, no cuDNN
        # attention, and no NaN-filling of every allocation
        assert _global_settings() == (":4096:8", True, False, True, False, False)
    assert _global_settings() == before
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the caller's own, put back too
    with pytest.raises(RuntimeError, match="stops here"), deterministic_kernels(True):
        raise RuntimeError("a run that stops here")
    assert _global_settings() == (":16:8", *before[1:])


def _args(**keys):
    return args_from_dict(
        {"model_name_or_path": "m", "data_path": "d.jsonl", "output_dir": "out",
         "learning_rate": 1e-5, "batch_size": 8, "max_tokens_per_gpu": 256, **keys}
    )  # fmt: skip


def _on_a_gpu(args, capability: tuple[int, int], backends=INSTALLED):
    machine = Machine(
        gpu=True, world_size=1, liger_installed=False, attention_backends=backends,
        gpu_bytes=80 * GIB, gpu_capability=capability,
    )  # fmt: skip
    return resolve(args, CONFIG, machine, np.full(8, 32), warn=False)


@pytest.mark.parametrize(
    ("capability", "backends", "deterministic", "chosen"),
    [
        ((9, 0), INSTALLED, True, "flash_attn_4"),  # Hopper: flash-attn-4 has one
        ((12, 0), INSTALLED, True, "flash_attn"),  # consumer Blackwell: flash-attn-4 has none
        ((12, 0), INSTALLED[:1] + INSTALLED[2:], True, "torch_varlen"),  # no flash-attn 2
        ((12, 0), INSTALLED, False, "flash_attn_4"),  # without the key: the fastest
    ],
)
def test_auto_picks_a_backend_with_a_deterministic_backward(
    capability, backends, deterministic, chosen
):
    resolved = _on_a_gpu(_args(deterministic=deterministic), capability, backends)
    assert resolved.attn_backend == chosen
    assert resolved.deterministic is deterministic
    assert resolved.describe().endswith(", deterministic on" if deterministic else "once a step")


def test_a_backend_without_a_deterministic_backward_is_one_clear_error(tmp_path):
    keys = {"model_name_or_path": "m", "data_path": "d.jsonl", "output_dir": "out",
            "learning_rate": 1e-5, "batch_size": 8, "max_tokens_per_gpu": 256,
            "attn_backend": "flash_attn_4", "deterministic": True}  # fmt: skip
    run_file = tmp_path / "run.toml"
    run_file.write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in keys.items()))
    args = load_run_file(str(run_file))
    with pytest.raises(ConfigError) as caught:
        _on_a_gpu(args, (12, 0))
    (problem,) = caught.value.problems
    assert problem == (
        "attn_backend: flash-attn-4 has no deterministic backward pass on compute capability "
        "12.0, which deterministic = true needs: use attn_backend = 'flash_attn' (flash-attn 2), "
        "'torch_varlen' or 'auto' (which picks one that has it)"
    )
    # as `mt run` shows it: at the run file's line of the key
    assert place_problems(caught.value, run_file).problems == [f"{run_file}:7: {problem}"]
    # the same choice stands where flash-attn-4 has one, and without the key
    assert _on_a_gpu(args, (9, 0)).attn_backend == "flash_attn_4"
    assert _on_a_gpu(_args(attn_backend="flash_attn_4"), (12, 0)).attn_backend == "flash_attn_4"


def test_the_settings_say_the_precision_and_the_key():
    on_gpu = _on_a_gpu(_args(deterministic=True), (9, 0))
    assert on_gpu.describe().startswith("weights float32, compute bfloat16, attention flash_attn_4")
    assert on_gpu.compute_dtype == "bfloat16"
    on_cpu = resolve(
        _args(train_dtype="bfloat16"), CONFIG,
        Machine(gpu=False, world_size=1, liger_installed=False, attention_backends=("sdpa",)),
        np.full(8, 32),
    )  # fmt: skip
    assert on_cpu.describe() == (
        "weights bfloat16, compute bfloat16, attention sdpa, liger off, compiled blocks off, "
        "activation budget 1.00, activation offload off, cpu_offload off, gradient sync every "
        "minibatch"  # bfloat16 weights: a deferred sync would accumulate in float32
    )


def test_a_cpu_run_under_the_key_trains_and_leaves_the_process_as_it_was(tiny, tmp_path, capsys):
    """Every op of a run takes a deterministic implementation on the CPU (torch raises where
    one has none), the run's first line says the key is on, and the process is as before."""
    from mt_core import train

    before = _global_settings()
    train(args_from_dict({**tiny, "output_dir": str(tmp_path), "deterministic": True}))
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("settings weights float32, compute float32, attention sdpa")
    assert first.endswith(", deterministic on")
    assert _global_settings() == before
