"""What a compiled decoder block keeps for its backward pass at each activation memory budget.

The memory model counts it per token and layer as
``mt_core.plan.memory.compiled_bytes_per_token_layer``: at budget 1 what Liger's fused kernels
keep, ``a``; below 1 ``min(c·h + b·(a - c·h), a - c·(2h + i))``, the second torch's more
aggressive min-cut (torch/_functorch/partitioners.py, choose_saved_values_set returns it for
every budget above its own share). This measures it: one decoder layer of a shape from
tools/random_model.py (one layer of it), compiled with inductor as mt's blocks are, run forward
once under saved-tensor hooks; the bytes of every distinct storage it saves that is not a
parameter nor the rotary tables (inputs every block shares), per token, beside the model's.

    uv run python tools/compiled_activations.py                                  # CPU, sdpa
    uv run python tools/compiled_activations.py --shape llama-3.1-8b --budgets 1,0.9,0.54
    python3 tools/compiled_activations.py --shape llama-3.1-8b --attention flash_attn_4 \\
        --device cuda --tokens 16384                                             # the GPU's graph

``--attention sdpa`` is transformers' own (one sequence, causal): it saves what flash attention
saves (the output and the log-sum-exp per head). Any other is mt's padding-free backend of that
name, on a row of documents as mt packs them (flash_attn_4 is what mt picks on an H100/H200).
packages/mt-core/tests/test_compiled_activations.py holds the model to this measurement.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import sys
from collections.abc import Iterable
from pathlib import Path

import torch
import torch._functorch.config as functorch_config

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/: the shared shapes
from random_model import SHAPES, model_config  # noqa: E402


def saved_bytes(
    layer: torch.nn.Module, budget: float, ignore: Iterable[torch.Tensor], *args, **kwargs
) -> int:
    """Bytes of the distinct storages ``layer``, compiled afresh with ``budget``, saves for its
    backward pass when called with ``args`` and ``kwargs``; its parameters and ``ignore`` not
    counted."""
    torch._dynamo.reset()  # a new budget is a new compilation: the cached one would be reused
    skipped = {t.untyped_storage().data_ptr() for t in [*layer.parameters(), *ignore]}
    compiled = torch.compile(layer)
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skipped:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with (
        functorch_config.patch(activation_memory_budget=budget),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor),
    ):
        compiled(*args, **kwargs)
    return sum(saved.values())


def one_layer(config, tokens: int, attention: str, device: str, float8: str | None = None):
    """A decoder layer of ``config`` in bfloat16 on ``device`` (its large linear layers in FP8
    where ``float8`` names a recipe, as mt converts them), and the arguments of one call with
    ``tokens`` tokens (two documents where mt's padding-free attention is used)."""
    from transformers import AutoModelForCausalLM

    # one layer, a small vocabulary: the embeddings do not matter here
    config = copy.deepcopy(config)
    config.num_hidden_layers, config.vocab_size = 1, 256
    if attention == "sdpa":
        config._attn_implementation = "sdpa"
    else:
        from mt_core.model.attention import register_padding_free_attention

        config._attn_implementation = register_padding_free_attention(attention)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    if float8 is not None:
        from mt_core.model.float8 import convert_to_float8

        convert_to_float8(model, float8, shard_ranks=1)
    hidden = torch.randn(1, tokens, config.hidden_size, dtype=torch.bfloat16, device=device)
    hidden.requires_grad_(True)
    kwargs = {}
    if attention == "sdpa":
        positions = torch.arange(tokens, device=device)[None]
    else:  # two documents in the row, as mt packs them
        first = tokens // 3
        positions = torch.cat([torch.arange(first), torch.arange(tokens - first)])[None]
        positions = positions.to(device)
        starts = torch.tensor([0, first, tokens], dtype=torch.int32, device=device)
        longest = tokens - first
        kwargs = dict(cu_seq_lens_q=starts, cu_seq_lens_k=starts, max_length_q=longest,
                      max_length_k=longest)  # fmt: skip
    rotary = model.model.rotary_emb
    if "layer_type" in inspect.signature(rotary.forward).parameters:  # per kind of layer (Gemma3)
        rope = rotary(hidden, positions, layer_type=model.config.layer_types[0])
    else:
        rope = rotary(hidden, positions)
    kwargs.update(attention_mask=None, position_ids=positions, position_embeddings=rope)
    return model.model.layers[0], hidden, rope, kwargs


def measure(
    config, budgets: list[float], tokens: int, attention: str, device: str,
    float8: str | None = None,
) -> list[float]:  # fmt: skip
    """Bytes per token one layer of ``config`` keeps at each budget."""
    layer, hidden, rope, kwargs = one_layer(config, tokens, attention, device, float8)
    return [saved_bytes(layer, b, rope, hidden, **kwargs) / tokens for b in budgets]


def main() -> None:
    from mt_core.plan.memory import compiled_bytes_per_token_layer
    from mt_core.plan.shape import model_shape

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--budgets", default="1,0.9,0.8,0.7,0.6,0.5,0.4,0.3")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--attention", default="sdpa", help="sdpa or an mt attn_backend")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--float8", help="an FP8 recipe (tensorwise, rowwise): mt's FP8 layers")
    args = parser.parse_args()
    config = model_config(args.shape)
    budgets = [float(b) for b in args.budgets.split(",")]
    shape = model_shape(config)
    print(f"{args.shape}: one layer, h {shape.hidden}, i {shape.intermediate}, {shape.heads} heads "
          f"({shape.kv_heads} key/value, dim {shape.head_dim}), {args.tokens} tokens, "
          f"{args.attention} on {args.device}, FP8 {args.float8 or 'off'}, "
          f"torch {torch.__version__}")  # fmt: skip
    print("budget | kept B/token | the model's | measured / model")
    kept = measure(config, budgets, args.tokens, args.attention, args.device, args.float8)
    for budget, measured in zip(budgets, kept, strict=True):
        model = compiled_bytes_per_token_layer(shape, budget)
        print(f"{budget:.2f} | {measured:,.0f} | {model:,.0f} | {measured / model:.4f}", flush=True)


if __name__ == "__main__":
    main()
