"""The compiled weight projection of float32 weights against the eager one, on the GPU (issue #27).

On GPUs a float32 weight's projection after each optimizer step is one compiled call per target
(``mt_osft.state._compiled_weight_projection``). The CPU tests show it gives the eager
projection's bits; this script checks the same on CUDA, for the target shapes of a model with
ratio 0.25: for each, the largest difference in float32 units in the last place (ulps) between
the two results, the residual each leaves in the frozen subspace (float64, relative to the
weight's change) against ``mt_osft.residual_bound``, and the milliseconds per call of each
(median of --repeat, synchronised: osft_step_cost.timed).

    python3 tools/gpu/osft_projection_bits.py                      # Llama-3.2-1B's four shapes
    uv run python tools/gpu/osft_projection_bits.py --device cpu   # a dry run, small shapes
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
from osft_step_cost import timed  # tools/gpu, the script's own folder

from mt_osft import state
from mt_osft.products import SPLIT_TF32, ieee_matmul, matmul_precision
from mt_osft.subspace import decompose, plan_subspace, residual_bound

SHAPES = {  # (out, in) of q/o, k/v, gate/up and down
    "llama-3.2-1b": [(2048, 2048), (512, 2048), (8192, 2048), (2048, 8192)],
    "tiny": [(64, 64), (16, 64), (256, 64), (64, 256)],
}


def frozen_residual(weight, w0, left, right, plan) -> float:
    """How much of the weight's change lies in the frozen subspace, relative to the change, on
    the worse side (float64, as ``OSFTState.residuals`` measures it)."""
    change, left, right = (t.double() for t in (weight - w0, left, right))
    return max(state.frozen_residuals(change, left, plan.left_keep, right, plan.right_keep))


def project(weight, args, compiled=None, copy: bool = False) -> torch.Tensor:
    """The eager projection (IEEE float32 products: the reference) or the compiled one (split
    TF32, as training runs it) of ``weight`` in place, or of a copy."""
    weight = weight.clone() if copy else weight
    if compiled is None:
        with ieee_matmul():
            state._weight_projection(weight, *args)
    else:
        with matmul_precision("tf32"):
            compiled(weight, *args)
    return weight


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="default: 1B on CUDA, else tiny")
    parser.add_argument("--ratio", type=float, default=0.25, help="osft_unfreeze_rank_ratio")
    parser.add_argument("--repeat", type=int, default=20, help="timed calls per variant")
    options = parser.parse_args()
    device = options.device
    shape_name = options.shape or ("llama-3.2-1b" if device == "cuda" else "tiny")
    compiled = state._compiled_weight_projection()
    torch.manual_seed(0)
    print("| shape | stored sides (left, right) | max ulps compiled vs eager | residual eager "
          "| residual compiled | bound | ms eager | ms compiled |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for shape in SHAPES[shape_name]:
        w0 = torch.randn(*shape, device=device) / shape[1] ** 0.5
        plan = plan_subspace(shape, int(options.ratio * min(shape)))
        left, right = decompose(w0, plan)
        moved = w0 + 1e-3 * torch.randn(*shape, device=device) / shape[1] ** 0.5
        args = (w0, left, plan.left_keep, right, plan.right_keep, None, SPLIT_TF32)

        a, b = (project(moved.clone(), args, variant) for variant in (None, compiled))
        ulps = (a.view(torch.int32).long() - b.view(torch.int32).long()).abs().max().item()
        bound = residual_bound(w0, b, plan.n_frozen, None)
        # the compiled variant compiled above; timed() warms each up once more
        times = [1e3 * timed(partial(project, moved, args, variant, copy=True),
                             torch.device(device), options.repeat)[0]
                 for variant in (None, compiled)]  # fmt: skip
        print(f"| {shape[0]}x{shape[1]} | {plan.left_keep}, {plan.right_keep} | {ulps} | "
              f"{frozen_residual(a, w0, left, right, plan):.2e} | "
              f"{frozen_residual(b, w0, left, right, plan):.2e} | {bound:.2e} | "
              f"{times[0]:.3f} | {times[1]:.3f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
