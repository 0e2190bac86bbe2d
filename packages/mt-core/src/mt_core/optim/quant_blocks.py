"""The blocks of 8-bit optimizer moments: which values of a parameter share one float32 scale.

Arithmetic on shapes only (no torch): the optimizer (:mod:`mt_core.optim.low_precision`) and the
memory model (:mod:`mt_core.plan.memory`) both use it.
"""

from __future__ import annotations

import math

__all__ = ["QUANT_BLOCK", "QUANT_MIN_BLOCK", "QUANT_MIN_VALUES", "quant_block"]

QUANT_BLOCK = 256  # values sharing one float32 scale in 8-bit moments (mt_core.optim.low_precision)
QUANT_MIN_VALUES = 4096  # smaller tensors keep plain moments (bitsandbytes' rule, as torchao's)
QUANT_MIN_BLOCK = 32  # rows of a length with no larger power-of-two factor: plain moments


def quant_block(shape: tuple[int, ...]) -> int | None:
    """How many values of a parameter of this (whole, unsharded) shape share one scale in its
    8-bit moments, or None: plain moments.

    FSDP2 cuts a parameter between rows (dim 0), so a shard starts and ends at a multiple of the
    row length prod(shape[1:]) on any number of ranks. Blocks that divide the row therefore never
    straddle two shards, and every rank count makes the same blocks: a checkpoint reshards to
    another rank count (DCP cuts the saved moments along rows), and the moments of a shard are
    those of the same rows trained in one process. The block is the largest power of two up to
    :data:`QUANT_BLOCK` that divides the row; the choice depends on the whole shape only, never
    on a rank's shard, so that all rank counts choose alike (torchao's own rule looks at the
    shard). One-dimensional tensors (norms, biases) keep plain moments: their shards end anywhere.
    """
    if len(shape) < 2 or math.prod(shape) < QUANT_MIN_VALUES:
        return None
    block = math.gcd(math.prod(shape[1:]), QUANT_BLOCK)
    return block if block >= QUANT_MIN_BLOCK else None
