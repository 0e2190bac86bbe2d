"""Run by test_rank_cost.py: ``python rank_cost_worker.py RANK WORLD STORE OUT`` (WORLD 1: no
process group, the model unsharded). OSFT on a model sharded with FSDP2 over WORLD gloo ranks;
each rank writes what its projections computed (FLOPs of the matrix products,
mt_osft.subspace.matmul_flops) and the bytes of OSFT state it holds, to OUT.RANK.json."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from mt_osft import OSFTConfig, apply_osft
from mt_osft.subspace import matmul_flops

# every matrix dimension divisible by 4: rows (and the right bases' rows) split evenly on 1, 2, 4
CONFIG = OSFTConfig(0.25, ["*.up", "*.down", "*.square"])


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(32, 96, bias=False)  # tall: left basis of the frozen directions
        self.down = nn.Linear(96, 32, bias=False)  # wide: right basis of the frozen directions
        self.square = nn.Linear(32, 32, bias=False)  # square: both bases of the trainable ones

    def forward(self, x):
        return x + self.square(self.down(torch.tanh(self.up(x))))


def build() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(Block(), Block())


def local_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def worker(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    model = build()
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
        mesh = init_device_mesh("cpu", (world,))
        for block in model:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    state = apply_osft(model, CONFIG)
    for target in state.targets.values():  # a gradient for every target
        target.weight.grad = torch.ones_like(target.weight)
    counted = {}
    for name, call in (("gradients", state.project_gradients_), ("weights", state.project_)):
        counted[name] = matmul_flops(call)
    counted["state_bytes"] = sum(local_bytes(t) for t in state.state_dict().values())
    with open(f"{out}.{rank}.json", "w") as file:
        json.dump(counted, file)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # (gloo's threads may abort in interpreter teardown: fsdp_worker.py)


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
