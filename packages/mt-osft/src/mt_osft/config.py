"""The OSFT settings, validated where they are made.

Every error names the run-file key a user sets (``osft_unfreeze_rank_ratio``,
``osft_target_patterns``, ``osft_upcast_dtype``, ``osft_output_dtype``), so a trainer can pass its
run file's values straight through and the message still points at the right line.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mt_osft.subspace import MATMUL_PRECISIONS

__all__ = ["OSFTConfig", "parse_dtype"]

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float64": torch.float64,
    "fp64": torch.float64,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(value: torch.dtype | str, key: str = "dtype") -> torch.dtype:
    """A floating torch dtype from a dtype or its name (``"float32"``, ``"bf16"``, ``"torch.float64"``)."""
    if isinstance(value, torch.dtype):
        dtype = value
    elif isinstance(value, str) and value.removeprefix("torch.") in _DTYPES:
        dtype = _DTYPES[value.removeprefix("torch.")]
    else:
        raise ValueError(f"{key}: unknown dtype {value!r}; use one of {sorted(_DTYPES)}")
    if not dtype.is_floating_point:
        raise ValueError(f"{key}: {dtype} is not a floating dtype")
    return dtype


@dataclass(frozen=True)
class OSFTConfig:
    """What OSFT trains and in which precision.

    unfreeze_rank_ratio: fraction R in [0, 1] of each target matrix's rank that trains, smallest
        singular values first. 0.0 freezes every target weight, 1.0 is full fine-tuning.
        Per-layer values (``apply_osft(ratios=...)``) override it.
    target_patterns: module-name patterns choosing the target matrices (see
        :func:`mt_osft.patterns.match_targets`); None takes the default of the model type.
    upcast_dtype: precision of the bases and projections of weights stored in float32 or
        float16 (float32 or float64); bfloat16 weights keep bfloat16 bases
        (:func:`mt_osft.subspace.basis_dtype` says why that keeps the invariant's bound). The
        split itself is computed in float64 (:func:`mt_osft.subspace.decompose`).
    output_dtype: dtype of the target weights in :meth:`OSFTState.dense_state_dict`; None keeps
        each weight's dtype at the time OSFT was applied.
    project_gradients: also project the gradients onto the trainable subspace before the
        optimizer step, so that Adam's moments only see directions that can move. The post-step
        weight projection alone guarantees the invariant; this changes the optimizer's statistics
        (as the paper does) and costs one more projection per step.
    gradient_precision: the matmul precision of the gradient projection: "tf32" (the default;
        TF32 tensor cores on CUDA, float32 inputs rounded to 10-bit mantissas, about 8x the
        IEEE float32 rate; the CPU stays IEEE) or "ieee". It may be cheaper than the weight
        projection because it is not the one that keeps the invariant: what it leaves along the
        frozen directions, a few TF32 roundings of the gradient (which is itself stored in
        bfloat16 or float32), goes into the step and is removed by the exact projection of the
        weights after it.
    reference_on_host: keep each target's original weight W0 in host memory (pinned where
        CUDA is there) instead of beside the weight, and copy it to the weight's device for the
        weight projection, on a side stream one target ahead, so that the next copy overlaps
        this projection. Saves W0's bytes on the GPU (one copy of every projected matrix in the
        weight's dtype: 13 GiB for Llama-3.1-8B in bfloat16) for a host-to-GPU copy of them
        every step. The arithmetic, and so the weights, are the same bit for bit.
    """

    unfreeze_rank_ratio: float
    target_patterns: Sequence[str] | None = None
    upcast_dtype: torch.dtype | str = torch.float32
    output_dtype: torch.dtype | str | None = None
    project_gradients: bool = True
    gradient_precision: str = "tf32"
    reference_on_host: bool = False

    def __post_init__(self) -> None:
        ratio = self.unfreeze_rank_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
            raise ValueError(f"osft_unfreeze_rank_ratio must be a number in [0, 1], got {ratio!r}")
        if not (math.isfinite(ratio) and 0.0 <= ratio <= 1.0):
            raise ValueError(f"osft_unfreeze_rank_ratio must be in [0, 1], got {ratio!r}")
        object.__setattr__(self, "unfreeze_rank_ratio", float(ratio))
        if self.target_patterns is not None:
            object.__setattr__(
                self, "target_patterns", tuple(_check_patterns(self.target_patterns))
            )
        upcast = parse_dtype(self.upcast_dtype, "osft_upcast_dtype")
        if upcast not in (torch.float32, torch.float64):
            raise ValueError(
                f"osft_upcast_dtype must be float32 or float64 (the bases and the projections "
                f"need them), got {upcast}"
            )
        object.__setattr__(self, "upcast_dtype", upcast)
        if self.output_dtype is not None:
            object.__setattr__(
                self, "output_dtype", parse_dtype(self.output_dtype, "osft_output_dtype")
            )
        if self.gradient_precision not in MATMUL_PRECISIONS:
            raise ValueError(
                f"gradient_precision must be one of {', '.join(MATMUL_PRECISIONS)}, got "
                f"{self.gradient_precision!r}"
            )


def _check_patterns(patterns: Sequence[str]) -> list[str]:
    if isinstance(patterns, str):
        raise ValueError(
            f"osft_target_patterns must be a list of patterns, got the string {patterns!r}"
        )
    checked = []
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern.strip():
            raise ValueError(
                f"osft_target_patterns: every pattern must be a non-empty string, got {pattern!r}"
            )
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as error:
                raise ValueError(
                    f"osft_target_patterns: bad regular expression {pattern!r}: {error}"
                ) from None
        checked.append(pattern)
    if not checked:
        raise ValueError(
            "osft_target_patterns is empty; give at least one pattern or leave it unset"
        )
    return checked
