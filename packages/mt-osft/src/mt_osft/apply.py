"""Applying OSFT to a model: which matrices it targets and with which ratios, their frozen
copies W0 and the bases of their frozen singular directions (the SVDs spread over the ranks
when the weights are sharded).

What keeps the invariant afterwards: :mod:`mt_osft.state`."""

from __future__ import annotations

import time
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from mt_osft.config import OSFTConfig
from mt_osft.patterns import default_target_patterns, match_targets
from mt_osft.placement import compute_device, gathered, offloaded, to_host
from mt_osft.state import OSFTState, OSFTTarget, shard_group
from mt_osft.subspace import basis_dtype, decompose, plan_subspace, trainable_rank

__all__ = ["apply_osft"]


def _resolve_ratio(name: str, default: float, ratios: Mapping[str, float], used: set[str]) -> float:
    """The most specific entry of ``ratios`` for module ``name``: its own name, else its nearest
    ancestor module (``model.layers.3`` covers ``model.layers.3.mlp.up_proj``), else ``default``."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        key = ".".join(parts[:end])
        if key in ratios:
            used.add(key)
            return ratios[key]
    return default


def apply_osft(
    model: nn.Module,
    config: OSFTConfig,
    *,
    model_type: str | None = None,
    ratios: Mapping[str, float] | None = None,
    decompose: bool = True,
) -> OSFTState:
    """Make ``model`` train under OSFT; returns the :class:`OSFTState` handle.

    Targets: the modules matched by ``config.target_patterns``, else by the default patterns of
    ``model_type`` (e.g. ``config.model_type`` of a HF model). ``ratios`` maps module names (a
    target's module, or any ancestor such as a decoder block ``model.layers.3``; the most specific
    wins; a target's parameter name ``....weight`` works too) to unfreeze ratios overriding
    ``config.unfreeze_rank_ratio``; every key must cover some target.

    Matrices with ratio 0 get ``requires_grad=False``. Call before building the optimizer, and
    after ``fully_shard`` when sharding (every rank then calls it: the SVDs are spread over the
    ranks). ``decompose=False`` skips the SVDs and allocates zero-filled state of the right shapes,
    to be filled by :meth:`OSFTState.load_state_dict` or a distributed checkpoint load.
    """
    if config.target_patterns is not None:
        patterns = list(config.target_patterns)
    elif model_type is not None:
        patterns = default_target_patterns(model_type)
    else:
        raise ValueError("osft_target_patterns: set the patterns or pass the model_type")
    ratios = dict(ratios or {})
    for key, value in ratios.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"osft ratios[{key!r}] must be a number in [0, 1], got {value!r}")
    # Keys given as parameter names (".weight") are accepted and mean their module.
    ratios = {key.removesuffix(".weight"): float(value) for key, value in ratios.items()}

    modules = dict(model.named_modules())
    used: set[str] = set()
    targets: list[OSFTTarget] = []
    seen: set[int] = set()
    for module_name in match_targets(model, patterns):
        module = modules[module_name]
        weight = module.weight
        if id(weight) in seen:  # one matrix shared by two modules: split it once
            continue
        seen.add(id(weight))
        ratio = _resolve_ratio(module_name, config.unfreeze_rank_ratio, ratios, used)
        shape = (int(weight.shape[0]), int(weight.shape[1]))
        plan = plan_subspace(shape, trainable_rank(min(shape), ratio))
        targets.append(
            OSFTTarget(
                name=f"{module_name}.weight" if module_name else "weight",
                module=module,
                ratio=ratio,
                plan=plan,
                dtype=weight.dtype,
            )
        )
    unused = sorted(set(ratios) - used)
    if unused:
        raise ValueError(f"osft ratios: {unused} cover no OSFT target")

    for target in targets:
        if target.plan.n_train == 0:
            target.weight.requires_grad_(False)
    projected = [t for t in targets if t.plan.projected]
    seconds = _build_state(projected, config.upcast_dtype, decompose)
    for target in projected:  # offloaded weights: W0 waits beside them (_build_sharded: bases)
        if config.reference_on_host or offloaded(target.weight):
            target.ref = to_host(target.ref)
    return OSFTState(config, targets, seconds)


@torch.no_grad()
def _build_state(targets: list[OSFTTarget], upcast: torch.dtype, run_svd: bool) -> float:
    """Fill ref / left / right of every target; returns this rank's seconds spent in SVDs."""
    plain = [t for t in targets if not isinstance(t.weight, DTensor)]
    sharded = [t for t in targets if isinstance(t.weight, DTensor)]
    seconds = 0.0
    for target in plain:
        weight, plan = target.weight, target.plan
        stored = basis_dtype(weight.dtype, upcast)
        if run_svd:
            target.ref = weight.detach().clone()
            start = time.perf_counter()
            target.left, target.right = decompose(weight, plan, stored)
            seconds += _elapsed(start, weight.device)
        else:
            target.ref = torch.zeros_like(weight, requires_grad=False)
            target.left = weight.new_zeros(plan.shape[0], plan.left_cols, dtype=stored)
            target.right = weight.new_zeros(plan.shape[1], plan.right_cols, dtype=stored)
    if sharded:
        seconds += _build_sharded(sharded, upcast, run_svd)
    return seconds


def _build_sharded(targets: list[OSFTTarget], upcast: torch.dtype, run_svd: bool) -> float:
    """The sharded case: W0 is the local shard (no communication); matrix i is gathered to and
    decomposed by rank i mod world, in rounds of one matrix per rank, so the SVDs run in parallel
    and no rank holds more than its shards plus one full matrix; the bases are scattered back.
    All of it on the mesh's device, also where the shards wait in host memory (cpu_offload):
    there the bases then join them, one target at a time."""
    from torch.distributed.tensor import zeros as dtensor_zeros

    for target in targets:
        shard_group(target.weight)  # reject layouts the projection does not support
        if run_svd:
            target.ref = target.weight.detach().clone()
        else:
            target.ref = torch.zeros_like(target.weight, requires_grad=False)
    if not run_svd:
        for target in targets:
            mesh, placements = target.weight.device_mesh, target.weight.placements
            out, inn = target.plan.shape
            stored = basis_dtype(target.weight.dtype, upcast)
            target.left = dtensor_zeros(
                out, target.plan.left_cols, dtype=stored, device_mesh=mesh, placements=placements
            )
            target.right = dtensor_zeros(
                inn, target.plan.right_cols, dtype=stored, device_mesh=mesh, placements=placements
            )
            _beside_weight(target)
        return 0.0

    rank, world = dist.get_rank(), dist.get_world_size()
    seconds = 0.0
    for start in range(0, len(targets), world):
        chunk = targets[start : start + world]
        mine = None
        for owner, target in enumerate(chunk):
            full = gathered(target.weight.detach())  # collective: every rank takes part
            if owner == rank:
                mine = (target, full)
            del full
        bases = None
        if mine is not None:
            target, full = mine
            begin = time.perf_counter()
            bases = decompose(full, target.plan, basis_dtype(full.dtype, upcast))
            seconds += _elapsed(begin, full.device)
            del full, mine
        for owner, target in enumerate(chunk):
            weight = target.weight
            mesh, placements = weight.device_mesh, weight.placements
            out, inn = target.plan.shape
            if owner == rank:
                left, right = bases
            else:  # placeholders: distribute_tensor takes the data from the owner
                device, stored = compute_device(weight), basis_dtype(weight.dtype, upcast)
                left = torch.empty(out, target.plan.left_cols, dtype=stored, device=device)
                right = torch.empty(inn, target.plan.right_cols, dtype=stored, device=device)
            target.left = distribute_tensor(left, mesh, placements, src_data_rank=owner)
            target.right = distribute_tensor(right, mesh, placements, src_data_rank=owner)
            _beside_weight(target)
    return seconds


def _beside_weight(target: OSFTTarget) -> None:
    """The bases (made on the mesh's device) moved to host memory where the weight's shards
    wait there: mt_osft.placement.staged brings them back for each projection."""
    if offloaded(target.weight):
        target.left, target.right = to_host(target.left), to_host(target.right)


def _elapsed(start: float, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start
