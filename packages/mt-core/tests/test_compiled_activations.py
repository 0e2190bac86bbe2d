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
from transformers import LlamaConfig

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


def test_compiled_blocks_keep_what_the_memory_model_counts(tool):
    # grouped-query attention, q and key/value widths and the MLP all different, i/h as Llama's
    config = LlamaConfig(
        hidden_size=128, intermediate_size=448, num_attention_heads=4, num_key_value_heads=2,
        head_dim=48, num_hidden_layers=1, vocab_size=256,
    )  # fmt: skip
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
