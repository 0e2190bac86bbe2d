"""The time model behind ``mt check``: the FLOPs of a step's tokens and what changes how long
they take (activation checkpointing's second forward pass, FP8 layers, OSFT's projections),
arithmetic on a :class:`mt_core.plan.memory.ModelShape`."""

from __future__ import annotations

from mt_core.plan.memory import ModelShape


def step_flops(shape: ModelShape, tokens: float, context_sum: float) -> float:
    """Model FLOPs of a step's tokens: 6N per token plus attention, 12·layers·hidden per attended
    position (``context_sum`` is the sum over tokens of the positions each attends to); the
    trainer's MFU counts the same."""
    return 6.0 * shape.matmul_params * tokens + 12.0 * shape.layers * shape.hidden * context_sum


def float8_time_factor(shape: ModelShape, tokens: float, context_sum: float) -> float:
    """The least share of a bfloat16 step's time a step with the key ``float8`` takes: the FP8
    layers' matrix products (their 6 FLOPs per weight and token) at twice bfloat16's rate, the
    rest as before. A bound, not an estimate: the casts and scales around each FP8 product are
    not counted, and they cost most where the products are small."""
    base = step_flops(shape, tokens, context_sum)
    return 1.0 - 3.0 * shape.float8_params * tokens / base if base else 1.0


# The rates of OSFT's projections on one H200 as shares of its bf16 peak (989 TFLOP/s; the 8B
# shape's 224 targets alone, tools/bench/RESULTS.md "OSFT's own work per step"): bfloat16 bases
# and products 0.63 (gradients) and 0.50 (weights: the subtraction from W0 and the casts around
# them), float32 gradients in TF32 0.27; float32 weights multiply in three TF32 products each
# (mt_osft.products), so a third of that; float64 bases (osft_upcast_dtype) at the H200's float64
# tensor-core rate, 67 of 989 TFLOP/s (its datasheet; not measured).
OSFT_RATES = {"bfloat16": (0.63, 0.50), "float32": (0.27, 0.27 / 3), "float64": (0.068, 0.068)}


def osft_step_seconds(shape: ModelShape, master: str, world_size: int, peak_flops: float) -> float:
    """Seconds a step spends in OSFT's two projections on one GPU (the gradients before the
    optimizer step, the weights after it; each of N ranks does 1/N of them), at the measured
    rates of :data:`OSFT_RATES` scaled to the GPU's bf16 peak: a guide, not a bound."""
    if not shape.osft_projection_flops:
        return 0.0
    # the bases' dtype (mt_osft.subspace.basis_dtype) sets what the products run in
    if master == "bfloat16":
        gradient, weight = OSFT_RATES["bfloat16"]
    else:
        gradient, weight = OSFT_RATES["float64" if shape.osft_upcast_bytes == 8 else "float32"]
    flops = shape.osft_projection_flops / world_size
    return (flops / gradient + flops / weight) / peak_flops


def recompute_factor(shape: ModelShape, tokens: float, context_sum: float) -> float:
    """How much more the GPU computes with activation checkpointing: the forward pass again,
    2N per token plus 4·layers·hidden per attended position."""
    base = step_flops(shape, tokens, context_sum)
    extra = 2.0 * shape.matmul_params * tokens + 4.0 * shape.layers * shape.hidden * context_sum
    return (base + extra) / base if base else 1.0
