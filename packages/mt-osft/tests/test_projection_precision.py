"""Which projection must be exact: the gradient projection may run in TF32 (its default on CUDA),
because the exact projection of the weights after the step removes whatever it leaves along the
frozen directions; the weight projection stays IEEE float32 and keeps the invariant within
``residual_bound``.

TF32 is emulated here on the CPU (inputs rounded to 10-bit mantissas, float32 sums), so the
arithmetic the GPU does is what these tests train with."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mt_osft.apply as apply_module
import mt_osft.state as state_module
from mt_osft import OSFTConfig, apply_osft, residual_bound, trainable_rank
from mt_osft.products import PLAIN, SPLIT_TF32, tf32_parts
from mt_osft.subspace import project


def tf32(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (float32) rounded to TF32's 10 mantissa bits, nearest, ties away from zero (a
    tensor core reads float32 inputs so)."""
    bits = tensor.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def tf32_project(d, left, left_keep, right, right_keep, group=None, products=None):
    """Π(d), both sides on the whole matrix, with every matmul input rounded to TF32."""
    if left_keep or left.shape[1]:
        coeff = tf32(left).T @ tf32(d)
        d = tf32(left) @ tf32(coeff) if left_keep else d - tf32(left) @ tf32(coeff)
    if right_keep or right.shape[1]:
        coeff = tf32(d) @ tf32(right)
        d = tf32(coeff) @ tf32(right).T if right_keep else d - tf32(coeff) @ tf32(right).T
    return d


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(40, 24)  # wide
        self.b = nn.Linear(24, 48)  # tall
        self.c = nn.Linear(48, 48)  # square
        self.d = nn.Linear(48, 20)

    def forward(self, x):
        return self.d(torch.tanh(self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))))


TARGETS = ["a", "b", "c", "d"]
# bfloat16's unit roundoff (half its eps, 2^-8), from torch rather than typed: the tests held
# 2^-9 by hand once, a bound twice as tight as the derivation's
BF16_U = torch.finfo(torch.bfloat16).eps / 2


def frozen_residual(w0: torch.Tensor, w: torch.Tensor, k: int) -> float:
    """The invariant against an exact (float64) SVD of W0: the larger of |U_hi^T ΔW| and
    |ΔW V_hi|, relative to |ΔW|."""
    u, _, vh = torch.linalg.svd(w0.double(), full_matrices=False)
    delta = w.double() - w0.double()
    return max(float((u[:, :k].T @ delta).norm()), float((delta @ vh[:k].T).norm())) / float(
        delta.norm()
    )


def train_with_tf32_gradient_projection(monkeypatch, *, project_weights: bool, steps: int = 40):
    torch.manual_seed(0)
    model = Net()
    w0 = {f"{name}.weight": getattr(model, name).weight.detach().clone() for name in TARGETS}
    state = apply_osft(model, OSFTConfig(0.25, TARGETS))
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 40, generator=generator), torch.randn(64, 20, generator=generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    leaks = []
    for _ in range(steps):
        ((model(x) - y) ** 2).mean().backward()
        with monkeypatch.context() as patch:
            patch.setattr(state_module, "project", tf32_project)
            state.project_gradients_()
        for name, target in state.targets.items():  # what the TF32 projection left
            grad = target.weight.grad
            leaks.append(frozen_residual(w0[name], w0[name] + grad, target.plan.n_frozen))
        optimizer.step()
        if project_weights:
            state.project_()
        optimizer.zero_grad(set_to_none=True)
    return model, state, w0, max(leaks)


def test_a_tf32_gradient_projection_leaks_and_the_weight_projection_removes_it(monkeypatch):
    model, state, w0, leak = train_with_tf32_gradient_projection(monkeypatch, project_weights=True)
    for name, target in state.targets.items():
        w, k = target.weight.detach(), target.plan.n_frozen
        assert float((w - w0[name]).norm() / w0[name].norm()) > 0.1, name  # it trained
        # the frozen directions, against an exact SVD: within what float32 storage and the
        # float32 SVD's tilt allow (mt_osft.residual_bound), as with IEEE gradient projections
        assert frozen_residual(w0[name], w, k) < residual_bound(w0[name], w, k, torch.float32)
    # the TF32 projection does leak: more than the IEEE float32 rounding of a gradient would
    # (so the test above is about something): about TF32's unit roundoff 2^-11 at least once
    gradient_bound = (48 + 48) * torch.finfo(torch.float32).eps
    assert leak > gradient_bound


def test_without_the_weight_projection_the_tf32_leak_would_stay(monkeypatch):
    """Negative control: the same training without the exact weight projection leaves the
    frozen subspace by far more than the bound (Adam's per-element scaling and the TF32 leak)."""
    model, state, w0, _ = train_with_tf32_gradient_projection(monkeypatch, project_weights=False)
    assert any(
        frozen_residual(w0[n], t.weight.detach(), t.plan.n_frozen)
        > 100 * residual_bound(w0[n], t.weight.detach(), t.plan.n_frozen, torch.float32)
        for n, t in state.targets.items()
    )


@pytest.mark.parametrize("gradient_precision", ["tf32", "ieee"])
def test_each_projection_runs_in_its_precision_and_the_trainers_setting_comes_back(
    gradient_precision, monkeypatch
):
    layer = nn.Linear(24, 32, bias=False)
    state = apply_osft(layer, OSFTConfig(0.5, ["re:"], gradient_precision=gradient_precision))
    seen = []

    def recording(*args, **kwargs):
        seen.append(torch.backends.cuda.matmul.fp32_precision)
        return project(*args, **kwargs)

    monkeypatch.setattr(state_module, "project", recording)
    before = torch.backends.cuda.matmul.fp32_precision
    layer.weight.grad = torch.randn(32, 24)
    state.project_gradients_()
    state.project_()
    # ("none" is torch's default, IEEE: left as it is)
    assert seen[0] == gradient_precision or (gradient_precision, seen[0]) == ("ieee", "none")
    assert seen[1] in ("ieee", "none")  # the weights: always IEEE
    assert torch.backends.cuda.matmul.fp32_precision == before


def test_an_unknown_gradient_precision_is_refused():
    with pytest.raises(ValueError, match="gradient_precision must be one of ieee, tf32"):
        OSFTConfig(0.5, gradient_precision="bf16")


def test_the_weight_projection_is_w0_plus_the_projected_change_bit_for_bit():
    """W <- W0 + Π(W - W0) for bfloat16 weights, computed in place in their bfloat16 bases'
    dtype: the same bits as the formula written out."""
    torch.manual_seed(0)
    layer = nn.Linear(48, 40, bias=False).to(torch.bfloat16)
    state = apply_osft(layer, OSFTConfig(0.25, ["re:"]))
    target = state.targets["weight"]
    assert target.left.dtype == target.right.dtype == torch.bfloat16
    w0 = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight.add_(torch.randn_like(layer.weight) * 0.01)
    moved = layer.weight.detach().clone()
    state.project_()
    plan = target.plan
    change = moved - w0
    expected = project(change, target.left, plan.left_keep, target.right, plan.right_keep) + w0
    assert torch.equal(layer.weight.detach(), expected)


def train_osft(
    monkeypatch, dtype, steps, *, tf32_weights=False, split_weights=False, float32_bases=False,
    project_gradients=True,
):  # fmt: skip
    """Net in ``dtype`` trained under OSFT. With float32 bases (float32 weights, or bfloat16
    ones with ``float32_bases``) the gradient projection runs in emulated TF32 and the weight
    projection in emulated TF32 (``tf32_weights``) or IEEE float32; bfloat16 weights otherwise
    keep bfloat16 bases and project both in bfloat16 products, as on the GPU."""
    torch.manual_seed(0)
    if float32_bases:
        monkeypatch.setattr(apply_module, "basis_dtype", lambda weight, upcast: upcast)
    model = Net().to(dtype)
    w0 = {f"{name}.weight": getattr(model, name).weight.detach().clone() for name in TARGETS}
    state = apply_osft(model, OSFTConfig(0.25, TARGETS, project_gradients=project_gradients))
    emulated = next(iter(state.targets.values())).left.dtype == torch.float32
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(64, 40, generator=generator).to(dtype)
    y = torch.randn(64, 20, generator=generator).to(dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    for _ in range(steps):
        ((model(x) - y).float() ** 2).mean().backward()
        with monkeypatch.context() as patch:
            if emulated:
                patch.setattr(state_module, "project", tf32_project)
            state.project_gradients_()
        optimizer.step()
        with monkeypatch.context() as patch:
            if emulated and tf32_weights:
                patch.setattr(state_module, "project", tf32_project)
            if split_weights:  # what a GPU runs for float32 weights
                patch.setattr(state_module, "project", lambda *a: project(*a[:6], SPLIT_TF32))
            state.project_()
        optimizer.zero_grad(set_to_none=True)
    return state, w0


def test_the_bases_are_bfloat16_for_bfloat16_weights_only():
    from mt_osft.subspace import basis_dtype

    assert basis_dtype(torch.bfloat16, torch.float32) == torch.bfloat16
    for dtype in (torch.float32, torch.float16, torch.float64):
        assert basis_dtype(dtype, torch.float32) == torch.float32, dtype
        assert basis_dtype(dtype, torch.float64) == torch.float64, dtype


def test_bfloat16_weights_with_bfloat16_bases_stay_within_the_bound_and_near_float32_bases(
    monkeypatch,
):
    """bfloat16 weights projected with their bfloat16 bases: against an exact SVD, within
    residual_bound, which for bfloat16 storage is what it was with float32 bases; after one step
    from the same gradients the stored weights are those of float32 bases and IEEE products up to
    bfloat16's unit roundoff of their norm, 2^-8 |W| (one more rounding of every element; a few
    elements differ by a spacing)."""
    state, w0 = train_osft(monkeypatch, torch.bfloat16, 30)
    for name, target in state.targets.items():
        assert target.left.dtype == torch.bfloat16
        w, k = target.weight.detach(), target.plan.n_frozen
        assert float((w.float() - w0[name].float()).norm() / w0[name].float().norm()) > 0.05
        assert frozen_residual(w0[name], w, k) < residual_bound(w0[name], w, k, torch.float32)
    # (unprojected gradients: Adam's first step is about lr sign(g), which a projection's rounding
    # flips where the projected g is near 0, and that is not the weight projection's doing)
    bf16_state, _ = train_osft(monkeypatch, torch.bfloat16, 1, project_gradients=False)
    f32_state, _ = train_osft(
        monkeypatch, torch.bfloat16, 1, float32_bases=True, project_gradients=False
    )
    for name, target in bf16_state.targets.items():
        b = f32_state.targets[name]
        assert b.left.dtype == torch.float32
        a, b = target.weight.detach().float(), b.weight.detach().float()
        assert (a - b).norm() <= BF16_U * b.norm(), name


@pytest.mark.parametrize("shape", [(64, 48), (48, 64), (40, 40), (96, 24)])
def test_bfloat16_bases_leak_at_most_the_derived_bound_and_coarser_ones_would_not(shape):
    """The bound mt_osft.subspace.basis_dtype derives for one projection with bfloat16 bases:
    the computed Π(D) has at most (4 sqrt(k) + 4) u |D| along the frozen directions of the exact
    (float64) SVD, u = 2^-8 (bfloat16's unit roundoff, half its eps). Bases of a different
    matrix (as from a stale SVD: W0 plus 50% noise; with 20% some leak less than this loose
    bound) leave it: the measure sees a leaking subspace."""
    from mt_osft.subspace import decompose, plan_subspace

    generator = torch.Generator().manual_seed(sum(shape))
    w0 = torch.randn(shape, generator=generator).to(torch.bfloat16)
    plan = plan_subspace(shape, trainable_rank(min(shape), 0.25))
    k = plan.n_frozen
    u, _, vh = torch.linalg.svd(w0.double(), full_matrices=False)
    frozen_left, frozen_right = u[:, :k], vh[:k].T
    d = (torch.randn(shape, generator=generator) * 1e-3).to(torch.bfloat16)

    def leak(left: torch.Tensor, right: torch.Tensor) -> float:
        out = project(d.clone(), left, plan.left_keep, right, plan.right_keep).double()
        worst = max((frozen_left.T @ out).norm(), (out @ frozen_right).norm())
        return float(worst / d.double().norm())

    bound = (4 * k**0.5 + 4) * BF16_U
    left, right = decompose(w0, plan, torch.bfloat16)
    assert leak(left, right) <= bound
    noise = torch.randn(shape, generator=generator) * 0.5
    assert leak(*decompose(w0.float() + noise, plan, torch.bfloat16)) > bound


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_weight_projection_runs_in_the_bases_dtype_with_ieee_float32(dtype, monkeypatch):
    layer = nn.Linear(24, 32, bias=False).to(dtype)
    state = apply_osft(layer, OSFTConfig(0.5, ["re:"], project_gradients=False))
    seen = []

    def recording(d, left, left_keep, right, right_keep, group=None, products=PLAIN):
        seen.append((torch.backends.cuda.matmul.fp32_precision, d.dtype, left.dtype, right.dtype))
        assert products == PLAIN  # (split products only for float32 on CUDA)
        return project(d, left, left_keep, right, right_keep, group, products)

    monkeypatch.setattr(state_module, "project", recording)
    state.project_()
    precision, *dtypes = seen[0]
    assert precision in ("ieee", "none")
    assert dtypes == [dtype] * 3


def test_float32_weights_projected_in_tf32_would_leave_the_bound(monkeypatch):
    """Negative control: why float32 weights keep IEEE products. Their bound is float32's, and a
    TF32 weight projection leaves it for some target."""
    state, w0 = train_osft(monkeypatch, torch.float32, 30, tf32_weights=True)
    assert any(
        frozen_residual(w0[n], t.weight.detach(), t.plan.n_frozen)
        > residual_bound(w0[n], t.weight.detach(), t.plan.n_frozen, torch.float32)
        for n, t in state.targets.items()
    )


def test_split_products_are_within_a_dozen_float32_roundoffs_where_one_tf32_product_is_not():
    """mt_osft.products: a b as three TF32 products (every input a TF32 number, as a tensor core
    reads it) is within (k + 12) float32 roundoffs of sum |a_i||b_j| of the exact product, the
    IEEE bound for a sum of k terms plus the 12 the split drops; a single TF32 product is not."""
    u = torch.finfo(torch.float32).eps / 2
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(64, 300, generator=generator)
    b = torch.randn(300, 40, generator=generator)
    exact = a.double() @ b.double()
    scale = a.double().abs() @ b.double().abs()
    for hi, lo in (tf32_parts(a), tf32_parts(b)):  # the parts are TF32 numbers
        assert torch.equal(hi, tf32(hi)) and torch.equal(lo, tf32(lo))
    split = SPLIT_TF32.mm(a, b)
    assert ((split.double() - exact).abs() <= (300 + 12) * u * scale).all()
    x = torch.randn(64, 40, generator=generator)
    subtracted = SPLIT_TF32.sub_mm_(x.clone(), a, b)
    assert (
        (subtracted.double() - (x.double() - exact)).abs()
        <= (300 + 13) * u * (scale + x.double().abs())
    ).all()
    single = tf32(a) @ tf32(b)
    assert ((single.double() - exact).abs() > (300 + 12) * u * scale).any()


def test_the_compiled_split_a_gpu_runs_gives_the_eager_split_bit_for_bit():
    """On CUDA tf32_parts runs compiled, traced into the weight projection
    (mt_osft.state._compiled_weight_projection): compiled with dynamic shapes, it gives the same
    bits as eager for every float32 (normal, subnormal, both signs, zero), and on operands of
    other shapes and transposed views without recompiling into something else."""
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(37, 53, generator=generator) * torch.logspace(-40, 38, 53)
    values[0, :4] = torch.tensor([0.0, -0.0, 1e-45, -3e-39])  # zeros and subnormals
    fused = torch.compile(tf32_parts, dynamic=True)
    for x in (values, values.T, values[:, :7], torch.randn(300, 2, generator=generator)):
        for got, want in zip(fused(x), tf32_parts(x), strict=True):
            assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_float32_weights_projected_in_split_tf32_products_stay_within_the_bound(monkeypatch):
    """float32 weights trained with the split products a GPU runs for them (TF32 gradient
    projection, split weight projection): within float32's residual_bound against an exact SVD,
    where a single-TF32 weight projection leaves it (the test below)."""
    state, w0 = train_osft(monkeypatch, torch.float32, 30, split_weights=True)
    for name, target in state.targets.items():
        w, k = target.weight.detach(), target.plan.n_frozen
        assert float((w - w0[name]).norm() / w0[name].norm()) > 0.1, name
        assert frozen_residual(w0[name], w, k) < residual_bound(w0[name], w, k, torch.float32)


def test_the_compiled_weight_projection_gives_the_eager_ones_bits_and_compiles_once_per_sides():
    """Float32 weights on one GPU are projected by one compiled call per target
    (mt_osft.state._compiled_weight_projection, with the split TF32 products traced into it): the
    same bits as the eager projection for each combination of stored sides (complement or
    frozen basis on the left and on the right), and a second shape of the same sides reuses the
    graph (shapes are dynamic, so per-layer ratios do not recompile)."""
    from torch._dynamo.utils import counters

    from mt_osft.products import matmul_precision
    from mt_osft.subspace import decompose, plan_subspace

    generator = torch.Generator().manual_seed(0)
    compiled = state_module._compiled_weight_projection()
    cases = [((48, 48), 12), ((36, 36), 9), ((24, 40), 6), ((96, 32), 8), ((40, 48), 30)]
    graphs = []
    for shape, n_train in cases:
        w0 = torch.randn(*shape, generator=generator)
        plan = plan_subspace(shape, n_train)
        left, right = decompose(w0, plan)
        moved = w0 + 0.01 * torch.randn(*shape, generator=generator)
        eager, fused = moved.clone(), moved.clone()
        args = (w0, left, plan.left_keep, right, plan.right_keep, None, SPLIT_TF32)
        state_module._weight_projection(eager, *args)
        before = counters["stats"]["unique_graphs"]
        with matmul_precision("tf32"):
            compiled(fused, *args)
        graphs.append(counters["stats"]["unique_graphs"] - before)
        assert not torch.equal(eager, moved), shape  # it projected something
        assert torch.equal(fused.view(torch.int32), eager.view(torch.int32)), shape
    sides = [(plan_subspace(s, n).left_keep, plan_subspace(s, n).right_keep) for s, n in cases]
    assert sides[0] == sides[1] and len(set(sides)) == 4  # every combination, one twice
    assert graphs[1] == 0 and graphs[2] == 1  # same sides: no new graph; new sides: one
