"""The matrix products of the projections: plain, or float32 ones split into three TF32 products.

A float32 weight's projection must keep float32's accuracy (:func:`mt_osft.residual_bound`
allows (m + n) float32 roundoffs), and IEEE float32 matmuls run at a seventh of the TF32 rate on
an H200 (45 against 268 TFLOP/s in the projections: tools/bench/RESULTS.md). Split products get
about float32's accuracy from TF32 tensor cores: each input is written x = hi + lo + r with hi
and lo TF32 numbers (10-bit mantissas) and |r| <= 2^-22 |x|, and a b becomes
a_hi b_hi + a_hi b_lo + a_lo b_hi. Every input of the three products is a TF32 number, so a
tensor core multiplies them exactly and only its float32 sums round, as IEEE products' do; what
is dropped (a_lo b_lo and the two r) is at most 3 * 2^-22 = 12 float32 roundoffs of each
|a_i| |b_j|, against the k roundoffs of a sum over k terms that IEEE products already have.
The same arithmetic on the CPU (its matmuls are IEEE, and exact on TF32 inputs too) is what the
tests train with.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

__all__ = [
    "MATMUL_PRECISIONS",
    "PLAIN",
    "SPLIT_TF32",
    "Operand",
    "Products",
    "ieee_matmul",
    "matmul_precision",
    "tf32_parts",
]

# a matrix as the products read it: itself, or its TF32 parts (hi, lo) split once for all of its
# products (:meth:`Products.prepare`)
Operand = torch.Tensor | tuple[torch.Tensor, torch.Tensor]

# the precisions matmul_precision accepts: full IEEE float32, or TF32 tensor cores on CUDA
MATMUL_PRECISIONS = ("ieee", "tf32")


@contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    """float32 matmuls in ``precision`` inside, whatever the trainer chose for its own matmuls;
    restored on exit. "ieee": full float32 (no TF32 on CUDA, no reduced precision in oneDNN on
    CPU). "tf32": TF32 tensor cores on CUDA (10-bit mantissas in, float32 sums); the CPU stays
    IEEE."""
    if precision not in MATMUL_PRECISIONS:
        raise ValueError(f"precision must be one of {MATMUL_PRECISIONS}, got {precision!r}")
    wanted = [
        (torch.backends.cuda.matmul, precision),
        (torch.backends.mkldnn.matmul, "ieee"),
    ]
    saved = [backend.fp32_precision for backend, _ in wanted]
    try:
        for (backend, value), before in zip(wanted, saved, strict=True):
            if before != value and not (value == "ieee" and before == "none"):
                backend.fp32_precision = value
        yield
    finally:
        for (backend, _), before in zip(wanted, saved, strict=True):
            if backend.fp32_precision != before:
                backend.fp32_precision = before


def ieee_matmul():
    """Full IEEE float32 matmuls inside: :func:`matmul_precision` ("ieee")."""
    return matmul_precision("ieee")


# a float32's 23 stored mantissa bits, of which TF32 keeps 10: the low 13 go
_DROPPED = 0x1FFF
_HALF = 0x1000


def _to_tf32(x: torch.Tensor) -> torch.Tensor:
    """``x`` (float32) rounded to the nearest TF32 number (ties away from zero)."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + _HALF) & ~_DROPPED).view(torch.float32)


def tf32_parts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo), TF32 numbers with x = hi + lo + r, |r| <= 2^-22 |x| elementwise. Integer bit
    operations and the exact difference x - hi, so compiled code gives the same bits; on CUDA it
    runs traced into the compiled weight projection (mt_osft.state), fused with its
    neighbours."""
    hi = _to_tf32(x)
    return hi, _to_tf32(x - hi)


def _tf32() -> contextlib.AbstractContextManager[None]:
    """TF32 products inside; in a compiled projection, whose caller sets TF32 around the whole
    call (switching a backend flag cannot be traced), nothing."""
    return contextlib.nullcontext() if torch.compiler.is_compiling() else matmul_precision("tf32")


def transposed(x: Operand) -> Operand:
    """The transpose of an operand (of each part: a view, no copy)."""
    return x.T if isinstance(x, torch.Tensor) else (x[0].T, x[1].T)


def columns(x: Operand) -> int:
    return (x if isinstance(x, torch.Tensor) else x[0]).shape[1]


@dataclass(frozen=True)
class Products:
    """How the projections multiply: ``split`` float32 products into three TF32 ones (on CUDA,
    where TF32 tensor cores make that faster), or plain products in the backend's precision.
    Their operands are tensors or, for split products, their parts from :meth:`prepare`."""

    split: bool = False

    def prepare(self, x: torch.Tensor) -> Operand:
        """``x`` as these products read it: split once into its TF32 parts where a projection
        uses it in several products (a basis is used twice), else itself."""
        return tf32_parts(x) if self.split else x

    def _parts(self, x: Operand) -> tuple[torch.Tensor, torch.Tensor]:
        return tf32_parts(x) if isinstance(x, torch.Tensor) else x

    def mm(self, a: Operand, b: Operand, out: torch.Tensor | None = None):
        """a @ b (into ``out``, which may be an input's storage only if it is not read after)."""
        if not self.split:
            return torch.matmul(a, b, out=out)
        (a_hi, a_lo), (b_hi, b_lo) = self._parts(a), self._parts(b)
        with _tf32():
            result = torch.matmul(a_hi, b_hi, out=out)
            return result.addmm_(a_hi, b_lo).addmm_(a_lo, b_hi)

    def sub_mm_(self, x: torch.Tensor, a: Operand, b: Operand) -> torch.Tensor:
        """x -= a @ b, in place."""
        if not self.split:
            return x.addmm_(a, b, alpha=-1.0)
        (a_hi, a_lo), (b_hi, b_lo) = self._parts(a), self._parts(b)
        with _tf32():
            x.addmm_(a_hi, b_hi, alpha=-1.0).addmm_(a_hi, b_lo, alpha=-1.0)
            return x.addmm_(a_lo, b_hi, alpha=-1.0)


PLAIN = Products()
SPLIT_TF32 = Products(split=True)
