"""Where an OSFT step's own time and memory go, at the size its users run (issue #27).

The target matrices of a model shape (Llama-3.1-8B by default: 32 layers of q/k/v/o and
gate/up/down, 6.98B values) are built as bfloat16 ``nn.Linear`` weights on the GPU, OSFT is
applied (ratio 0.25, the default patterns; bases filled with random values: the matmuls cost the
same whatever the values, and an SVD of every matrix would take minutes), every weight gets a
gradient, and the two per-step operations are timed alone, without the model's forward and
backward: ``project_gradients_`` (between backward and the optimizer step) and ``project_``
(after it), for float32 master weights (float32 bases: gradients in TF32, weights in split TF32) and
bfloat16 ones (bfloat16 bases and products).

    python3 tools/gpu/osft_step_cost.py --out $OUT                 # one H200 or H100
    uv run python tools/gpu/osft_step_cost.py --shape tiny --device cpu --out /tmp/osc  # dry run

Prints one table: seconds per call (median of --repeat after one warm-up), the FLOPs of the
matrix products (mt_osft.subspace.matmul_flops) and the rate they ran at, what OSFT keeps on the GPU
(W0 and the bases) and the extra memory a call needs at its peak; then the weight projection of
one layer per matrix kind.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from mt_osft import OSFTConfig, apply_osft, residual_bound
from mt_osft.subspace import matmul_flops

SHAPES = {  # hidden, intermediate, layers, heads, kv heads
    "llama-3.1-8b": (4096, 14336, 32, 32, 8),
    "llama-3.2-1b": (2048, 8192, 16, 32, 8),
    "tiny": (64, 176, 2, 4, 2),
}
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GIB = 2**30


def build(shape: str, device: torch.device) -> nn.Module:
    """The decoder layers' target matrices under Llama's module names, bfloat16, no forward."""
    hidden, inter, layers, heads, kv = SHAPES[shape]
    kv_width = hidden // heads * kv
    sizes = {
        "self_attn": {"q_proj": (hidden, hidden), "k_proj": (hidden, kv_width),
                      "v_proj": (hidden, kv_width), "o_proj": (hidden, hidden)},
        "mlp": {"gate_proj": (hidden, inter), "up_proj": (hidden, inter),
                "down_proj": (inter, hidden)},
    }  # fmt: skip
    model = nn.Module()
    model.layers = nn.ModuleList()
    for _ in range(layers):
        layer = nn.Module()
        for part, linears in sizes.items():
            holder = nn.Module()
            for name, (inn, out) in linears.items():
                linear = nn.Linear(inn, out, bias=False, device="meta", dtype=torch.bfloat16)
                linear.weight = nn.Parameter(
                    torch.randn(out, inn, device=device, dtype=torch.bfloat16) * 0.02
                )
                setattr(holder, name, linear)
            setattr(layer, part, holder)
        model.layers.append(layer)
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(call, device: torch.device, repeat: int) -> tuple[float, float]:
    """Median seconds of ``call`` over ``repeat`` runs after one warm-up, and the most memory
    above what was allocated before that it needed (GPU; 0 on CPU)."""
    call()
    sync(device)
    seconds = []
    extra = 0.0
    for _ in range(repeat):
        if device.type == "cuda":
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        call()
        sync(device)
        seconds.append(time.perf_counter() - start)
        if device.type == "cuda":
            extra = max(extra, (torch.cuda.max_memory_allocated(device) - before) / GIB)
    return statistics.median(seconds), extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    options = parser.parse_args()
    options.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(options.device)
    torch.manual_seed(0)
    model = build(options.shape, device)
    rows, results = [], {"shape": options.shape, "ratio": options.ratio, "device": str(device)}
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(device)
    # the invariant where TF32 and bfloat16 tensor cores are real: layer 0's matrices with their
    # real SVDs, in float32 (TF32 gradient, IEEE weight projection; the tightest bound) and in
    # bfloat16 (bfloat16 bases), a projected gradient, a random step, the weight projection;
    # residuals against the stored bases within what rounding allows (mt_osft.residual_bound)
    checks = []
    for dtype in (torch.float32, torch.bfloat16):
        layer = copy.deepcopy(model.layers[0]).to(dtype)
        w0 = {name: m.weight.detach().clone() for name, m in layer.named_modules()
              if isinstance(m, nn.Linear)}  # fmt: skip
        state = apply_osft(layer, OSFTConfig(options.ratio, ["re:.*_proj"]))
        with torch.no_grad():
            for target in state.targets.values():
                target.weight.grad = torch.randn_like(target.weight)
            state.project_gradients_()
            for target in state.targets.values():
                target.weight.add_(target.weight.grad, alpha=-1e-3)
                target.weight.grad = None
            state.project_()
        for name, (left, right) in state.residuals().items():
            target = state.targets[name]
            bound = residual_bound(w0[name.removesuffix(".weight")], target.weight,
                                   target.plan.n_frozen, None)  # fmt: skip
            checks.append((f"{name} {str(dtype).removeprefix('torch.')}", max(left, right), bound))
        del state, layer
    results["invariant"] = checks
    for master in (torch.float32, torch.bfloat16):
        model.to(master)
        state = apply_osft(model, OSFTConfig(options.ratio), model_type="llama", decompose=False)
        bases = str(next(iter(state.targets.values())).left.dtype).removeprefix("torch.")
        with torch.no_grad():
            for target in state.targets.values():
                target.ref.copy_(target.weight)
                target.left.normal_()
                target.right.normal_()
                target.weight.grad = torch.randn_like(target.weight)
        kept = sum(t.numel() * t.element_size() for t in state.state_dict().values()) / GIB
        weights = sum(t.weight.numel() for t in state.targets.values())
        for name, call in (("gradients", state.project_gradients_), ("weights", state.project_)):
            seconds, extra = timed(call, device, options.repeat)
            flops = matmul_flops(call)
            used = {"float32": {"gradients": "tf32", "weights": "split tf32"}}.get(bases, {}).get(
                name
            )
            label = f"{name} ({bases} bases{', ' + used if used else ''})"
            rows.append((label, seconds, flops / 1e12, flops / seconds / 1e12, kept, extra))
        results[bases] = {"targets": len(state.targets), "values": weights, "rows": rows[-2:]}
        for target in state.targets.values():
            target.weight.grad = None
        del state
        if device.type == "cuda":
            torch.cuda.empty_cache()
    # one layer, weight projection, per matrix kind
    kinds = []
    for name, module in model.layers[0].named_modules():
        if not isinstance(module, nn.Linear):
            continue
        single = apply_osft(module, OSFTConfig(options.ratio, ["re:"]), decompose=False)
        with torch.no_grad():  # W0 = W and random bases, as above: W stays what it is
            single.targets["weight"].ref.copy_(module.weight)
            single.targets["weight"].left.normal_()
            single.targets["weight"].right.normal_()
        seconds, _ = timed(single.project_, device, options.repeat)
        flops = matmul_flops(single.project_)
        plan = single.targets["weight"].plan
        kinds.append((name.split(".")[-1], plan.shape, plan.left_cols, plan.left_keep,
                      plan.right_cols, plan.right_keep, seconds, flops / seconds / 1e12))  # fmt: skip
    results["kinds"] = kinds
    (options.out / "osft_step_cost.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"{options.shape}, ratio {options.ratio}, {results['bfloat16']['targets']} targets, "
          f"{results['bfloat16']['values'] / 1e9:.2f}B values, {results.get('gpu', device)}")  # fmt: skip
    print(
        "| call (bases, matmul precision) | s per step | TFLOP | TFLOP/s | OSFT state GiB | extra GiB |"
    )
    print("|---|---|---|---|---|---|")
    for name, seconds, tflop, rate, kept, extra in rows:
        print(f"| {name} | {seconds:.3f} | {tflop:.1f} | {rate:.1f} | {kept:.2f} | {extra:.2f} |")
    print("\n| layer 0 matrix (real SVD), dtype | residual | residual_bound | within |")
    print("|---|---|---|---|")
    for name, residual, bound in checks:
        print(f"| {name} | {residual:.2e} | {bound:.2e} | {residual < bound} |")
    print("\n| matrix | shape | left basis | right basis | weight projection s | TFLOP/s |")
    print("|---|---|---|---|---|---|")
    for kind, shape, lc, lk, rc, rk, seconds, rate in kinds:
        side = {True: "trainable", False: "frozen"}
        print(f"| {kind} | {shape[0]}x{shape[1]} | {lc} {side[lk]} | {rc} {side[rk]} | "
              f"{seconds:.4f} | {rate:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
