"""Run by test_fsdp.py as one process per rank: ``python fsdp_worker.py RANK WORLD STORE OUT``.

OSFT on a model sharded with FSDP2 over gloo ranks; rank 0 writes its dense state dict, residuals
and checks to OUT. Everything is float64 (weights, bases, data): the ranks and the one process then
differ by float64 rounding only, which AdamW magnifies by at most lr / eps a step (test_fsdp.py).
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace

import torch
import torch.distributed as dist
from torch import nn

from mt_osft import OSFTConfig, apply_osft

CONFIG = OSFTConfig(0.5, ["*.up", "*.down"], upcast_dtype=torch.float64)
RATIOS = {"1.down": 0.0}
STEPS = 6
LR, EPS = 1e-2, 1e-8


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(24, 37)  # 37 rows: an uneven split over 2 ranks
        self.down = nn.Linear(37, 24)

    def forward(self, x):
        return x + self.down(torch.tanh(self.up(x)))


def build() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(Block(), Block(), nn.Linear(24, 5)).double()


def data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 24, generator=generator), torch.randn(16, 5, generator=generator)
    return x.double(), y.double()


def train(model, state, x, y, steps=STEPS) -> None:
    """Sum of squared errors over the whole batch / 16: the same gradient on 1 or 2 ranks
    (FSDP averages the ranks' gradients, so each rank scales its half by the world size)."""
    scale = (dist.get_world_size() if dist.is_initialized() else 1) / 16
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, eps=EPS, weight_decay=0.1)
    for _ in range(steps):
        (((model(x) - y) ** 2).sum() * scale).backward()
        state.project_gradients_()
        optimizer.step()
        state.project_()
        optimizer.zero_grad()


def worker(rank: int, world: int, store: str, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    model = build()
    w0 = {name: p.detach().clone() for name, p in model.named_parameters()}
    for block in model[:2]:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    state = apply_osft(model, CONFIG, ratios=RATIOS)
    sharded = all(isinstance(t, DTensor) for t in state.state_dict().values())
    # Resume path: shapes without an SVD, filled from the live state (DTensor to DTensor).
    shadow = apply_osft(build_sharded_twin(mesh), CONFIG, ratios=RATIOS, decompose=False)
    shadow.load_state_dict(state.state_dict())
    same = all(
        torch.equal(a.to_local(), b.to_local())
        for a, b in zip(state.state_dict().values(), shadow.state_dict().values(), strict=True)
    )
    # Full tensors (e.g. from a torch.save on one rank) load into the sharded state too.
    full = apply_osft(build_sharded_twin(mesh), CONFIG, ratios=RATIOS, decompose=False)
    full.load_state_dict({key: value.full_tensor() for key, value in state.state_dict().items()})
    same = same and all(
        torch.equal(a.to_local(), b.to_local())
        for a, b in zip(state.state_dict().values(), full.state_dict().values(), strict=True)
    )
    x, y = data()
    train(model, state, x.chunk(world)[rank], y.chunk(world)[rank])
    residuals = state.residuals({name: w0[name] for name in state.targets})
    stored = state.residuals()  # against the sharded stored W0: the same numbers
    # float64 arithmetic on the same numbers gathered another way: residuals <= 1 agree to a few
    # float64 roundings (u = 1.1e-16), far below 1e-12
    same = same and all(
        abs(stored[name][i] - residuals[name][i]) < 1e-12 for name in stored for i in (0, 1)
    )
    dense = state.dense_state_dict(model)
    # W0 in host memory (OSFTConfig.reference_on_host, here a CPU mesh's own memory): the same
    # training bit for bit, and its sharded state loads from full tensors
    hosted_model = build_sharded_twin(mesh)
    hosted = apply_osft(hosted_model, replace(CONFIG, reference_on_host=True), ratios=RATIOS)
    hosted.load_state_dict({key: value.full_tensor() for key, value in full.state_dict().items()})
    train(hosted_model, hosted, x.chunk(world)[rank], y.chunk(world)[rank])
    same = same and all(
        torch.equal(a, b)
        for a, b in zip(dense.values(), hosted.dense_state_dict(hosted_model).values(), strict=True)
    )
    compiled = compiled_projection_gaps(mesh.get_group(), rank, world)
    if rank == 0:
        torch.save({"dense": dense, "residuals": residuals, "sharded": sharded, "same": same,
                    "compiled": compiled}, out)  # fmt: skip
    dist.barrier()  # neither rank tears gloo down while the other still talks to it
    dist.destroy_process_group()
    # Skip interpreter teardown: gloo's threads occasionally abort there ("terminate called
    # without an active exception"), after all the work above is done and written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def compiled_projection_gaps(group, rank: int, world: int) -> dict[str, tuple[bool, float]]:
    """Float32 weights on GPUs are projected by one compiled call per target, its collectives
    traced into the graph (mt_osft.state._compiled_weight_projection with the split TF32
    products): here on this rank's rows of a tall, a wide and a square float32 matrix (one per
    way project() talks to the other ranks), whether it gives the eager sharded projection's
    bits, and its largest gap to one process projecting the whole matrix (other sums)."""
    import mt_osft.state as state_module
    from mt_osft.products import SPLIT_TF32, matmul_precision
    from mt_osft.subspace import decompose, plan_subspace

    found = {}
    for shape, n_train in (((37, 24), 6), ((24, 37), 6), ((36, 36), 9)):
        generator = torch.Generator().manual_seed(shape[0])  # the same matrices on every rank
        w0 = torch.randn(*shape, generator=generator)
        moved = w0 + 0.01 * torch.randn(*shape, generator=generator)
        plan = plan_subspace(shape, n_train)
        left, right = decompose(w0, plan)
        rows = torch.arange(shape[0]).tensor_split(world)[rank]
        sides = (plan.left_keep, right, plan.right_keep)
        whole = moved.clone()
        state_module._weight_projection(whole, w0, left, *sides, None, SPLIT_TF32)
        eager, fused = moved[rows].clone(), moved[rows].clone()
        state_module._weight_projection(eager, w0[rows], left[rows], *sides, group, SPLIT_TF32)
        with matmul_precision("tf32"):
            state_module._compiled_weight_projection()(
                fused, w0[rows], left[rows].contiguous(), *sides, group, SPLIT_TF32
            )
        same = torch.equal(fused.view(torch.int32), eager.view(torch.int32))
        found[f"{shape[0]}x{shape[1]}"] = (same, float((fused - whole[rows]).abs().max()))
    return found


def build_sharded_twin(mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    twin = build()
    for block in twin[:2]:
        fully_shard(block, mesh=mesh)
    return fully_shard(twin, mesh=mesh)


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
