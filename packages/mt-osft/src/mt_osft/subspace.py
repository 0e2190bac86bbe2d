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
computed in float64 (:func:`decompose`), so the projector is idempotent to the rounding of the
stored dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mt_osft.products import (
    MATMUL_PRECISIONS,
    PLAIN,
    Operand,
    Products,
    columns,
    ieee_matmul,
    matmul_precision,
    transposed,
)

__all__ = [
    "SubspacePlan",
    "basis_dtype",
    "decompose",
    "MATMUL_PRECISIONS",
    "ieee_matmul",
    "matmul_flops",
    "matmul_precision",
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

    @property
    def projection_flops(self) -> int:
        """FLOPs of the matrix products of one :func:`project` of the whole matrix (2 per
        multiply-add, as :func:`matmul_flops` counts; split TF32 products run three times these).
        Each side costs 4 x (the matrix it acts on) x (its basis's width): two products, one
        into the basis's coordinates and one back (or a subtraction of as many FLOPs). A
        complement side goes first and leaves a thin factor for the other (see :func:`project`)."""
        if not self.projected:
            return 0
        out, inn = self.shape
        left, right = self.left_cols, self.right_cols
        if self.right_keep:  # d V, then the left side on the thin out x right factor
            return 4 * out * inn * right + 4 * out * left * right
        if self.left_keep:  # U^T d, then the right side on the thin left x in factor
            return 4 * out * inn * left + 4 * left * inn * right
        return 4 * out * inn * (left + right)


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


def basis_dtype(weight_dtype: torch.dtype, upcast_dtype: torch.dtype) -> torch.dtype:
    """The dtype a target's bases are stored in, and its projections computed in (float32 sums),
    for weights stored in ``weight_dtype``: bfloat16 for bfloat16 weights, else ``upcast_dtype``.

    Why bfloat16 keeps the invariant's bound. Storing W0 + Π(W - W0) in bfloat16 rounds each
    element by up to u = 2^-8 of its size, and :func:`residual_bound` allows (m + n) u (|W| + |ΔW|)
    along the frozen directions (Frobenius norms). With bases Ũ = U + E rounded to bfloat16 after
    their float64 orthonormalisation (|E| <= u |U|_F = u sqrt(k), k the basis width), one side
    leaves U^T (D - Ũ Ũ^T D) = -(E^T + U^T E U^T) D along the frozen directions, at most
    2 u sqrt(k) |D|; rounding D and the products' outputs to bfloat16 adds about 2 u |D| (what
    rounds D before the products is projected with it). Both sides: (4 sqrt(k) + 4) u |ΔW| at
    most, within the (m + n - 1) u |ΔW| the bound leaves after the storage's share whenever
    m + n >= 18 (k <= (m + n) / 2), i.e. for every real weight. Against float32 bases the stored
    weights differ by about one bfloat16 rounding (tests/test_projection_precision.py). It halves
    the bases' memory and runs the products on bfloat16 tensor cores, twice the TF32 rate.
    Weights stored in float32 (or float16, whose roundoff 2^-11 is finer than the bases' 2^-8)
    keep ``upcast_dtype`` bases and IEEE products."""
    return torch.bfloat16 if weight_dtype == torch.bfloat16 else upcast_dtype


def decompose(
    weight: torch.Tensor, plan: SubspacePlan, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (left, right) bases of ``plan`` for the full matrix ``weight``, in ``dtype``, with
    shapes (out, plan.left_cols) and (in, plan.right_cols).

    In float64 on the weight's device, from the eigendecomposition of the Gram matrix of the rank
    side (W^T W when in <= out): its eigenvectors, by descending eigenvalue, are W's right
    singular vectors; the frozen left ones span W V_hi (orthonormalised by QR), and a trainable
    left complement is the rest of that QR's complete basis. On an H200 this is 6-9x faster than
    a float32 SVD (0.16 vs 1.0 s for 4096x4096, 0.12 vs 0.88 s for 14336x4096) and splits the
    matrix to float64's rounding (|U_hi^T W V_lo| / |W| about 1e-15 against 1e-5 to 1e-6 for the
    float32 SVD: tools/gpu/svd_startup.py). Squaring the singular values loses only those below
    1e-8 of the largest, which no split of a trained weight falls between.
    """
    if tuple(weight.shape) != plan.shape:
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match plan {plan.shape}")
    if weight.device.type == "meta":
        raise ValueError("cannot decompose a weight on the meta device; materialise it first")
    tall = plan.shape[0] >= plan.shape[1]  # then the right side (in) is the rank side
    a = weight.detach().to(torch.float64)
    a = a if tall else a.T
    rank_keep, other_keep = (
        (plan.right_keep, plan.left_keep) if tall else (plan.left_keep, plan.right_keep)
    )
    k = plan.n_frozen
    with ieee_matmul():
        _, vectors = torch.linalg.eigh(a.T @ a)
        vectors = vectors.flip(-1)  # eigh sorts ascending: the top singular directions first
        rank_side = vectors[:, k:] if rank_keep else vectors[:, :k]
        mode = "complete" if other_keep else "reduced"
        image = torch.linalg.qr(a @ vectors[:, :k], mode=mode)[0]
        other_side = image[:, k:] if other_keep else image
    rank_side, other_side = rank_side.to(dtype).contiguous(), other_side.to(dtype).contiguous()
    return (other_side, rank_side) if tall else (rank_side, other_side)


def project(
    d: torch.Tensor,
    left: torch.Tensor,
    left_keep: bool,
    right: torch.Tensor,
    right_keep: bool,
    group: dist.ProcessGroup | None = None,
    products: Products = PLAIN,
) -> torch.Tensor:
    """Π(d) = L d R: ``d`` with its components along the frozen directions removed. ``d`` may be
    overwritten; the result is returned. ``products``: how it multiplies
    (:mod:`mt_osft.products`: plain, or float32 products split into three TF32 ones).

    L = I - U U^T for a frozen basis U (``left_keep=False``), U U^T for a basis of the trainable
    complement (``left_keep=True``); R likewise from ``right``. The two sides commute, so the
    order is free, and a complement side is applied first: it leaves a thin factor (``d V`` of
    width t = n_train), on which the other side costs t/in (or t/out) of what it costs on ``d``.
    Llama-3.1-8B at ratio 0.25: 2.3x fewer FLOPs than both sides on the whole matrix.

    ``group``: ``d`` is this rank's block of rows of the matrix, ``left`` the same rows of the
    left basis, ``right`` the whole right basis. Products summed over rows (``left^T x``) are
    all-reduced; a product every rank would otherwise repeat (the right side on the thin
    ``left^T d``) is split by rows over the group, its parts reduce-scattered in and all-gathered
    out. Each of N ranks then does 1/N of the arithmetic of one process.
    """
    mm = products.mm
    # each basis takes part in two products: split into TF32 parts once for both
    left, right = products.prepare(left), products.prepare(right)
    if right_keep:  # d R = (d V) V^T: row-local; then L on the thin factor d V
        thin = _left_side(mm(d, right), left, left_keep, group, products)
        return mm(thin, transposed(right), out=d)
    if left_keep:  # L d = U (U^T d); then R on the thin factor U^T d (t x in)
        thin = mm(transposed(left), d)
        if group is None:
            thin = _right_side(thin, right, right_keep, products)
        else:
            thin = _right_side_split(thin, right, group, products)
        return mm(left, thin, out=d)
    return _right_side(_left_side(d, left, False, group, products), right, False, products)


def _left_side(
    x: torch.Tensor,
    left: Operand,
    keep: bool,
    group: dist.ProcessGroup | None,
    products: Products,
) -> torch.Tensor:
    """L x for ``x`` with the rows of ``left`` (a block of them under ``group``)."""
    if not keep and columns(left) == 0:
        return x
    coeff = products.mm(transposed(left), x)
    if group is not None:
        dist.all_reduce(coeff, group=group)
    return products.mm(left, coeff) if keep else products.sub_mm_(x, left, coeff)


def _right_side(x: torch.Tensor, right: Operand, keep: bool, products: Products) -> torch.Tensor:
    """x R for the whole right basis."""
    if not keep and columns(right) == 0:
        return x
    coeff = products.mm(x, right)
    if keep:
        return products.mm(coeff, transposed(right))
    return products.sub_mm_(x, coeff, transposed(right))


def _right_side_split(
    partial: torch.Tensor, right: Operand, group: dist.ProcessGroup, products: Products
) -> torch.Tensor:
    """(sum over ranks of ``partial``) R for a frozen right basis, each rank computing R on its
    share of the rows: the sum is reduce-scattered (rows padded to a multiple of the group's
    size), each part projected, the parts all-gathered. The same communication as one
    all-reduce of ``partial``."""
    size = dist.get_world_size(group)
    rows = partial.shape[0]
    share = -(-rows // size)
    padded = partial.new_zeros(share * size, partial.shape[1])
    padded[:rows] = partial
    mine = partial.new_empty(share, partial.shape[1])
    dist.reduce_scatter_tensor(mine, padded, group=group)
    mine = _right_side(mine, right, False, products)
    dist.all_gather_into_tensor(padded, mine, group=group)
    return padded[:rows]


def matmul_flops(call: Callable[[], object]) -> int:
    """The FLOPs of the matrix products that ``call()`` runs, by torch's FlopCounterMode, which
    does not know the in-place ``addmm_`` the projections use: it is counted here as 2 m k n."""
    from torch.utils.flop_counter import FlopCounterMode

    def addmm_inplace(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]

    with FlopCounterMode(
        display=False, custom_mapping={torch.ops.aten.addmm_: addmm_inplace}
    ) as counter:
        call()
    return counter.get_total_flops()


def residual_bound(
    w0: torch.Tensor,
    weight: torch.Tensor,
    n_frozen: int,
    svd_dtype: torch.dtype | None,
    singular_values: torch.Tensor | None = None,
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
    ``singular_values``: ``w0``'s, where the caller already has them (a check of many weights
    after several runs from one W0 need not take an SVD of each W0 again for every run).
    """
    stored_roundoff = torch.finfo(weight.dtype).eps / 2
    w0, weight = w0.detach().to(torch.float64), weight.detach().to(torch.float64)
    m, n = w0.shape
    delta = float((weight - w0).norm())
    if delta == 0.0:
        return 0.0
    relative = stored_roundoff * (float(weight.norm()) / delta + 1.0)
    if svd_dtype is not None:
        s = torch.linalg.svdvals(w0) if singular_values is None else singular_values.double()
        gap = float(s[n_frozen - 1] - (s[n_frozen] if n_frozen < len(s) else 0.0))
        relative += torch.finfo(svd_dtype).eps / 2 * float(s[0]) / gap
    return (m + n) * relative
