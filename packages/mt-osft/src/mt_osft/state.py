"""Keeping OSFT's invariant through training: the targets' frozen data and the per-step
projections (:mod:`mt_osft.apply` makes them: :func:`mt_osft.apply_osft`).

Design: the weight stays one dense parameter; each update is projected back after the step.

Every target keeps its ordinary ``weight`` parameter (same name, shape, dtype; the forward pass is
untouched) and OSFT holds, outside the module tree, the original weight ``ref = W0`` and thin bases
of the frozen singular directions (see :mod:`mt_osft.subspace`). After every optimizer step
:meth:`OSFTState.project_` sets

    W <- W0 + Π(W - W0),    Π(D) = (I - U_hi U_hi^T) D (I - V_hi V_hi^T).

Why this guarantees the invariant: whatever the step did (Adam's per-element scaling, momentum,
weight decay, clipping), the total change after the projection is ΔW = Π(D) for some D, and
U_hi^T Π(D) = 0, Π(D) V_hi = 0 hold for every D because U_hi^T (I - U_hi U_hi^T) = 0. The reference
is W0 itself, bitwise, so the projection never depends on how accurately U S V^T reconstructs W0;
the only errors are the float rounding of one projection and of storing W, which do not accumulate
(each step re-projects the whole change from W0, removing the previous step's rounding too).

It is the same trajectory as the reparametrisation W = W_frozen + W_train with W_train projected
after each step (``W_train <- Π(W_train)``): the gradients are equal, and AdamW's weight decay of the
frozen part, ``-lr wd W_frozen``, is removed by Π because Π(W_frozen) = 0, so decay acts on the
trainable part only and pulls it towards 0, which lies in the trainable subspace. But the single
parameter costs less: no second dense parameter to all-gather in every FSDP forward and backward,
no extra add in the forward, the state dict keeps the original names (the dense weights *are* the
parameters, so saving needs no reconstruction), and ratio 1.0 (no projection at all) is full
fine-tuning exactly. Trainable low-rank factors (mini_trainer's parametrisation) would save optimizer
memory at small ratios but change the optimisation (ratio 1.0 is then not full fine-tuning) and
rebuild every dense weight in every forward.

Projecting the gradients first (:meth:`OSFTState.project_gradients_`, between backward and the step)
keeps Adam's moments in the trainable subspace; it does not by itself keep the weights there,
because Adam divides each element by its own second moment.

Which projection must be exact: only the weight projection, which keeps float32's accuracy (or
float64's) whatever the trainer's matmul setting: IEEE products, or on CUDA each float32 product
as three TF32 ones (:mod:`mt_osft.products`: within a dozen float32 roundoffs more; the whole
projection of a target one compiled call there, the same bits as eager), except for
bfloat16 weights, whose own storage
rounding (2^-8) dominates: their bases are stored in bfloat16 and the products run on bfloat16
tensor cores with float32 sums (:func:`mt_osft.subspace.basis_dtype` derives why the bound of the
invariant stays the same). The gradient projection runs in ``OSFTConfig.gradient_precision`` (TF32
on CUDA by default, about 5x the IEEE rate on an H200) or in the bfloat16 bases: what its rounding
leaves along the frozen directions goes into the step and is removed by the weight projection
after it, so the invariant is as strong as with an exact gradient projection
(tests/test_projection_precision.py trains with an emulated TF32 one).

Ratio 0 for a matrix freezes its weight (``requires_grad=False``): it never changes, bitwise.
Ratio 1 leaves it alone: full fine-tuning. Parameters that no pattern targets are not touched.

Memory per projected target (out x in, k frozen of rank r, t = r - k trainable): W0 in the weight's
dtype (out·in) plus the bases in their dtype (bfloat16 for bfloat16 weights, else ``upcast_dtype``),
``out·min(k, t)`` or ``out·k`` and likewise for ``in``; optimizer state and gradients are those of
full fine-tuning.

Sharding (FSDP2): call :func:`mt_osft.apply_osft` after ``fully_shard``. A target whose weight is a DTensor
sharded on dim 0 gets W0 and the left basis sharded the same way (each rank holds its rows) and the
right basis sharded on its rows too; the projection works on the local rows, all-reduces the
``U^T D`` product (basis width x in) and all-gathers the right basis one matrix at a time. The SVDs are spread over the
ranks (matrix i on rank i mod world size), each rank holding its shard plus the one full matrix it
decomposes, and each basis is scattered from its owner. Under FSDP2's CPU offload W0 and the
bases wait in host memory beside the shards, and the projections still run on the GPU
(:mod:`mt_osft.placement`).

Checkpoints: W0 and the bases are not in ``model.state_dict()``; :meth:`OSFTState.state_dict` holds
them (DTensors when sharded, so ``torch.distributed.checkpoint`` saves one shard per rank). To resume
exactly, save it with the model and optimizer, rebuild with ``apply_osft(..., ratios=state.ratios,
decompose=False)`` (allocates the same shapes, no SVD) and load into it. Recomputing instead (W0 from
the base model, SVD again) gives the same W0 bitwise and the same bases on the same hardware and
torch version, but LAPACK/cuSOLVER results may differ in the last bits elsewhere.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from mt_osft.config import OSFTConfig
from mt_osft.placement import compute_device, gathered, local_part, staged, whole
from mt_osft.products import PLAIN, SPLIT_TF32, Products
from mt_osft.subspace import (
    SubspacePlan,
    ieee_matmul,
    matmul_precision,
    project,
)

__all__ = ["OSFTState", "OSFTTarget"]

_SUFFIXES = ("osft_ref", "osft_left", "osft_right")


@dataclass
class OSFTTarget:
    """One target matrix: where it lives, how it is split, and its frozen data.

    ``ref`` (W0), ``left`` and ``right`` are None unless ``plan.projected``. They are plain
    tensors, or DTensors with the weight's mesh when the weight is sharded.
    """

    name: str  # parameter name, the key in model.state_dict(): "model.layers.0.mlp.up_proj.weight"
    module: nn.Module
    ratio: float
    plan: SubspacePlan
    dtype: torch.dtype  # the weight's dtype when OSFT was applied
    ref: torch.Tensor | None = None
    left: torch.Tensor | None = None
    right: torch.Tensor | None = None

    @property
    def weight(self) -> nn.Parameter:
        # Looked up each time: fully_shard replaces the module's parameter objects.
        return self.module.weight


class OSFTState:
    """The handle :func:`apply_osft` returns: the targets and the per-step operations."""

    def __init__(
        self, config: OSFTConfig, targets: list[OSFTTarget], svd_seconds: float = 0.0
    ) -> None:
        self.config = config
        self.targets: dict[str, OSFTTarget] = {target.name: target for target in targets}
        self.svd_seconds = svd_seconds  # this rank's time in SVDs (for the log)

    def __repr__(self) -> str:
        projected = sum(t.plan.projected for t in self.targets.values())
        frozen = sum(t.plan.n_train == 0 for t in self.targets.values())
        return (
            f"OSFTState({len(self.targets)} targets: {projected} projected, {frozen} frozen, "
            f"{len(self.targets) - projected - frozen} fully trainable)"
        )

    @property
    def ratios(self) -> dict[str, float]:
        """The unfreeze ratio of every target (parameter name -> ratio), for logs and for
        rebuilding the same shapes on resume (``apply_osft(ratios=state.ratios)``)."""
        return {name: target.ratio for name, target in self.targets.items()}

    def summary(self) -> list[dict]:
        """One JSON-able row per target: name, shape, rank, trainable and frozen directions."""
        return [
            {
                "name": t.name,
                "shape": list(t.plan.shape),
                "rank": t.plan.rank,
                "ratio": t.ratio,
                "n_train": t.plan.n_train,
                "n_frozen": t.plan.n_frozen,
            }
            for t in self.targets.values()
        ]

    def trainable_parameter_count(self, model: nn.Module) -> int:
        """Degrees of freedom that train: every trainable parameter's elements, with a projected
        target counted as its trainable subspace, (out - k) (in - k), rather than out x in."""
        count = 0
        seen: set[int] = set()
        by_param = {id(t.weight): t for t in self.targets.values()}
        for param in model.parameters():
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            target = by_param.get(id(param))
            count += target.plan.trainable_elements if target is not None else param.numel()
        return count

    # ---- the training step ----------------------------------------------------------------

    @torch.no_grad()
    def project_(self) -> None:
        """W <- W0 + Π(W - W0) for every projected target. Call after ``optimizer.step()``.

        Under sharding every rank must call it (it communicates). The products run in the
        bases' dtype (:func:`mt_osft.subspace.basis_dtype`): IEEE float32 (or float64), or
        bfloat16 for bfloat16 weights, whose own rounding the invariant's bound already covers."""
        projected = [t for t in self.targets.values() if t.plan.projected]
        with ieee_matmul():
            for target, parts in _staged(projected, lambda t: (t.weight, t.ref, t.left, t.right)):
                self._project_weight(target, *parts)

    @torch.no_grad()
    def project_gradients_(self) -> None:
        """grad <- Π(grad) for every projected target that has a gradient. Call between the
        backward pass and gradient clipping / ``optimizer.step()``. Does nothing when
        ``config.project_gradients`` is False, so a trainer may call it unconditionally. Under
        sharding every rank must call it."""
        if not self.config.project_gradients:
            return
        targets = [t for t in self.targets.values()
                   if t.plan.projected and t.weight.grad is not None]  # fmt: skip
        with matmul_precision(self.config.gradient_precision):
            for target, parts in _staged(targets, lambda t: (t.weight.grad, t.left, t.right)):
                self._project_gradient(target, *parts)

    def _project_weight(
        self, target: OSFTTarget, weight: torch.Tensor, ref: torch.Tensor, left: torch.Tensor,
        right: torch.Tensor,
    ) -> None:  # fmt: skip
        """W <- W0 + Π(W - W0) on this rank's rows, from their copies on the projection's device
        (mt_osft.placement.staged)."""
        right, group = self._right_basis(target, right)
        plan = target.plan
        args = (weight, ref, left, plan.left_keep, right, plan.right_keep, group)
        # float32 on CUDA: three TF32 products per product, float32's accuracy at 2-3x the IEEE
        # rate (mt_osft.products); bfloat16 and float64 bases multiply as they are
        if left.dtype == torch.float32 and weight.is_cuda:
            with matmul_precision("tf32"):  # for the whole call: a compiled graph cannot switch
                _compiled_weight_projection()(*args, SPLIT_TF32)
        else:
            _weight_projection(*args, PLAIN)
        _write_back(weight, target.weight)

    def _project_gradient(
        self, target: OSFTTarget, grad: torch.Tensor, left: torch.Tensor, right: torch.Tensor
    ) -> None:
        right, group = self._right_basis(target, right)
        plan = target.plan
        # in place where the gradient is already in the bases' dtype (bfloat16 gradients)
        projected = project(grad.to(left.dtype), left, plan.left_keep, right, plan.right_keep,
                            group)  # fmt: skip
        _write_back(projected, target.weight.grad)

    @staticmethod
    def _right_basis(
        target: OSFTTarget, right: torch.Tensor
    ) -> tuple[torch.Tensor, dist.ProcessGroup | None]:
        """(right, group) as :func:`mt_osft.subspace.project` takes them on this rank, from this
        rank's rows of the right basis: the whole basis, and the group that shares the rows
        (None where one rank holds all of them: no collective, each would be a launch and a
        copy)."""
        if isinstance(target.left, DTensor):
            group = shard_group(target.left)
            if dist.get_world_size(group) == 1:
                return right, None
            return whole(right, target.right), group
        if isinstance(target.weight, DTensor):
            raise RuntimeError(
                f"{target.name} is sharded but its OSFT state is not: call apply_osft after "
                f"fully_shard, not before"
            )
        return right, None

    # ---- measuring ------------------------------------------------------------------------

    @torch.no_grad()
    def residuals(
        self, original: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, tuple[float, float]]:
        """The invariant, measured: for each projected target, ``(|U_hi^T ΔW|_F, |ΔW V_hi|_F) /
        |ΔW|_F`` with ΔW = W - W0 in float64 (0.0 when ΔW = 0). W0 is the stored reference, or
        ``original[name]`` (full tensors) for the targets named there. Under sharding every rank
        must call it (it gathers the weights)."""
        results = {}
        for name, target in self.targets.items():
            if not target.plan.projected or (original is not None and name not in original):
                continue
            weight = gathered(target.weight).to(torch.float64)
            w0 = gathered(target.ref) if original is None else original[name]
            delta = weight - w0.to(weight.device, torch.float64)
            left = gathered(target.left).to(weight.device, torch.float64)
            right = gathered(target.right).to(weight.device, torch.float64)
            results[name] = frozen_residuals(delta, left, target.plan.left_keep, right,
                                             target.plan.right_keep)  # fmt: skip
        return results

    # ---- saving and resuming --------------------------------------------------------------

    def cast_for_saving(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``state_dict`` with every target weight cast to ``output_dtype`` (default: the dtype
        the weight had when OSFT was applied); other entries unchanged. Use it on a state dict
        gathered by the caller (e.g. ``get_model_state_dict(full_state_dict=True)``)."""
        result = dict(state_dict)
        for name, target in self.targets.items():
            if name in result:
                result[name] = result[name].to(self.config.output_dtype or target.dtype)
        return result

    def dense_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's state dict under its original names, every target as its dense W in
        ``output_dtype``: it loads into the unmodified architecture. Sharded entries are gathered
        (every rank must call it then). Entries may share memory with the live parameters."""
        state = {key: gathered(value) for key, value in model.state_dict().items()}
        return self.cast_for_saving(state)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """W0 and the bases of every projected target, keyed ``<param name>.osft_ref`` /
        ``.osft_left`` / ``.osft_right``. The tensors are the live ones (DTensors when sharded),
        so ``torch.distributed.checkpoint.load`` can fill them in place."""
        state = {}
        for name, target in self.targets.items():
            if target.plan.projected:
                for suffix, tensor in zip(
                    _SUFFIXES, (target.ref, target.left, target.right), strict=True
                ):
                    state[f"{name}.{suffix}"] = tensor
        return state

    @torch.no_grad()
    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Copy a :meth:`state_dict` into this state (built with the same ratios, e.g. by
        ``apply_osft(..., decompose=False)``). Full tensors load into sharded ones too."""
        own = self.state_dict()
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        if missing or unexpected:
            raise KeyError(
                f"OSFT state mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        for key, tensor in own.items():
            source = state_dict[key]
            if tuple(source.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"OSFT state {key}: shape {tuple(source.shape)} != {tuple(tensor.shape)} "
                    f"(were the same ratios used?)"
                )
            if not isinstance(tensor, DTensor):
                tensor.copy_(source)
                continue
            if not isinstance(source, DTensor):
                # Every rank holds the full tensor: each keeps its own shard, no communication.
                mesh, placements = tensor.device_mesh, tensor.placements
                source = distribute_tensor(
                    source.to(mesh.device_type), mesh, placements, src_data_rank=None
                )
            # (shard by shard: W0 may wait in host memory while its mesh is on the GPUs)
            tensor.to_local().copy_(source.to_local())


def frozen_residuals(
    delta: torch.Tensor, left: torch.Tensor, left_keep: bool, right: torch.Tensor, right_keep: bool
) -> tuple[float, float]:
    """``(|U_hi^T D|_F, |D V_hi|_F) / |D|_F`` for a weight's change D (0.0 when D = 0), in the
    dtype given; ``left``/``right`` hold the frozen side's basis, or with ``*_keep`` the
    trainable side's (the complement), as a target stores them."""
    norm = float(delta.norm())
    if norm == 0.0:
        return 0.0, 0.0
    left_part = left.T @ delta
    right_part = delta @ right
    # With a complement basis, |U_hi^T D| = |D - U_lo U_lo^T D| (U_hi, U_lo span R^out).
    if left_keep:
        left_part = delta - left @ left_part
    if right_keep:
        right_part = delta - right_part @ right.T
    return float(left_part.norm()) / norm, float(right_part.norm()) / norm


def _weight_projection(
    weight: torch.Tensor,
    ref: torch.Tensor,
    left: torch.Tensor,
    left_keep: bool,
    right: torch.Tensor,
    right_keep: bool,
    group: dist.ProcessGroup | None,
    products: Products,
) -> None:
    """weight <- ref + Π(weight - ref), the products in the bases' dtype."""
    # one temporary of the matrix in the bases' dtype, made in one pass where the weight is
    # stored in it; else the weight is upcast first and W0 inside the in-place op (exactly:
    # bfloat16 and float32 values are all float32 and float64 values)
    if weight.dtype == left.dtype:
        d = torch.sub(weight, ref)
    else:
        d = weight.to(left.dtype, copy=True).sub_(ref)
    d = project(d, left, left_keep, right, right_keep, group, products)
    # W0 + Π(d) in the bases' dtype, rounded once into the weight (one pass)
    torch.add(d, ref, out=weight)


@functools.cache
def _compiled_weight_projection():
    # Float32 weights on GPUs: the whole projection of a target as one compiled call. Eager,
    # each target costs ~6 compiled TF32 splits, 12 products and their precision switches on the
    # host, ~0.8 ms, more than the GPU needs for them at the 1B shape: a profile of its OSFT step
    # on an H100 showed the GPU idle 86 ms a step longer than in full fine-tuning, mostly in
    # those calls (tools/bench/RESULTS.md); on N ranks the same host work meets 1/N of the GPU
    # work. Compiled, it is one call (the collectives traced into it as functional ones), and
    # the splits fuse with the subtraction of W0 and the add back. Shapes are dynamic: one graph
    # serves every target of a side combination, whatever the ratios.
    return torch.compile(_weight_projection, dynamic=True, fullgraph=True)


def _staged(
    targets: list[OSFTTarget], parts: Callable[[OSFTTarget], Sequence[torch.Tensor]]
) -> Iterator[tuple[OSFTTarget, list[torch.Tensor]]]:
    """:func:`mt_osft.placement.staged` on the targets' mesh device (no targets: nothing)."""
    if not targets:
        return iter(())
    return staged(targets, parts, compute_device(targets[0].weight))


def _write_back(projected: torch.Tensor, tensor: torch.Tensor) -> None:
    """``projected`` into ``tensor``'s local part where it is another tensor: a copy made on
    another device, or in another dtype (asynchronous into host memory: staged waits for it)."""
    local = local_part(tensor)
    if projected.device != local.device or projected.data_ptr() != local.data_ptr():
        local.copy_(projected, non_blocking=True)


def shard_group(tensor: DTensor):
    """The process group over which ``tensor``'s rows are sharded."""
    placements = tensor.placements
    shard_dims = [i for i, p in enumerate(placements) if isinstance(p, Shard)]
    ok = all(isinstance(p, Replicate) or p == Shard(0) for p in placements)
    if len(shard_dims) != 1 or not ok:
        raise NotImplementedError(
            f"OSFT supports weights sharded on dim 0 over one mesh dimension, got {placements}"
        )
    return tensor.device_mesh.get_group(shard_dims[0])
