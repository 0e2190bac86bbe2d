"""Where FP8 pays: one decoder block's MLP and q projection, forward and backward, in bfloat16
and in each FP8 recipe (issue #29; the numbers behind mt_core.model.float8.MIN_DIMENSION).

On the GPU machine (see shared/GPU.md; torchao's wheel on PYTHONPATH), from the repository root:

    python3 tools/gpu/float8_layers.py                  # the 8B and 1B shapes, 8,192 tokens

Each contestant: the layers of one shape (hidden h, MLP width i: gate, up and down, and a square
h x h projection as q), torchao's ``convert_to_float8_training`` for the FP8 ones, milliseconds
per forward + backward of --tokens tokens (median of --repeat timed calls after a warm-up).
Rows: compiled (as mt's compiled blocks run them) and eager; then, compiled, the layers under
FSDP2 on a one-rank mesh with and without the tensorwise weights gathered in FP8 (what
``mt_core.model.float8.gathers_in_float8`` decides against on one rank).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn

SHAPES = {"8B": (4096, 14336), "1B": (2048, 8192)}  # hidden, MLP width


class Layers(nn.Module):
    """A SwiGLU MLP and a square projection: the products FP8 converts in a Llama block."""

    def __init__(self, hidden: int, width: int) -> None:
        super().__init__()
        self.gate = nn.Linear(hidden, width, bias=False)
        self.up = nn.Linear(hidden, width, bias=False)
        self.down = nn.Linear(width, hidden, bias=False)
        self.square = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x)) + self.square(x)


def milliseconds(
    shape: str, recipe: str | None, *, compiled: bool, fsdp: bool, gather: bool, args
) -> float:
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    torch._dynamo.reset()
    model = Layers(*SHAPES[shape]).cuda().to(torch.bfloat16)
    if recipe is not None:
        config = Float8LinearConfig.from_recipe_name(recipe)
        config = dataclasses.replace(config, enable_fsdp_float8_all_gather=gather)
        convert_to_float8_training(model, config=config)
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=init_device_mesh("cuda", (1,)))
    run = torch.compile(model) if compiled else model
    x = torch.randn(args.tokens, SHAPES[shape][0], device="cuda", dtype=torch.bfloat16)
    x.requires_grad_(True)
    times = []
    for call in range(args.repeat + 2):
        torch.cuda.synchronize()
        start = time.perf_counter()
        run(x).sum().backward()
        torch.cuda.synchronize()
        if call >= 2:  # compilation and the first autotuning left out
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29531", RANK="0", WORLD_SIZE="1")
    dist.init_process_group("nccl")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.tokens} tokens")
    print("shape | run | bfloat16 ms | tensorwise ms (x) | rowwise ms (x)")
    print("---|---|---|---|---")
    for shape in SHAPES:
        for compiled in (True, False):
            bf16 = milliseconds(shape, None, compiled=compiled, fsdp=False, gather=False, args=args)
            cells = [f"{bf16:.2f}"]
            for recipe in ("tensorwise", "rowwise"):
                ms = milliseconds(shape, recipe, compiled=compiled, fsdp=False, gather=False,
                                  args=args)  # fmt: skip
                cells.append(f"{ms:.2f} ({bf16 / ms:.2f}x)")
            run = "compiled" if compiled else "eager"
            print(f"{shape} | {run} | " + " | ".join(cells), flush=True)
        bf16 = milliseconds(shape, None, compiled=True, fsdp=True, gather=False, args=args)
        for gather in (False, True):
            ms = milliseconds(shape, "tensorwise", compiled=True, fsdp=True, gather=gather,
                              args=args)  # fmt: skip
            run = "compiled, FSDP2 on one rank" + (", gathered in FP8" if gather else "")
            print(f"{shape} | {run} | {bf16:.2f} | {ms:.2f} ({bf16 / ms:.2f}x) | -", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
