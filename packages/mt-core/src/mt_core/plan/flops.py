"""FLOPs and MFU: the figures that both the trainer's metrics line and ``mt check``'s time
estimate use.

MFU counts real tokens only (never padding): FLOPs per token = 6N + 12·layers·hidden·c, where N
is the matmul parameter count and c the mean attended context of the step's tokens (a token at
position t of its document attends to t + 1 tokens).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "PEAK_BF16_FLOPS",
    "attended_context",
    "flops_per_token",
    "peak_flops_of",
    "peak_flops_per_gpu",
]

# Dense bf16 datasheet peaks (FLOP/s) by device-name fragment; MFU is reported against these.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "H800": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
}


def peak_flops_per_gpu(device: torch.device) -> float | None:
    """The datasheet bf16 peak of ``device``; None on CPU or an unknown GPU (no MFU then)."""
    if device.type != "cuda":
        return None
    import torch

    return peak_flops_of(torch.cuda.get_device_name(device))


def peak_flops_of(device_name: str) -> float | None:
    """The datasheet bf16 peak of a GPU of this name (as CUDA reports it); None if unknown."""
    for fragment, peak in PEAK_BF16_FLOPS.items():
        if fragment in device_name:
            return peak
    return None


def attended_context(segment_lengths: np.ndarray) -> float:
    """Mean number of tokens each token attends to, over documents of these lengths."""
    lengths = np.asarray(segment_lengths, dtype=np.float64)
    total = lengths.sum()
    return float((lengths * (lengths + 1) / 2).sum() / total) if total else 0.0


def flops_per_token(matmul_params: int, layers: int, hidden: int, context: float) -> float:
    """Training FLOPs per token: 6N for the weights (forward + backward) plus attention scores
    and their weighted sum, 12·layers·hidden·context."""
    return 6.0 * matmul_params + 12.0 * layers * hidden * context
