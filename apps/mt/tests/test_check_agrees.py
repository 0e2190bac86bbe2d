"""``mt check`` plans what the trainer does: both fill in every unset speed and memory setting
with one function, :func:`mt_core.plan.resolve.resolve`, for the same machine.

On a simulated GPU (this CPU machine made to look like one to the trainer's set-up: a CUDA
device, the GPU's memory, liger-kernel installed) the trainer's resolution
(:func:`mt_core.plan.resolve.resolve_this_process`, which the trainer's set-up calls) equals the plan's, setting for setting;
on this CPU the trainer builds its model with what the resolver says. The model type without
Liger kernels is the drift this guards against: the trainer once turned Liger on for it on any
GPU while ``mt check`` planned it off (and counted the logits it materialises).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mt.check import make_plan
from mt_core.config import load_run_file
from mt_core.plan.memory import GIB, gpu


def _trainer_on_a_simulated_gpu(monkeypatch, run_file, device_name: str, world_size: int):
    """What the trainer's set-up resolves for ``run_file`` as rank 0 of ``world_size`` processes
    on GPUs like ``device_name``: the room the GPU leaves it is the whole GPU, as for ``mt
    check``; host memory is not the limit (``mt check`` cannot know the training machine's)."""
    import mt_core.model.build as build
    import mt_core.plan.room as room
    from mt_core.model.build import load_config
    from mt_core.plan.resolve import resolve_this_process
    from mt_core.trainer.data import build_data

    device = gpu(device_name)
    monkeypatch.setattr(room, "gpu_room", lambda *args: (device.memory_gib * GIB, ""))
    monkeypatch.setattr(room, "host_room_bytes", lambda *args: math.inf)
    monkeypatch.setattr(build, "liger_available", lambda: True)  # mt's GPU install has it
    # the GPU's compute capability, asked where a setting depends on it (float8)
    capability = {"H100": (9, 0), "H200": (9, 0), "A100": (8, 0), "A100-40": (8, 0)}[device_name]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: capability)
    args = load_run_file(str(run_file))
    ctx = SimpleNamespace(
        device=torch.device("cuda", 0), world_size=world_size, rank=0, is_main=True,
        data_parallel_size=world_size // args.sequence_parallel_size,
    )  # fmt: skip
    config = load_config(args.model_name_or_path)
    data = build_data(args, ctx, config.get_text_config().vocab_size, run_file.parent / "out")
    return resolve_this_process(args, config, ctx, data.train.lengths)


@pytest.fixture
def gpt2(tmp_path, kit):
    """A model type for which liger-kernel has no kernels."""
    from transformers import GPT2Config

    model = tmp_path / "gpt2"
    GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=128).save_pretrained(
        model
    )
    return model


def _llama_8b(tmp_path):
    from transformers import LlamaConfig

    model = tmp_path / "llama-8b"
    LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256,
    ).save_pretrained(model)  # fmt: skip
    return model


CASES = {
    # name: (model, run-file keys, GPU, GPUs)
    "tiny Llama, every speed key unset": ("tiny", {"attn_backend": "auto"}, "H100", 1),
    "gpt2: no Liger kernels for it": ("gpt2", {"attn_backend": "auto"}, "H100", 1),
    "tiny Llama with OSFT on 2 GPUs": ("tiny", {"osft": True, "osft_unfreeze_rank_ratio": 0.5}, "H200", 2),
    "8B on 4 small GPUs: budget 0, cpu_offload chosen": (
        "8b", {"batch_size": 32, "max_tokens_per_gpu": 32768}, "A100-40", 4,
    ),
    "8B on one H200, FP8 tensorwise": (
        "8b", {"batch_size": 32, "max_tokens_per_gpu": 16384, "float8": "tensorwise"}, "H200", 1,
    ),
    "8B on one H200, activation checkpointing": (
        "8b", {"batch_size": 32, "max_tokens_per_gpu": 16384, "activation_checkpointing": True},
        "H200", 1,
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_the_trainer_resolves_on_a_gpu_what_mt_check_plans(case, tmp_path, tiny_model, gpt2, kit,
                                                            monkeypatch):  # fmt: skip
    name, keys, device_name, world_size = CASES[case]
    model = {"tiny": tiny_model, "gpt2": gpt2, "8b": _llama_8b(tmp_path) if name == "8b" else None}
    rows = kit.token_rows(64, low=100, high=4000, seed=2) if name == "8b" else kit.token_rows(40)
    data = kit.write_jsonl(tmp_path / "data.jsonl", rows)
    run = kit.run_toml(tmp_path, model[name], data, **keys)
    plan = make_plan(load_run_file(str(run)), str(run), world_size, 1, device_name, batches=2)
    trainer = _trainer_on_a_simulated_gpu(monkeypatch, run, device_name, world_size)
    assert trainer == plan.resolved
    assert plan.settings == trainer.settings  # the memory plan is made for what will run
    if name == "gpt2":
        assert not trainer.liger and any(
            "no kernels for model_type 'gpt2'" in n for n in plan.notes
        )
    else:
        assert trainer.liger and trainer.compile_blocks


def test_on_this_cpu_the_trainer_builds_what_the_resolver_says(tmp_path, tiny_model, kit,
                                                               monkeypatch):  # fmt: skip
    """The trainer's set-up hands build_model the resolved settings (stopped there: nothing
    after it is needed to see them), and on a CPU they are the plain ones."""
    import mt_core.trainer.setup as setup
    from mt_core.model.build import load_config
    from mt_core.plan.resolve import resolve, this_machine
    from mt_core.trainer.data import build_data

    data = kit.write_jsonl(tmp_path / "data.jsonl", kit.token_rows(40))
    run = kit.run_toml(
        tmp_path, tiny_model, data, attn_backend="auto", activation_memory_budget=0.5
    )
    args = load_run_file(str(run))
    built = {}

    class Built(Exception):
        pass

    def stop_at_build(*args, **kwargs):
        built.update(kwargs)
        raise Built

    monkeypatch.setattr(setup, "build_model", stop_at_build)
    ctx = SimpleNamespace(device=torch.device("cpu"), world_size=1, rank=0, is_main=True,
                          data_parallel_size=1, sequence_group=None)  # fmt: skip
    with pytest.raises(Built), setup.setup_run(args, ctx, tmp_path / "out"):
        pass
    config = load_config(args.model_name_or_path)
    lengths = build_data(args, ctx, 64, tmp_path / "out").train.lengths
    expected = resolve(args, config, this_machine(ctx, gpu_bytes=None, host_bytes=math.inf),
                       np.asarray(lengths))  # fmt: skip
    assert (expected.attn_backend, expected.liger, expected.compile_blocks) == (
        "sdpa",
        False,
        False,
    )
    assert expected.fit.activation_budget == 1.0  # eager blocks: the budget is the compiler's
    assert built["attn_backend"] == expected.attn_backend
    assert built["use_liger"] == expected.liger
    assert built["compile_blocks"] == expected.compile_blocks
    assert built["keep_gathered"] == expected.fit.keep_gathered
    assert built["cpu_offload"] == expected.fit.cpu_offload
    assert (built["activation_offload"] is not None) == expected.fit.activation_offload
