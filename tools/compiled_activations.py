"""What a compiled decoder block keeps for its backward pass at each activation memory budget.

The memory model (mt_core.plan.memory) counts a compiled block's saved activations as
``c·h + b·(a - c·h)`` per token at budget b. torch's partitioner does not scale that way: below 1
it first tries two more aggressive min-cuts and keeps the first whose share is under b
(torch/_functorch/partitioners.py, choose_saved_values_set), so the kept bytes are a step
function of b. This measures it: one Llama decoder layer of the given width, compiled (inductor,
as mt's compiled blocks), run forward once under saved-tensor hooks; the bytes of every distinct
saved tensor that is not a parameter, per token, against the formula's eager ``a``.

    uv run python tools/compiled_activations.py                      # CPU, sdpa attention
    uv run python tools/compiled_activations.py --budgets 1,0.9,0.6,0.3 --hidden 512

On a CPU the attention is sdpa and the norms and SwiGLU are HF's (Liger's kernels are CUDA);
the GPU graph differs there (flash attention's op, Liger's loss), so the GPU figures come from
tools/gpu/check_memory.py --budgets; this shows the shape of the curve and how it moves.
"""

from __future__ import annotations

import argparse

import torch
import torch._functorch.config as functorch_config
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding


def kept_bytes_per_token(layer: torch.nn.Module, x: torch.Tensor, rope, budget: float) -> float:
    """Bytes per token of the distinct non-parameter tensors a compiled ``layer`` saves."""
    torch._dynamo.reset()
    parameters = {p.data_ptr() for p in layer.parameters()}
    compiled = torch.compile(layer)
    with functorch_config.patch(activation_memory_budget=budget):
        compiled(x, position_embeddings=rope)  # compile outside the count
        saved: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            if tensor.data_ptr() not in parameters:
                saved[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            compiled(x, position_embeddings=rope)
    return sum(saved.values()) / x.shape[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="1,0.9,0.8,0.7,0.6,0.5,0.4,0.3")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=896)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=512)
    args = parser.parse_args()
    config = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, num_hidden_layers=1,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    layer = LlamaDecoderLayer(config, 0).to(torch.bfloat16)
    x = torch.randn(1, args.tokens, args.hidden, dtype=torch.bfloat16, requires_grad=True)
    rope = LlamaRotaryEmbedding(config)(x, torch.arange(args.tokens)[None])
    h, i = args.hidden, args.intermediate
    q = args.hidden
    k = args.kv_heads * (args.hidden // args.heads)
    eager = 2 * (4 * h + 2 * q + 2 * k + 3 * i)  # the memory model's a with Liger's kernels
    print(f"Llama layer h={h} i={i} q={q} k={k}, {args.tokens} tokens; the formula's a = {eager} "
          f"B/token, the block's input c·h = {2 * h}")  # fmt: skip
    print("budget | kept B/token | of a | the model's c·h + b·(a - c·h)")
    for budget in (float(b) for b in args.budgets.split(",")):
        kept = kept_bytes_per_token(layer, x, rope, budget)
        model = 2 * h + budget * (eager - 2 * h)
        print(f"{budget:.2f} | {kept:.0f} | {kept / eager:.2f} | {model:.0f}", flush=True)


if __name__ == "__main__":
    main()
