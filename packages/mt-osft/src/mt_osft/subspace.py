"""The per-matrix mathematics: how many directions train, the SVD split, and the projection.

For a weight W (out x in) of rank r = min(out, in) with SVD W = U S V^T, the k = r - t top singular
directions are frozen and t train. The matrices D that leave them alone,
``{D : U_hi^T D = 0 and D V_hi = 0}``, are exactly the image of the projection

    Π(D) = (I - U_hi U_hi^T) D (I - V_hi V_hi^T),

and that is all this module computes. Each side is stored as the thinner of two equivalent bases:
the frozen vectors U_hi (``keep=False``: subtract their span) or, where that side's dimension equals
the rank so the thin SVD yields the whole complement, the trainable vectors U_lo (``keep=True``:
keep only their span), since I - U_hi U_hi^T = U_lo U_lo^T there. For R < 0.5 the complement is
the smaller one (t < k), which halves the memory and the flops of the projection. The bases are
re-orthonormalised in float64 after the SVD, so the projector is idempotent to the rounding of the
stored dtype rather than to the SVD's orthogonality error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

__all__ = [
    "SubspacePlan",
    "decompose",
    "ieee_matmul",
    "plan_subspace",
    "project",
    "residual_bound",
    "trainable_rank",
]


def trainable_rank(rank: int, ratio: float) -> int:
    """Trainable directions of a rank-``rank`` matrix at unfreeze ratio ``ratio``:
    ``floor(ratio * rank + 0.5)``, i.e. rounded to the nearest integer, halves up."""
    return min(rank, max(0, math.floor(ratio * rank + 0.5)))


@dataclass(frozen=True)
class SubspacePlan:
    """The shape of one target's split, known before any SVD (every rank can compute it).

    ``left_cols`` / ``right_cols`` are the widths of the stored bases; ``left_keep`` /
    ``right_keep`` say whether they span the trainable complement (True) or the frozen top
    directions (False).
    """

    shape: tuple[int, int]
    rank: int
    n_train: int
    left_cols: int
    left_keep: bool
    right_cols: int
    right_keep: bool

    @property
    def n_frozen(self) -> int:
        return self.rank - self.n_train

    @property
    def projected(self) -> bool:
        """Whether this target needs bases and projections (some but not all directions train)."""
        return 0 < self.n_train < self.rank

    @property
    def trainable_elements(self) -> int:
        """Dimension of the trainable matrix subspace: (out - k) (in - k) for k frozen directions."""
        out, inn = self.shape
        return (out - self.n_frozen) * (inn - self.n_frozen)


def plan_subspace(shape: tuple[int, int], n_train: int) -> SubspacePlan:
    """How a matrix of ``shape`` with ``n_train`` trainable directions is stored."""
    out, inn = shape
    rank = min(out, inn)
    if not 0 <= n_train <= rank:
        raise ValueError(f"n_train must be in [0, {rank}] for a {out}x{inn} matrix, got {n_train}")
    frozen = rank - n_train
    # The thin SVD spans the whole of a side only where that side's dimension is the rank.
    left_keep = out == rank and n_train < frozen
    right_keep = inn == rank and n_train < frozen
    return SubspacePlan(
        shape=(out, inn),
        rank=rank,
        n_train=n_train,
        left_cols=n_train if left_keep else frozen,
        left_keep=left_keep,
        right_cols=n_train if right_keep else frozen,
        right_keep=right_keep,
    )


@contextmanager
def ieee_matmul() -> Iterator[None]:
    """Full float32 matmuls inside (no TF32 on CUDA, no reduced precision in oneDNN on CPU),
    whatever the trainer chose for its own matmuls; restored on exit."""
    backends = [torch.backends.cuda.matmul, torch.backends.mkldnn.matmul]
    saved = [backend.fp32_precision for backend in backends]
    try:
        for backend, value in zip(backends, saved, strict=True):
            if value not in ("ieee", "none"):
                backend.fp32_precision = "ieee"
        yield
    finally:
        for backend, value in zip(backends, saved, strict=True):
            if backend.fp32_precision != value:
                backend.fp32_precision = value


def _orthonormal(basis: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An orthonormal basis of the same column space, computed in float64."""
    if basis.shape[1] == 0:
        return basis.to(dtype).contiguous()
    q, _ = torch.linalg.qr(basis.to(torch.float64), mode="reduced")
    return q.to(dtype).contiguous()


def decompose(
    weight: torch.Tensor, plan: SubspacePlan, upcast_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (left, right) bases of ``plan`` from the SVD of the full matrix ``weight``.

    The SVD runs in ``upcast_dtype`` on the weight's device; the bases are returned in
    ``upcast_dtype`` with shapes (out, plan.left_cols) and (in, plan.right_cols).
    """
    if tuple(weight.shape) != plan.shape:
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match plan {plan.shape}")
    if weight.device.type == "meta":
        raise ValueError("cannot decompose a weight on the meta device; materialise it first")
    k = plan.n_frozen
    with ieee_matmul():
        u, _, vh = torch.linalg.svd(weight.detach().to(upcast_dtype), full_matrices=False)
        left = u[:, k:] if plan.left_keep else u[:, :k]
        right = vh[k:].T if plan.right_keep else vh[:k].T
        return _orthonormal(left, upcast_dtype), _orthonormal(right, upcast_dtype)


def project(
    d: torch.Tensor,
    left: torch.Tensor,
    left_keep: bool,
    right: torch.Tensor,
    right_keep: bool,
    reduce: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Π(d): ``d`` with its components along the frozen directions removed. ``d`` is overwritten.

    ``d`` may be a block of rows of the matrix, with ``left`` the same rows of the left basis and
    ``right`` the whole right basis; ``reduce`` then sums the partial products ``left^T d`` (k x in)
    over the blocks in place (an all-reduce), which is all a row-sharded projection needs.
    """
    if left_keep or left.shape[1]:
        coeff = left.T @ d
        if reduce is not None:
            reduce(coeff)
        d = left @ coeff if left_keep else d.addmm_(left, coeff, alpha=-1.0)
    if right_keep or right.shape[1]:
        coeff = d @ right
        d = coeff @ right.T if right_keep else d.addmm_(coeff, right.T, alpha=-1.0)
    return d


def residual_bound(
    w0: torch.Tensor, weight: torch.Tensor, n_frozen: int, svd_dtype: torch.dtype | None
) -> float:
    """The largest residual ``|U_hi^T ΔW|_F / |ΔW|_F`` (or ``|ΔW V_hi|_F / |ΔW|_F``) that rounding
    alone allows for a weight kept in the frozen subspace of ``w0``'s top ``n_frozen`` directions.

    Two sources, each at most (m + n) unit roundoffs (the projection's products sum over m and n
    terms; LAPACK's SVD is backward stable to the same order):

    * storing W = W0 + Π(W - W0) in ``weight.dtype`` rounds each element, and the rounding has
      components along the frozen directions: ``u_w (|W|_F / |ΔW|_F + 1)``;
    * when the residual is measured against an exact SVD of W0 rather than the bases the
      projection used, those bases (from an SVD in ``svd_dtype``) are tilted from the exact ones by
      up to ``u_svd |W0|_2 / gap`` (Wedin), gap = σ_k - σ_{k+1}: small gaps make it large.

    ``svd_dtype=None``: measured against the projection's own bases (``OSFTState.residuals()``).
    """
    stored_roundoff = torch.finfo(weight.dtype).eps / 2
    w0, weight = w0.detach().to(torch.float64), weight.detach().to(torch.float64)
    m, n = w0.shape
    delta = float((weight - w0).norm())
    if delta == 0.0:
        return 0.0
    relative = stored_roundoff * (float(weight.norm()) / delta + 1.0)
    if svd_dtype is not None:
        s = torch.linalg.svdvals(w0)
        gap = float(s[n_frozen - 1] - (s[n_frozen] if n_frozen < len(s) else 0.0))
        relative += torch.finfo(svd_dtype).eps / 2 * float(s[0]) / gap
    return (m + n) * relative
