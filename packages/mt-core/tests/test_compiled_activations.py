"""The memory model's compiled-activation term against the compiler itself: one Llama decoder
layer compiled with inductor (as mt's blocks are) at several activation memory budgets, the
bytes of what it saves for its backward pass counted (tools/compiled_activations.py, which the
GPU runs with flash-attn-4 at the 8B width; sdpa here saves what flash attention saves).

The model, mt_core.plan.memory.compiled_bytes_per_token_layer, is exact to the byte at budget 1
and wherever torch's partitioner returns its more aggressive min-cut (every budget above that
cut's share, about 0.66), and an upper bound below it, where a knapsack chooses what to keep:
a plan never counts less than the compiled blocks hold."""

import importlib.util
from pathlib import Path

import pytest
from transformers import LlamaConfig, Qwen3Config

from mt_core.plan.memory import COMPUTE_BYTES, compiled_bytes_per_token_layer, compiled_share
from mt_core.plan.shape import model_shape

TOOL = Path(__file__).resolve().parents[3] / "tools" / "compiled_activations.py"
BUDGETS = (1.0, 0.9, 0.75, 0.55, 0.25)


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("compiled_activations", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# grouped-query attention, q and key/value widths and the MLP all different, i/h as Llama's
WIDTHS = dict(
    hidden_size=128, intermediate_size=448, num_attention_heads=4, num_key_value_heads=2,
    head_dim=48, num_hidden_layers=1, vocab_size=256,
)  # fmt: skip


def test_compiled_blocks_keep_what_the_memory_model_counts(tool):
    config = LlamaConfig(**WIDTHS)
    shape = model_shape(config)
    share = compiled_share(shape, 0.99)
    assert 0.6 < share < BUDGETS[2] < BUDGETS[1] < 1  # two budgets on the plateau
    measured = tool.measure(config, list(BUDGETS), tokens=96, attention="sdpa", device="cpu")
    model = [compiled_bytes_per_token_layer(shape, budget) for budget in BUDGETS]
    # whole bytes per token (every saved tensor is tokens x a width): the same numbers exactly
    assert measured[:3] == model[:3]
    held = COMPUTE_BYTES * shape.hidden  # the block's input: the least a block can keep
    for budget, kept, counted in zip(BUDGETS[3:], measured[3:], model[3:], strict=True):
        assert held <= kept <= counted, budget
    assert measured == sorted(measured, reverse=True)  # a lower budget never keeps more


def test_a_block_that_normalises_queries_and_keys_keeps_them_before_their_norms(tool):
    """Qwen3's q_norm and k_norm: each head's q and k before the norm and a reciprocal RMS per
    head more than a Llama block of the same widths, at 1 and on the plateau alike. (Gemma2's
    sandwich norms, one more hidden-wide tensor and two reciprocal RMS, were measured with
    tools/compiled_activations.py and a CPU flash-attn-4 stand-in: transformers' own sdpa does
    not run Gemma2.)"""
    config = Qwen3Config(**WIDTHS)
    shape = model_shape(config)
    assert shape.qk_norms and not shape.sandwich_norms
    llama = model_shape(LlamaConfig(**WIDTHS))
    extra = COMPUTE_BYTES * (4 * 48 + 2 * 48) + 4 * (4 + 2)
    budgets = [1.0, 0.9]
    measured = tool.measure(config, budgets, tokens=96, attention="sdpa", device="cpu")
    assert measured == [compiled_bytes_per_token_layer(shape, budget) for budget in budgets]
    assert measured == [compiled_bytes_per_token_layer(llama, b) + extra for b in budgets]


def test_the_shape_knows_which_norms_a_block_has_beyond_llamas():
    """From the block's own modules (built on the meta device): q/k norms (Qwen3, Gemma3) and
    sandwich norms (Gemma2, Gemma3); what Gemma2's add was measured with the CPU flash-attn-4
    stand-in at two widths (tools/bench/RESULTS.md): one hidden-wide tensor, two more RMS."""
    from transformers import Gemma2Config, Gemma3TextConfig

    llama = model_shape(LlamaConfig(**WIDTHS))
    assert not (llama.qk_norms or llama.sandwich_norms)
    gemma2 = model_shape(Gemma2Config(**WIDTHS))
    assert gemma2.sandwich_norms and not gemma2.qk_norms
    gemma3 = model_shape(Gemma3TextConfig(**WIDTHS))
    assert gemma3.sandwich_norms and gemma3.qk_norms
    for budget in (1.0, 0.9):
        more = compiled_bytes_per_token_layer(gemma2, budget)
        assert more - compiled_bytes_per_token_layer(llama, budget) == COMPUTE_BYTES * 128 + 8


def test_fp8_blocks_keep_h_plus_2i_bytes_less_per_token_at_budget_1(tool, monkeypatch):
    """mt_core.plan.memory.float8_kept_saving against the compiler: a layer whose q, o and MLP
    projections mt converts to FP8 tensorwise (k and v, 128 wide, stay bfloat16) keeps h + 2i
    bytes less per token than in bfloat16, less only the FP8 scales (a few float32 scalars per
    layer, not per token). The formula was found on the 1B, 3B and 8B shapes
    (tools/bench/RESULTS.md); this width (h 512, i = 1.25 h) is none of them. Below budget 1 the
    plan counts FP8 blocks as bfloat16 ones: at 0.5 FP8 keeps no more. The conversion
    bound is lowered to 512 so that a width the CPU's FP8 products (an emulation, ~30 MFLOP/s)
    finish in seconds converts as those shapes' layers do."""
    pytest.importorskip("torchao")
    from mt_core.model import float8
    from mt_core.plan.memory import float8_kept_saving

    monkeypatch.setattr(float8, "MIN_DIMENSION", dict.fromkeys(float8.RECIPES, 512))
    config = LlamaConfig(
        hidden_size=512, intermediate_size=640, num_attention_heads=4, num_key_value_heads=1,
        head_dim=128, num_hidden_layers=1, vocab_size=256,
    )  # fmt: skip
    shape = model_shape(config)
    saving = float8_kept_saving(shape, "tensorwise")
    assert saving == 512 + 2 * 640
    assert float8_kept_saving(shape, "rowwise") == 0  # not measured: not claimed
    tokens = 64
    plain, half = tool.measure(config, [1.0, 0.5], tokens=tokens, attention="sdpa", device="cpu")
    fp8, fp8_half = tool.measure(config, [1.0, 0.5], tokens=tokens, attention="sdpa",
                                 device="cpu", float8="tensorwise")  # fmt: skip
    assert plain == compiled_bytes_per_token_layer(shape, 1.0)
    assert fp8 == pytest.approx(compiled_bytes_per_token_layer(shape, 1.0, "tensorwise"), abs=1)
    scales = 16 * 4  # at most 16 float32 scalars a layer
    assert saving - scales / tokens <= plain - fp8 <= saving
    assert fp8_half <= half <= compiled_bytes_per_token_layer(shape, 0.5, "tensorwise")
