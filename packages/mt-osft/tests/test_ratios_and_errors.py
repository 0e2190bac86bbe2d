"""Ratio 1.0 is full fine-tuning, ratio 0.0 changes nothing, per-layer ratios, and the errors a
user can cause, each naming the run-file key."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mt_osft import OSFTConfig, apply_osft


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(16, 40)
        self.down = nn.Linear(40, 16)
        self.norm = nn.LayerNorm(16)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(self.norm(x))))


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(16, 8)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


PATTERNS = ["*.up", "*.down"]


def _model() -> Model:
    torch.manual_seed(0)
    return Model()


def _train(model, state, steps=8):
    generator = torch.Generator().manual_seed(3)
    x, y = torch.randn(32, 16, generator=generator), torch.randn(32, 8, generator=generator)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1
    )
    for _ in range(steps):
        ((model(x) - y) ** 2).mean().backward()
        if state is not None:
            state.project_gradients_()
        optimizer.step()
        if state is not None:
            state.project_()
        optimizer.zero_grad()


def test_ratio_one_is_full_fine_tuning_exactly():
    plain, osft = _model(), _model()
    state = apply_osft(osft, OSFTConfig(1.0, PATTERNS))
    _train(plain, None)
    _train(osft, state)
    for (name, a), b in zip(plain.state_dict().items(), osft.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(plain.layers[0].up.weight, _model().layers[0].up.weight)  # it trained


def test_ratio_zero_leaves_target_weights_bitwise_unchanged():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = apply_osft(model, OSFTConfig(0.0, PATTERNS))
    assert all(not t.weight.requires_grad for t in state.targets.values())
    _train(model, state)
    for name in state.targets:
        assert torch.equal(model.state_dict()[name], before[name]), name
    # Everything OSFT does not target trains as usual.
    assert not torch.equal(model.head.weight, before["head.weight"])
    assert not torch.equal(model.layers[0].up.bias, before["layers.0.up.bias"])


def test_per_layer_ratios_most_specific_wins():
    model = _model()
    ratios = {"layers.0": 0.0, "layers.1": 0.5, "layers.1.down": 1.0}
    state = apply_osft(model, OSFTConfig(0.25, PATTERNS), ratios=ratios)
    assert state.ratios == {
        "layers.0.up.weight": 0.0,
        "layers.0.down.weight": 0.0,
        "layers.1.up.weight": 0.5,
        "layers.1.down.weight": 1.0,
    }
    assert [t.plan.n_train for t in state.targets.values()] == [0, 0, 8, 16]
    # Resume path: the same ratios rebuild the same shapes without an SVD.
    again = apply_osft(_model(), OSFTConfig(0.25, PATTERNS), ratios=state.ratios, decompose=False)
    assert {k: v.shape for k, v in again.state_dict().items()} == {
        k: v.shape for k, v in state.state_dict().items()
    }


def test_trainable_parameter_count():
    model = _model()
    state = apply_osft(model, OSFTConfig(0.5, PATTERNS), ratios={"layers.0": 0.0})
    # layers.1.up / down: 40x16 and 16x40, rank 16, 8 frozen -> (40-8)(16-8) = 256 each.
    others = sum(
        p.numel()
        for n, p in model.named_parameters()
        if not n.endswith(("up.weight", "down.weight"))
    )
    assert state.trainable_parameter_count(model) == others + 2 * 256


@pytest.mark.parametrize("ratio", [-0.1, 1.5, float("nan"), "0.5", True])
def test_bad_ratio_names_the_key(ratio):
    with pytest.raises(ValueError, match="osft_unfreeze_rank_ratio"):
        OSFTConfig(ratio)


def test_bad_layer_ratio_and_unused_key():
    with pytest.raises(ValueError, match="ratios"):
        apply_osft(_model(), OSFTConfig(0.5, PATTERNS), ratios={"layers.0": 2.0})
    with pytest.raises(ValueError, match="cover no OSFT target"):
        apply_osft(_model(), OSFTConfig(0.5, PATTERNS), ratios={"layers.7": 0.3})


def test_patterns_that_match_nothing_name_the_key():
    with pytest.raises(ValueError, match=r"osft_target_patterns: '\*\.q_proj' match no module"):
        apply_osft(_model(), OSFTConfig(0.5, ["*.up", "*.q_proj"]))


def test_non_2d_target_names_the_key():
    with pytest.raises(ValueError, match="osft_target_patterns.*1-D"):
        apply_osft(_model(), OSFTConfig(0.5, ["*.norm"]))
    with pytest.raises(ValueError, match="osft_target_patterns.*no weight"):
        apply_osft(_model(), OSFTConfig(0.5, ["layers.0"]))


def test_pattern_and_dtype_validation():
    with pytest.raises(ValueError, match="osft_target_patterns"):
        OSFTConfig(0.5, "*.up")  # a string, not a list
    with pytest.raises(ValueError, match="osft_target_patterns"):
        OSFTConfig(0.5, ["re:("])
    with pytest.raises(ValueError, match="osft_target_patterns"):
        OSFTConfig(0.5, [])
    with pytest.raises(ValueError, match="osft_upcast_dtype"):
        OSFTConfig(0.5, upcast_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="osft_output_dtype"):
        OSFTConfig(0.5, output_dtype="int8")
    with pytest.raises(ValueError, match="osft_target_patterns.*model_type"):
        apply_osft(_model(), OSFTConfig(0.5))
    config = OSFTConfig(0.5, upcast_dtype="float64", output_dtype="bf16")
    assert (config.upcast_dtype, config.output_dtype) == (torch.float64, torch.bfloat16)
