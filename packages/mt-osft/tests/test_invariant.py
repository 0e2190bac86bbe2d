"""The invariant on the weights: the frozen singular directions never move, however AdamW steps.

Residuals are measured against an SVD of W0 computed here in float64, independently of the
library, and relative to the size of the change: |U_hi^T ΔW|_F / |ΔW|_F and |ΔW V_hi|_F / |ΔW|_F.
Each is held to ``residual_bound``: what rounding allows, (m + n) unit roundoffs of the stored
weight relative to |W|/|ΔW| plus, against the independent SVD, the tilt of a float32 SVD's basis
(u |W0|_2 / gap: a matrix whose frozen singular values lie close to the trained ones gets more).
Measured on one machine: at most 2% of the bound, under every ATEN_CPU_CAPABILITY.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mt_osft import OSFTConfig, apply_osft, residual_bound, trainable_rank

# Wide, square and tall matrices: both storage modes of each side are exercised.
SHAPES = [(24, 40), (32, 32), (48, 20)]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(40, 24)  # weight 24 x 40 (wide)
        self.b = nn.Linear(24, 32)  # 32 x 24 (tall)
        self.c = nn.Linear(32, 32)  # square
        self.d = nn.Linear(32, 48)  # 48 x 32 (tall)
        self.e = nn.Linear(48, 20)  # 20 x 48 (wide)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in (self.a, self.b, self.c, self.d):
            x = torch.tanh(layer(x))
        return self.e(x)


TARGETS = ["a", "b", "c", "d", "e"]


def _data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(64, 40, generator=generator), torch.randn(64, 20, generator=generator)


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{name}.weight": getattr(model, name).weight.detach().clone() for name in TARGETS}


def independent_residuals(w0: torch.Tensor, w: torch.Tensor, k: int) -> tuple[float, float]:
    u, _, vh = torch.linalg.svd(w0.double(), full_matrices=False)
    delta = w.double() - w0.double()
    norm = delta.norm()
    return float((u[:, :k].T @ delta).norm() / norm), float((delta @ vh[:k].T).norm() / norm)


def train(
    model: nn.Module,
    state,
    steps: int,
    *,
    lr: float = 3e-3,
    weight_decay: float = 0.1,
    project_weights: bool = True,
) -> None:
    x, y = _data()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay
    )
    for _ in range(steps):
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        state.project_gradients_()  # a no-op unless config.project_gradients
        optimizer.step()
        if project_weights:
            state.project_()
        optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("ratio", [0.25, 0.6])
@pytest.mark.parametrize("project_gradients", [True, False])
@pytest.mark.parametrize("upcast", [torch.float32, torch.float64])
def test_frozen_subspace_never_moves(ratio, project_gradients, upcast):
    torch.manual_seed(0)
    model = Net()
    w0 = _weights(model)
    config = OSFTConfig(ratio, TARGETS, upcast_dtype=upcast, project_gradients=project_gradients)
    state = apply_osft(model, config)
    train(model, state, 60)
    own = state.residuals()  # against the stored W0, with the library's own bases
    for name, target in state.targets.items():
        w = target.weight.detach()
        moved = float((w - w0[name]).norm() / w0[name].norm())
        assert moved > 0.2, f"{name} barely moved ({moved:.3f}); the test would prove nothing"
        k = target.plan.n_frozen
        left, right = independent_residuals(w0[name], w, k)
        assert max(left, right) < residual_bound(w0[name], w, k, upcast), (name, left, right)
        assert max(own[name]) < residual_bound(w0[name], w, k, None), (name, own[name])


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 0.75, 0.9])
def test_exactly_round_r_times_rank_directions_train(ratio):
    torch.manual_seed(0)
    model = Net()
    w0 = _weights(model)
    state = apply_osft(model, OSFTConfig(ratio, TARGETS))
    for target in state.targets.values():
        rank = min(target.plan.shape)
        assert target.plan.n_train == int(ratio * rank + 0.5)  # nearest, halves up
        assert target.plan.n_frozen == rank - target.plan.n_train
    train(model, state, 25, lr=1e-2)
    for name, target in state.targets.items():
        w, k = target.weight.detach(), target.plan.n_frozen
        # The top k directions are frozen ...
        assert max(independent_residuals(w0[name], w, k)) < residual_bound(
            w0[name], w, k, torch.float32
        )
        # ... and the (k+1)-th is not: it moved, far beyond rounding, so exactly k are frozen.
        bound = residual_bound(w0[name], w, k + 1, torch.float32)
        assert min(independent_residuals(w0[name], w, k + 1)) > 10 * bound


def test_the_bound_takes_the_singular_values_a_caller_already_has():
    """Given W0's singular values, the bound is the one it computes itself (same float64 values,
    same bits); a wider gap after the frozen directions gives a smaller one: they are used."""
    torch.manual_seed(0)
    w0, w = torch.randn(24, 40), torch.randn(24, 40)
    s = torch.linalg.svdvals(w0.double())
    alone = residual_bound(w0, w, 6, torch.float32)
    assert residual_bound(w0, w, 6, torch.float32, singular_values=s) == alone
    wider = s.clone()
    wider[6:] /= 2  # a wider gap after the 6 frozen directions tilts the bases less
    assert residual_bound(w0, w, 6, torch.float32, singular_values=wider) < alone


def test_rounding_rule():
    assert trainable_rank(10, 0.25) == 3  # 2.5 rounds up
    assert trainable_rank(10, 0.24) == 2
    assert trainable_rank(7, 0.0) == 0
    assert trainable_rank(7, 1.0) == 7
    assert trainable_rank(1, 0.5) == 1


def test_gradient_projection_alone_breaks_the_invariant():
    """Negative control: projecting only the gradient lets Adam's per-element scaling leave the
    subspace; the residual check above would catch an implementation that did only that."""
    torch.manual_seed(0)
    model = Net()
    w0 = _weights(model)
    state = apply_osft(model, OSFTConfig(0.5, TARGETS))
    train(model, state, 20, project_weights=False)
    # far beyond what rounding allows (residual_bound), for some target
    assert any(
        max(independent_residuals(w0[name], t.weight.detach(), t.plan.n_frozen))
        > 100 * residual_bound(w0[name], t.weight.detach(), t.plan.n_frozen, torch.float32)
        for name, t in state.targets.items()
    )


@pytest.mark.parametrize("enabled", [True, False])
def test_gradient_projection(enabled):
    torch.manual_seed(0)
    layer = nn.Linear(24, 32, bias=False)
    state = apply_osft(layer, OSFTConfig(0.5, ["re:"], project_gradients=enabled))
    grad = torch.randn(32, 24)
    layer.weight.grad = grad.clone()
    state.project_gradients_()
    if not enabled:
        assert torch.equal(layer.weight.grad, grad)
        return
    u, _, vh = torch.linalg.svd(layer.weight.detach().double(), full_matrices=False)
    k = state.targets["weight"].plan.n_frozen
    projected = layer.weight.grad.double()
    # as a weight change: the float32 SVD's tilt and the float32 storage of the result
    w = layer.weight.detach()
    bound = residual_bound(w, w + layer.weight.grad, k, torch.float32)
    assert (u[:, :k].T @ projected).norm() < bound * projected.norm()
    assert (projected @ vh[:k].T).norm() < bound * projected.norm()
    # Π is a projection: what it keeps is unchanged by a second application, up to the rounding
    # of its two products (sums over 32 and 24 terms: γ_56 of the largest entry).
    state.project_gradients_()
    atol = (32 + 24) * torch.finfo(torch.float32).eps / 2 * projected.abs().max().item()
    torch.testing.assert_close(layer.weight.grad.double(), projected, atol=atol, rtol=0)


def test_weight_decay_acts_on_the_trainable_part_only():
    """With zero gradients AdamW only decays: W_t = F + (1 - lr wd)^t L, where F is the frozen
    part U_hi S_hi V_hi^T and L = W0 - F the trainable part. Decay of F is projected away."""
    torch.manual_seed(0)
    layer = nn.Linear(24, 32, bias=False)
    w0 = layer.weight.detach().clone()
    state = apply_osft(layer, OSFTConfig(0.5, ["re:"], upcast_dtype=torch.float64))
    lr, wd, steps = 0.05, 0.5, 30
    optimizer = torch.optim.AdamW(layer.parameters(), lr=lr, weight_decay=wd)
    for _ in range(steps):
        layer.weight.grad = torch.zeros_like(layer.weight)
        state.project_gradients_()
        optimizer.step()
        state.project_()
    u, s, vh = torch.linalg.svd(w0.double(), full_matrices=False)
    k = state.targets["weight"].plan.n_frozen
    frozen = u[:, :k] @ torch.diag(s[:k]) @ vh[:k]
    expected = frozen + (1 - lr * wd) ** steps * (w0.double() - frozen)
    assert (1 - lr * wd) ** steps < 0.5  # the trainable part really decayed
    # Each step rounds W to float32 twice (AdamW's decay, the projection's store): at most
    # 2 u |W| a step, adding up over the steps, plus the last projection's own products (γ_56).
    atol = (2 * steps + 32 + 24) * torch.finfo(torch.float32).eps / 2 * w0.abs().max().item()
    torch.testing.assert_close(layer.weight.double(), expected, atol=atol, rtol=0)


class TwoPart(nn.Module):
    """The reparametrisation W = W_frozen (buffer) + W_train (parameter), projected after each
    step: the alternative design, written out independently to compare trajectories."""

    def __init__(self, linear: nn.Linear, k: int) -> None:
        super().__init__()
        w = linear.weight.detach().double()
        u, _, vh = torch.linalg.svd(w, full_matrices=False)
        self.u, self.v = u[:, :k], vh[:k].T
        train_part = self.proj(w)
        self.register_buffer("frozen", w - train_part)
        self.train_part = nn.Parameter(train_part)
        self.bias = nn.Parameter(linear.bias.detach().clone())

    def proj(self, d: torch.Tensor) -> torch.Tensor:
        d = d - self.u @ (self.u.T @ d)
        return d - (d @ self.v) @ self.v.T

    def forward(self, x):
        return nn.functional.linear(x, self.frozen + self.train_part, self.bias)


def test_same_trajectory_as_the_reparametrised_form():
    """In float64 throughout: the two forms are the same mathematics, so they may differ only by
    float64 rounding, which AdamW can magnify (see the bound at the end)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(40, 32), nn.Tanh(), nn.Linear(32, 20)).double()
    twin = nn.Sequential(
        TwoPart(net[0], 32 - trainable_rank(32, 0.5)),
        nn.Tanh(),
        TwoPart(net[2], 20 - trainable_rank(20, 0.5)),
    )
    state = apply_osft(
        net, OSFTConfig(0.5, ["0", "2"], upcast_dtype=torch.float64, project_gradients=False)
    )
    x, y = (t.double() for t in _data())
    lr, steps, eps = 3e-3, 20, 1e-8
    opts = [
        torch.optim.AdamW(m.parameters(), lr=lr, eps=eps, weight_decay=0.1) for m in (net, twin)
    ]
    for _ in range(steps):
        for model, opt in zip((net, twin), opts, strict=True):
            ((model(x) - y) ** 2).mean().backward()
            opt.step()
            opt.zero_grad()
        state.project_()
        with torch.no_grad():
            for part in (twin[0], twin[2]):
                part.train_part.copy_(part.proj(part.train_part))
    for index in (0, 2):
        dense = twin[index].frozen + twin[index].train_part
        assert (net[index].weight - twin[index].frozen).norm() > 0.1  # it trained
        # Gradients differ by float64 rounding (γ_64 of their size, at most 1 here: sums over
        # <= 64 terms); AdamW turns a gradient difference δ into an update difference of at most
        # lr δ / eps, every step.
        atol = steps * lr / eps * 64 * torch.finfo(torch.float64).eps / 2
        torch.testing.assert_close(net[index].weight, dense, atol=atol, rtol=0)


@pytest.mark.parametrize(
    "shape", [(48, 48), (48, 16), (16, 48), (40, 24), (24, 40), (7, 5)], ids=str
)
@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 0.75, 1.0])
def test_projection_flops_are_what_the_products_count(shape, ratio):
    """SubspacePlan.projection_flops (what ``mt check`` times) against torch's FLOP counter on
    one projection: square and rectangular, each side kept or frozen, fully trainable (none)."""
    from mt_osft.subspace import matmul_flops, plan_subspace, project

    plan = plan_subspace(shape, trainable_rank(min(shape), ratio))
    left = torch.randn(shape[0], plan.left_cols)
    right = torch.randn(shape[1], plan.right_cols)
    counted = matmul_flops(
        lambda: project(torch.randn(shape), left, plan.left_keep, right, plan.right_keep)
    )
    assert plan.projection_flops == (counted if plan.projected else 0)
