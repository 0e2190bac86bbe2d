"""The adaptive per-layer ratio: importance from how much each block changes its input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mt_osft import OSFTConfig, adaptive_ratios, apply_osft, interpolate_ratios, layer_importance


class Block(nn.Module):
    """x + scale * f(x): the larger the scale, the more the block turns its input."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.proj = nn.Linear(16, 16)

    def forward(self, hidden_states, *, tag=None):
        return (hidden_states + self.scale * torch.tanh(self.proj(hidden_states)),)


class Stack(nn.Module):
    def __init__(self, scales) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(s) for s in scales])
        self.embed = nn.Embedding(10, 16)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x, tag=1)[0]
        return x


SCALES = [0.2, 3.0, 1.0, 0.05]


def _batches():
    generator = torch.Generator().manual_seed(0)
    return [{"ids": torch.randint(0, 10, (2, 12), generator=generator)} for _ in range(3)]


def test_importance_orders_by_change_and_ratios_interpolate():
    torch.manual_seed(0)
    model = Stack(SCALES)
    result = adaptive_ratios(model, list(model.blocks), _batches(), 0.1, 0.6)
    names = [f"blocks.{i}" for i in range(4)]
    assert list(result.importance) == names
    importance = [result.importance[n] for n in names]
    ratios = [result.ratios[n] for n in names]
    by_scale = sorted(range(4), key=lambda i: SCALES[i])
    assert sorted(range(4), key=lambda i: importance[i]) == by_scale
    assert sorted(range(4), key=lambda i: -ratios[i]) == by_scale  # more important: more frozen
    assert all(0.1 <= r <= 0.6 for r in ratios)
    # exact: the extreme blocks scale to exactly 0 and 1, and the clamp returns the bounds
    assert min(ratios) == 0.1 and max(ratios) == 0.6
    # The hooks are gone and the mode is restored.
    assert all(not b._forward_hooks and not b._forward_pre_hooks for b in model.blocks)
    assert model.training
    # The ratios feed apply_osft per block.
    state = apply_osft(model, OSFTConfig(0.5, ["*.proj"]), ratios=result.ratios)
    assert state.ratios == {f"{n}.proj.weight": result.ratios[n] for n in names}


def test_interpolation_edges():
    # 0.4 - s (0.4 - 0.2) in float64 against the decimal result: the decimals 0.4, 0.2 and 0.3
    # are rounded (by u = 2^-53 of each), the subtraction and the last step round once (by u of
    # 0.2 and of 0.3) and s = 0.5 scales exactly: at most (0.4 + 0.2 + 0.3 + 0.2 + 0.3) u = 1.4 u.
    within = {"rel": 0, "abs": 2 * 2**-53}
    assert interpolate_ratios({"a": 0.3, "b": 0.3}, 0.2, 0.4) == pytest.approx(
        {"a": 0.3, "b": 0.3}, **within
    )
    assert interpolate_ratios({"a": 0.0, "b": 1.0, "c": 0.5}, 0.2, 0.4) == pytest.approx(
        {"a": 0.4, "b": 0.2, "c": 0.3}, **within
    )
    with pytest.raises(ValueError, match="min_ratio"):
        interpolate_ratios({"a": 1.0}, 0.5, 0.2)
    with pytest.raises(ValueError, match="min_ratio"):
        adaptive_ratios(nn.Linear(2, 2), [], [], 0.0, 1.5)


def test_hf_decoder_layers(tiny_llama):
    model = tiny_llama(num_hidden_layers=3)
    batches = [{"input_ids": torch.randint(0, model.config.vocab_size, (1, 16))} for _ in range(2)]
    importance = layer_importance(model, model.model.layers, batches)
    assert list(importance) == [f"model.layers.{i}" for i in range(3)]
    assert all(0.0 < value < 2.0 for value in importance.values())
    result = adaptive_ratios(model, model.model.layers, batches, 0.2, 0.5)
    state = apply_osft(model, OSFTConfig(0.3), model_type="llama", ratios=result.ratios)
    for name, target in state.targets.items():
        block = ".".join(name.split(".")[:3])
        assert target.ratio == result.ratios[block]
