"""MXFP4 (OCP microscaling, 4-bit E2M1 values sharing one power-of-two scale per 32) to and from
dense tensors, as GPT-OSS checkpoints store their expert weights.

A dense ``(..., rows, cols)`` matrix is stored as two uint8 tensors: ``blocks`` of shape
``(..., rows, cols // 32, 16)``, two 4-bit codes per byte (the even column in the low nibble),
and ``scales`` of shape ``(..., rows, cols // 32)``, the biased exponent ``e + 127`` of each
block's scale ``2**e``. Pure tensor work: it runs on any device, and needs no GPU kernel.
"""

from __future__ import annotations

import torch

__all__ = ["BLOCK", "dequantize", "quantize"]

BLOCK = 32  # values per shared scale
# The 16 E2M1 codes: sign bit, two exponent bits, one mantissa bit.
_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_LARGEST = 6.0
_BIAS = 127


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The dense ``(..., rows, cols)`` matrix of MXFP4 ``blocks`` and ``scales``, in ``dtype``."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales are uint8, not {blocks.dtype}/{scales.dtype}")
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BLOCK // 2:
        raise ValueError(
            f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}"
        )
    table = torch.tensor(_VALUES, dtype=torch.float32, device=blocks.device)
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).flatten(-2).long()
    exponents = scales.to(torch.int32) - _BIAS
    values = torch.ldexp(table[codes], exponents.unsqueeze(-1))  # exact: a power of two
    return values.flatten(-2).to(dtype)


def quantize(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 ``(blocks, scales)`` of a ``(..., rows, cols)`` matrix, ``cols`` a multiple of 32.

    Each block's scale is the smallest power of two that fits its largest magnitude within
    E2M1's largest value (6), so nothing saturates, and every value rounds to the nearest code
    (ties to the smaller magnitude): each is off by at most half a step of the E2M1 grid at its
    scale.
    """
    if dense.shape[-1] % BLOCK:
        raise ValueError(f"MXFP4 needs rows of a multiple of {BLOCK} values, not {dense.shape[-1]}")
    values = dense.detach().float().unflatten(-1, (-1, BLOCK))
    largest = values.abs().amax(dim=-1, keepdim=True)
    # the smallest e with largest / 2**e <= 6; a block of zeros (log2 = -inf) the smallest scale
    exponents = torch.ceil(torch.log2(largest / _LARGEST)).clamp(-_BIAS, _BIAS)
    scaled = torch.ldexp(values, -exponents)
    table = torch.tensor(_VALUES[:8], dtype=torch.float32, device=dense.device)
    # the nearest of the 8 magnitudes (argmin takes the first of two equally near)
    magnitude = (scaled.abs().unsqueeze(-1) - table).abs().argmin(dim=-1)
    codes = (magnitude | torch.where(scaled < 0, 8, 0)).to(torch.uint8)
    codes = codes.unflatten(-1, (-1, 2))
    blocks = codes[..., 0] | (codes[..., 1] << 4)
    scales = (exponents.squeeze(-1) + _BIAS).to(torch.uint8)
    return blocks.contiguous(), scales.contiguous()
