"""The paper's adaptive per-layer ratio: layers that change their input more keep more frozen.

Importance of a block = mean over tokens of 1 - cos(h_in, h_out), the cosine taken between the
hidden state entering the block and the one leaving it at each token position (forward hooks, no
gradients, a few batches). Importances are scaled to [0, 1] over the blocks (min-max) and mapped
linearly to unfreeze ratios: the most important block gets ``min_ratio`` (most frozen), the least
important ``max_ratio``; if all blocks are equally important each gets the midpoint.

The result is keyed by block module name, which is what ``apply_osft(ratios=...)`` takes: each
target inside a block gets that block's ratio.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["AdaptiveRatios", "adaptive_ratios", "interpolate_ratios", "layer_importance"]


@dataclass(frozen=True)
class AdaptiveRatios:
    """Per-block importance (1 - mean cosine similarity) and the unfreeze ratio chosen from it."""

    importance: dict[str, float]
    ratios: dict[str, float]


def _block_names(
    model: nn.Module, blocks: Mapping[str, nn.Module] | Sequence[nn.Module]
) -> dict[str, nn.Module]:
    if isinstance(blocks, Mapping):
        return dict(blocks)
    names = {id(module): name for name, module in model.named_modules()}
    named = {}
    for block in blocks:
        if id(block) not in names:
            raise ValueError(f"block {type(block).__name__} is not a submodule of the model")
        named[names[id(block)]] = block
    if not named:
        raise ValueError("adaptive ratios need at least one block")
    return named


def _hidden(value: Any, where: str, name: str) -> torch.Tensor:
    if isinstance(value, (tuple, list)) and value:
        value = value[0]
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"block {name}: cannot find the hidden states in its {where}")
    return value


@torch.no_grad()
def layer_importance(
    model: nn.Module,
    blocks: Mapping[str, nn.Module] | Sequence[nn.Module],
    batches: Iterable[Mapping[str, Any]],
    *,
    max_batches: int | None = None,
    all_reduce: bool = True,
) -> dict[str, float]:
    """1 - cosine similarity between each block's input and output hidden states, averaged over
    every token position of every batch (``model(**batch)``, in eval mode, no gradients).

    ``blocks``: the block modules (names are looked up in ``model``) or a name -> module mapping.
    A block's input is its first positional argument or its ``hidden_states`` keyword; its output
    is the returned tensor or the first element of a returned tuple. With torch.distributed
    initialised and ``all_reduce``, the sums are reduced over ranks, so every rank gets the same
    values whatever batches it saw.
    """
    named = _block_names(model, blocks)
    sums = {name: 0.0 for name in named}
    counts = {name: 0 for name in named}
    inputs: dict[str, torch.Tensor] = {}
    handles = []

    def pre_hook(name: str):
        def hook(module, args, kwargs):
            value = args[0] if args else kwargs.get("hidden_states")
            inputs[name] = _hidden(value, "input", name)

        return hook

    def post_hook(name: str):
        def hook(module, args, kwargs, output):
            before = inputs.pop(name)
            after = _hidden(output, "output", name)
            cosine = F.cosine_similarity(before.float(), after.float(), dim=-1)
            sums[name] += float((1.0 - cosine).sum())
            counts[name] += cosine.numel()

        return hook

    for name, block in named.items():
        handles.append(block.register_forward_pre_hook(pre_hook(name), with_kwargs=True))
        handles.append(block.register_forward_hook(post_hook(name), with_kwargs=True))
    was_training = model.training
    model.eval()
    try:
        for batch in islice(batches, max_batches):
            model(**batch)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()

    names = list(named)
    totals = torch.tensor(
        [[sums[name] for name in names], [float(counts[name]) for name in names]],
        dtype=torch.float64,
    )
    if all_reduce and dist.is_available() and dist.is_initialized():
        device = next(model.parameters()).device
        if device.type == "meta":
            device = torch.device("cpu")
        totals = totals.to(device)
        dist.all_reduce(totals)
        totals = totals.cpu()
    if (totals[1] == 0).any():
        missing = [
            name for name, count in zip(names, totals[1].tolist(), strict=True) if count == 0
        ]
        raise ValueError(f"blocks {missing} never ran on the given batches")
    return {name: float(totals[0, i] / totals[1, i]) for i, name in enumerate(names)}


def interpolate_ratios(
    importance: Mapping[str, float], min_ratio: float, max_ratio: float
) -> dict[str, float]:
    """Unfreeze ratio per block: ``max_ratio - s (max_ratio - min_ratio)`` with ``s`` the block's
    importance scaled to [0, 1] over the blocks (more important -> smaller ratio, more frozen)."""
    if not 0.0 <= min_ratio <= max_ratio <= 1.0:
        raise ValueError(
            f"adaptive ratios need 0 <= min_ratio <= max_ratio <= 1, got {min_ratio}, {max_ratio}"
        )
    if not importance:
        return {}
    low, high = min(importance.values()), max(importance.values())
    ratios = {}
    for name, value in importance.items():
        scaled = (value - low) / (high - low) if high > low else 0.5
        ratio = max_ratio - scaled * (max_ratio - min_ratio)
        ratios[name] = min(max(ratio, min_ratio), max_ratio)  # no rounding past the bounds
    return ratios


def adaptive_ratios(
    model: nn.Module,
    blocks: Mapping[str, nn.Module] | Sequence[nn.Module],
    batches: Iterable[Mapping[str, Any]],
    min_ratio: float,
    max_ratio: float,
    *,
    max_batches: int | None = None,
) -> AdaptiveRatios:
    """Layer importance on ``batches`` and the per-block ratios between ``min_ratio`` and
    ``max_ratio``; pass ``.ratios`` to ``apply_osft(ratios=...)`` and log both fields.
    Run it on the unmodified model, before :func:`mt_osft.apply_osft`."""
    interpolate_ratios({}, min_ratio, max_ratio)  # check the bounds before running the model
    importance = layer_importance(model, blocks, batches, max_batches=max_batches)
    return AdaptiveRatios(importance, interpolate_ratios(importance, min_ratio, max_ratio))
