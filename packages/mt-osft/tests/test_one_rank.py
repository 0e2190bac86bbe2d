"""FSDP2 over one rank (a run on one GPU): the projections run as unsharded ones, with no
collective. Each would be a launch and a copy per target and projection (224 targets twice a
step at 8B), and the right basis's all-gather a temporary the size of the basis."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from mt_osft import OSFTConfig, apply_osft

# tall (frozen left basis), wide (frozen right basis), square (trainable bases on both sides)
CONFIG = OSFTConfig(0.25, ["*.tall", "*.wide", "*.square"])


def build() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*(
        nn.ModuleDict(
            {"tall": nn.Linear(32, 96), "wide": nn.Linear(96, 32), "square": nn.Linear(32, 32)}
        )
        for _ in range(2)
    ))  # fmt: skip


def test_one_rank_projects_as_unsharded_without_a_collective(one_rank_group, monkeypatch):
    plain, sharded = build(), build()
    mesh = init_device_mesh("cpu", (1,))
    fully_shard(sharded, mesh=mesh)
    states = [apply_osft(model, CONFIG) for model in (plain, sharded)]
    generator = torch.Generator().manual_seed(1)
    steps = {name: torch.randn(t.weight.shape, generator=generator)
             for name, t in states[0].targets.items()}  # fmt: skip
    for state in states:
        for name, target in state.targets.items():
            local = (
                target.weight.to_local() if isinstance(target.weight, DTensor) else target.weight
            )
            target.weight.grad = torch.ones_like(target.weight)
            with torch.no_grad():
                local.add_(steps[name], alpha=1e-2)  # an optimizer step, leaving the subspace

    def collective(*args, **kwargs):
        raise AssertionError("a collective on one rank")

    for name in ("all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor"):
        monkeypatch.setattr(dist, name, collective)
    monkeypatch.setattr(DTensor, "full_tensor", collective)
    for state in states:
        state.project_gradients_()
        state.project_()
    monkeypatch.undo()
    for name, target in states[1].targets.items():
        reference = states[0].targets[name]
        # the same arithmetic on the same values: bit for bit
        assert torch.equal(target.weight.full_tensor(), reference.weight), name
        assert torch.equal(target.weight.grad.full_tensor(), reference.weight.grad), name
