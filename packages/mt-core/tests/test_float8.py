"""The run-file key ``float8`` (issue #29): which linear layers compute in FP8 for real model
shapes, that the conversion puts torchao's Float8Linear exactly there and leaves weights,
checkpoints and exports as a bfloat16 run's, and the one clear error where FP8 cannot run.
(No FP8 matrix product runs here: speed and loss are measured on a GPU, tools/bench/RESULTS.md.)
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, GptOssConfig, LlamaConfig

from mt_core.config import ConfigError, args_from_dict, load_run_file, place_problems
from mt_core.model import float8
from mt_core.model.float8 import bfloat16_reason, float8_layers
from mt_core.plan.memory import GIB
from mt_core.plan.resolve import Machine, resolve

SHAPES = {
    # published configs' shapes (vocabularies cut: the embeddings are no linear layers, and the
    # LM head is outside the blocks at any size)
    "Llama-3.2-1B": LlamaConfig(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=256, tie_word_embeddings=True,
    ),
    "Llama-3.1-8B": LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=256,
    ),
    "gpt-oss-20b": GptOssConfig(num_hidden_layers=24, vocab_size=256),
}  # fmt: skip
# (converted, kept in bfloat16 by reason): every block's q, o and MLP projections convert; the
# key/value projections of grouped-query attention (8 heads of 64 or 128: 512 or 1024 wide) are
# too small to pay; the LM head stays; GPT-OSS's router and experts are no linear layers (its
# experts are batched matrices), so only its attention converts
SHAPES["Llama-3.1-70B"] = LlamaConfig(
    hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
    num_key_value_heads=8, vocab_size=256,
)  # fmt: skip
TOO_SMALL = "too small for FP8 {} to pay (a side under {})"
OUTSIDE = {"outside the decoder blocks": 1}
# rowwise converts only sides of 8192 and more (measured slower at the 1B and 8B shapes)
EXPECTED = {
    ("Llama-3.2-1B", "tensorwise"): (
        16 * 5, {"2048 -> 512: " + TOO_SMALL.format("tensorwise", 2048): 32, **OUTSIDE}),
    ("Llama-3.1-8B", "tensorwise"): (
        32 * 5, {"4096 -> 1024: " + TOO_SMALL.format("tensorwise", 2048): 64, **OUTSIDE}),
    ("gpt-oss-20b", "tensorwise"): (
        24 * 2, {"2880 -> 512: " + TOO_SMALL.format("tensorwise", 2048): 48, **OUTSIDE}),
    ("Llama-3.1-70B", "tensorwise"): (
        80 * 5, {"8192 -> 1024: " + TOO_SMALL.format("tensorwise", 2048): 160, **OUTSIDE}),
    ("Llama-3.2-1B", "rowwise"): (0, {
        "2048 -> 512: " + TOO_SMALL.format("rowwise", 8192): 32,
        "2048 -> 2048: " + TOO_SMALL.format("rowwise", 8192): 32,
        "2048 -> 8192: " + TOO_SMALL.format("rowwise", 8192): 32,
        "8192 -> 2048: " + TOO_SMALL.format("rowwise", 8192): 16, **OUTSIDE}),
    ("Llama-3.1-8B", "rowwise"): (0, {
        "4096 -> 1024: " + TOO_SMALL.format("rowwise", 8192): 64,
        "4096 -> 4096: " + TOO_SMALL.format("rowwise", 8192): 64,
        "4096 -> 14336: " + TOO_SMALL.format("rowwise", 8192): 64,
        "14336 -> 4096: " + TOO_SMALL.format("rowwise", 8192): 32, **OUTSIDE}),
    ("Llama-3.1-70B", "rowwise"): (
        80 * 5, {"8192 -> 1024: " + TOO_SMALL.format("rowwise", 8192): 160, **OUTSIDE}),
}  # fmt: skip


@pytest.mark.parametrize(("name", "recipe"), list(EXPECTED))
def test_which_layers_of_real_shapes_compute_in_fp8(name, recipe):
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(SHAPES[name])
    layers = float8_layers(model, recipe)
    converted, kept = EXPECTED[name, recipe]
    assert sum(reason is None for reason in layers.values()) == converted
    assert Counter(reason for reason in layers.values() if reason is not None) == kept
    assert layers["lm_head"] == "outside the decoder blocks"
    if converted:
        assert all(layers[n] is None for n in layers if n.endswith(("q_proj", "o_proj")))


def test_weights_are_gathered_in_fp8_only_tensorwise_over_several_ranks_and_not_offloaded():
    """One rank has nothing to send, and the gather's cast cost a 1B run on one H200 10%;
    shards in host memory (cpu_offload) would need their scales reduced there."""
    assert [float8.gathers_in_float8(r, n) for r in ("tensorwise", "rowwise") for n in (1, 2, 8)
            ] == [False, True, True, False, False, False]  # fmt: skip
    assert not any(float8.gathers_in_float8(r, n, offloaded=True)
                   for r in ("tensorwise", "rowwise") for n in (1, 2, 8))  # fmt: skip


def test_routers_misaligned_and_frozen_layers_stay_in_bfloat16():
    with torch.device("meta"):
        router = nn.Linear(4096, 8, bias=False)  # a Mixtral-style router as a linear layer
        odd = nn.Linear(4096, 2050)  # wide enough, but not a multiple of 16
        frozen = nn.Linear(4096, 4096).requires_grad_(False)
        wide = nn.Linear(4096, 4096)
    assert bfloat16_reason(router, experts=frozenset({8})) == "a router (8 expert logits)"
    assert bfloat16_reason(odd) == "4096 -> 2050: FP8 matrix products need multiples of 16"
    assert bfloat16_reason(frozen).startswith("frozen")
    assert bfloat16_reason(wide) is None


@pytest.fixture
def group():
    """A one-process gloo group for this test alone (a run in the same worker ends its own)."""
    from mt_fsdp import init_distributed, shutdown_distributed

    ctx = init_distributed("cpu")
    yield ctx
    shutdown_distributed()


@pytest.fixture
def tiny_folder(tiny):
    from pathlib import Path

    return Path(tiny["model_name_or_path"])


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_converted_layers_are_float8_linear_exactly_where_the_filter_says(
    recipe, tiny_folder, group, monkeypatch
):
    """The tiny Llama with the size bound lowered to its width (32): its key/value projections
    (16 wide) stay, the rest of each block converts; the weights load as they are."""
    pytest.importorskip("torchao.float8")  # the torchao extra
    from torchao.float8.float8_linear import Float8Linear
    from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor

    from mt_core.model.build import build_model, load_config

    monkeypatch.setattr(float8, "MIN_DIMENSION", dict.fromkeys(float8.RECIPES, 32))
    # gathered in FP8 as over several ranks (this group has one)
    monkeypatch.setattr(float8, "gathers_in_float8", lambda recipe, *rest: recipe == "tensorwise")
    model, _ = build_model(
        tiny_folder, load_config(tiny_folder), group, master_dtype=torch.float32,
        compute_dtype=torch.float32, attn_backend="sdpa", float8=recipe,
    )  # fmt: skip
    converted = {n for n, m in model.named_modules() if isinstance(m, Float8Linear)}
    assert len(converted) == 2 * 5
    assert all(n.endswith(("q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
               for n in converted)  # fmt: skip
    # tensorwise weights are gathered in FP8 by FSDP2; rowwise ones as bfloat16 ones are
    wrapped = {n.removesuffix(".weight") for n, p in model.named_parameters()
               if isinstance(p.to_local(), WeightWithDynamicFloat8CastTensor)}  # fmt: skip
    assert wrapped == (converted if recipe == "tensorwise" else set())
    reference = AutoModelForCausalLM.from_pretrained(tiny_folder).state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(value.full_tensor(), reference[name]), name
    if recipe == "tensorwise":  # the gathers' scales follow every change of the weights
        weights = {
            n: p for n, p in model.named_parameters() if n.removesuffix(".weight") in wrapped
        }
        largest = torch.finfo(torch.float8_e4m3fn).max
        for scale_by in (1.0, 0.25):
            with torch.no_grad():
                for weight in weights.values():
                    weight.mul_(scale_by)
            float8.refresh_weight_scales(model)
            for name, weight in weights.items():
                local = weight._local_tensor  # (to_local() makes a new wrapper)
                expected = largest / local._tensor.abs().max().double()
                # torchao divides in float64 and rounds once to float32: within half an ulp
                torch.testing.assert_close(local._precomputed_scale.double(), expected,
                                           rtol=2**-24, atol=0, msg=name)  # fmt: skip


def test_fp8_checkpoints_and_exports_are_those_of_a_bfloat16_run(tiny_folder, group, tmp_path,
                                                                  monkeypatch):  # fmt: skip
    """A checkpoint written with float8 resumes without it and the other way round, and the
    export loads in transformers with the same weights and dtype."""
    pytest.importorskip("torchao.float8")  # the torchao extra
    from mt_core.model.build import build_model, load_config
    from mt_fsdp import load_checkpoint, save_checkpoint
    from mt_fsdp.export import export_hf

    monkeypatch.setattr(float8, "MIN_DIMENSION", dict.fromkeys(float8.RECIPES, 32))
    monkeypatch.setattr(float8, "gathers_in_float8", lambda recipe, *rest: recipe == "tensorwise")
    config = load_config(tiny_folder)

    def built(recipe):
        model, _ = build_model(
            tiny_folder, config, group, master_dtype=torch.float32, compute_dtype=torch.float32,
            attn_backend="sdpa", float8=recipe,
        )  # fmt: skip
        return model, torch.optim.AdamW(model.parameters())

    reference = AutoModelForCausalLM.from_pretrained(tiny_folder).state_dict()
    exported = AutoModelForCausalLM.from_pretrained(
        export_hf(built("tensorwise")[0], tmp_path / "hf")
    )
    for name, value in exported.state_dict().items():
        assert value.dtype == reference[name].dtype and torch.equal(value, reference[name]), name
    for writer, reader in (("tensorwise", None), (None, "tensorwise"), ("rowwise", None)):
        folder = save_checkpoint(tmp_path / f"{writer}-{reader}", 1, *built(writer), {})
        model, optimizer = built(reader)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.zero_()
        load_checkpoint(folder, model, optimizer)
        for name, value in model.state_dict().items():
            assert torch.equal(value.full_tensor(), reference[name]), (writer, reader, name)


CONFIG = LlamaConfig(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=64,
)  # fmt: skip
KEYS = {"model_name_or_path": "m", "data_path": "d.jsonl", "output_dir": "out",
        "learning_rate": 1e-5, "batch_size": 8, "max_tokens_per_gpu": 256}  # fmt: skip


def _resolved(args, gpu: bool, capability=None):
    machine = Machine(
        gpu=gpu, world_size=1, liger_installed=False,
        attention_backends=("torch_varlen", "sdpa") if gpu else ("sdpa",),
        gpu_bytes=80 * GIB if gpu else None, gpu_capability=capability,
    )  # fmt: skip
    return resolve(args, CONFIG, machine, np.full(8, 32), warn=False)


NEEDS = ("float8: FP8 compute needs a GPU with FP8 tensor cores (compute capability 8.9 or "
         "more: Ada, Hopper, Blackwell)")  # fmt: skip


@pytest.mark.parametrize(
    ("gpu", "capability", "problem"),
    [
        (False, None, f"{NEEDS}, and this run is on the CPU: unset float8 (bfloat16 compute)"),
        (True, (8, 0), f"{NEEDS}; this GPU's is 8.0: unset float8 (bfloat16 compute)"),
    ],
)
def test_fp8_where_it_cannot_run_is_one_clear_error_at_the_key(gpu, capability, problem,
                                                                tmp_path):  # fmt: skip
    run_file = tmp_path / "run.toml"
    keys = {**KEYS, "float8": "tensorwise"}
    run_file.write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in keys.items()))
    with pytest.raises(ConfigError) as caught:
        _resolved(load_run_file(str(run_file)), gpu, capability)
    assert caught.value.problems == [problem]
    # as `mt run` and `mt check` show it: at the run file's line of the key
    assert place_problems(caught.value, run_file).problems == [f"{run_file}:7: {problem}"]


def test_the_settings_say_fp8_where_set_and_nothing_changes_without_it(monkeypatch):
    # CONFIG (32 wide) as large as the bound: its q, o and MLP projections convert
    monkeypatch.setattr(float8, "MIN_DIMENSION", dict.fromkeys(float8.RECIPES, 32))
    hopper = _resolved(args_from_dict({**KEYS, "float8": "rowwise"}), True, (9, 0))
    assert hopper.float8 == "rowwise"
    assert hopper.describe().startswith(
        "weights float32, compute bfloat16 (large linear layers FP8 rowwise), attention"
    )
    assert hopper.notes == ()
    ada = _resolved(args_from_dict({**KEYS, "float8": "tensorwise"}), True, (8, 9))
    assert ada.float8 == "tensorwise"
    eager = _resolved(args_from_dict({**KEYS, "float8": "tensorwise", "torch_compile": False}),
                      True, (9, 0))  # fmt: skip
    assert eager.notes[0].startswith("float8 without compiled blocks")
    for gpu, capability in ((True, (8, 0)), (False, None)):
        unset = _resolved(args_from_dict(KEYS), gpu, capability)
        assert unset.float8 is None and "FP8" not in unset.describe()


def test_a_recipe_that_converts_no_layer_of_the_model_says_so():
    """With the real bounds nothing of CONFIG (32 wide) converts: a note, not a silent no-op."""
    for recipe, hint in (("rowwise", "; 'tensorwise' converts from 2048 up"), ("tensorwise", "")):
        resolved = _resolved(args_from_dict({**KEYS, "float8": recipe}), True, (9, 0))
        assert resolved.notes == (
            f"float8 = {recipe!r} converts no linear layer of this model (each has a side too "
            "small for FP8 to pay, mt_core.model.float8.MIN_DIMENSION): it computes in "
            "bfloat16" + hint,
        )


def test_a_cpu_run_with_the_key_stops_before_any_weight_loads(tiny, tmp_path, monkeypatch):
    """``mt run``'s path: the resolver's error comes before the model is built, let alone
    loaded, and nothing of the run is written but its data cache."""
    import mt_core.model.build as build
    from mt_core import train

    def never(*args, **kwargs):
        raise AssertionError("weights loaded")

    monkeypatch.setattr(build, "load_weights", never)
    with pytest.raises(ConfigError) as caught:
        train(args_from_dict({**tiny, "output_dir": str(tmp_path), "float8": "tensorwise"}))
    assert caught.value.problems == [
        f"{NEEDS}, and this run is on the CPU: unset float8 (bfloat16 compute)"
    ]
    assert not (tmp_path / "run.toml").exists()


def test_training_rows_are_filled_to_a_multiple_of_16_tokens_under_the_key(tiny, tmp_path):
    """FP8 weight gradients take the row's tokens as their products' inner dimension, which
    must be a multiple of 16 (a 16,087-token row failed on an H200): every training minibatch
    of a run with the key is, by a filler without targets; without the key nothing changes."""
    from mt_core.trainer.data import build_data
    from mt_fsdp import DistContext

    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), mesh=None)
    rows = {}
    for key in (None, "tensorwise"):
        args = args_from_dict({**tiny, "output_dir": str(tmp_path / str(key)), "float8": key})
        data = build_data(args, ctx, 64, tmp_path / str(key))
        rows[key] = [step.minibatches for step, _ in zip(data.loader, range(3), strict=False)]
    for plain, filled in zip(sum(rows[None], []), sum(rows["tensorwise"], []), strict=True):
        assert filled.num_tokens % 16 == 0 and filled.num_tokens - plain.num_tokens < 16
        assert plain.num_tokens % 16 or filled.num_tokens == plain.num_tokens
        assert filled.num_loss_tokens == plain.num_loss_tokens  # the filler has no target
    assert any(m.num_tokens % 16 for m in sum(rows[None], []))  # the test has rows to fill
