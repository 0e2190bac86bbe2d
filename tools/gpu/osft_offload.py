"""OSFT with cpu_offload on GPUs: the frozen subspace stays put, the losses are those of the run
without it, and what it costs.

On the GPU machine (see shared/GPU.md), from the repository root:

    python3 tools/gpu/osft_offload.py --out $OUT                         # mid shape, every GPU
    python3 tools/gpu/osft_offload.py --shape llama-3.2-1b --out $OUT
    python3 tools/gpu/osft_offload.py --shape tiny --ranks 2 --out /tmp/oo   # CPU dry run, gloo

A random-init model of the shape and a long-tailed SFT mix are written under --out; each case is
``mt run`` (under torchrun) in a fresh process on them: OSFT at ratio 0.25 with float32 master
weights, on one process and, where the machine has more GPUs, on all of them, with cpu_offload
off and on. Under cpu_offload the weights, gradients, optimizer state, W0 and the bases wait in
host memory, the optimizer step runs on the CPU and the projections on the GPU
(mt_osft.placement). Two tables give, for each case: seconds a step (the median from step 3),
the peak GPU memory, the largest relative difference of its step losses from the case without
cpu_offload on as many GPUs (the CPU's AdamW rounds in another order than the GPU's fused one,
and a master weight one float32 unit away can cast to the neighbouring bfloat16 value: measured
1e-5 at the mid shape, 6e-5 at 1B after 6 steps; much more is a bug), and the largest residual of
the weights' change along the frozen singular directions of W0 over every target, as a share
of what rounding allows (mt_osft.residual_bound: below 1 keeps the invariant).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from mt_core import args_from_dict, write_run_file
from mt_osft import residual_bound, trainable_rank

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/: the shared model maker
from random_model import SHAPES, make_model, make_sft_data  # noqa: E402

RATIO = 0.25
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def frozen_directions(before: dict[str, torch.Tensor]) -> dict[str, tuple]:
    """Each target's W0 with its frozen left and right singular vectors and its singular values
    (float64, on the GPU where there is one: hundreds of SVDs at 1B), computed once for every
    case."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    directions = {}
    for name, w0 in before.items():
        if name.split(".")[-2] not in TARGETS:
            continue
        w0 = w0.to(device, torch.float64)
        u, s, vh = torch.linalg.svd(w0, full_matrices=False)
        frozen = s.numel() - trainable_rank(s.numel(), RATIO)
        directions[name] = (w0, u[:, :frozen], vh[:frozen], frozen, s)
    return directions


def worst_residual(directions: dict[str, tuple], after: dict[str, torch.Tensor]) -> float:
    """The largest frozen residual over the targets, each as a share of its rounding bound."""
    worst = 0.0
    for name, (w0, u_frozen, vh_frozen, frozen, s) in directions.items():
        w = after[name].to(w0.device, torch.float64)
        delta = w - w0
        norm = float(delta.norm())
        if norm == 0.0:
            raise AssertionError(f"{name} did not move")
        left = float((u_frozen.T @ delta).norm()) / norm
        right = float((delta @ vh_frozen.T).norm()) / norm
        bound = residual_bound(w0, w, frozen, torch.float32, singular_values=s)
        worst = max(worst, max(left, right) / bound)
    return worst


def largest_difference(case: dict, reference: dict) -> float:
    pairs = zip(case["losses"], reference["losses"], strict=True)
    return max(abs(a - b) / abs(b) for a, b in pairs)


def run(work: Path, out: Path, name: str, keys: dict, nproc: int) -> dict:
    """``mt run`` of ``keys`` on ``nproc`` processes; its metrics and exported weights."""
    output_dir = work / name
    run_file = out / f"{name}.toml"
    write_run_file(args_from_dict({**keys, "output_dir": str(output_dir)}), run_file)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "mt", "run", str(run_file)]  # fmt: skip
    print(f"== {name}", flush=True)
    with (out / f"{name}.log").open("w") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = (out / f"{name}.log").read_text().splitlines()[-3:]
        return {"name": name, "error": f"exit {code}: {' | '.join(tail)}"}
    lines = [json.loads(x) for x in (output_dir / "metrics.jsonl").read_text().splitlines()]
    (export,) = (output_dir / "hf_format").iterdir()
    return {
        "name": name,
        "losses": [x["loss"] for x in lines],
        "step_s": statistics.median(x["step_time_s"] for x in lines[2:] or lines),
        "peak_gib": max(x.get("peak_mem_gib", 0.0) for x in lines),
        "weights": weights(export),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shape", default="mid", choices=sorted(SHAPES))
    parser.add_argument("--ranks", type=int, default=torch.cuda.device_count(),
                        help="the second process count besides 1 (default: every GPU)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=4096, help="max_tokens_per_gpu")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "work"
    model = make_model(work / "model", args.shape)
    vocab = SHAPES[args.shape][1]["vocab_size"]
    data = make_sft_data(work / "data.jsonl", 64 * args.steps, vocab, args.tokens,
                         mean=min(600, args.tokens // 4))  # fmt: skip
    keys = dict(
        model_name_or_path=str(model), data_path=str(data), batch_size=16,
        max_tokens_per_gpu=args.tokens, learning_rate=1e-4, lr_scheduler="constant",
        training_mode="step", max_steps=args.steps, osft=True, osft_unfreeze_rank_ratio=RATIO,
        save_dtype="float32", checkpoint_every_steps=None, seed=0,
    )  # fmt: skip
    counts = [1] + ([args.ranks] if args.ranks > 1 else [])
    pairs = []  # (the case without cpu_offload, the case with it), for each process count
    for nproc in counts:
        plain = run(work, args.out, f"{nproc}gpu_plain", {**keys, "cpu_offload": False}, nproc)
        offload = run(work, args.out, f"{nproc}gpu_cpu_offload", {**keys, "cpu_offload": True},
                      nproc)  # fmt: skip
        pairs.append((plain, offload))
    machine = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"\nOSFT ratio {RATIO}, shape {args.shape}, {args.steps} steps of batch 16, "
          f"{args.tokens}-token rows; {machine}")  # fmt: skip
    print("| case | s/step | peak GiB | loss rel. diff |\n|---|---|---|---|")
    for plain, offload in pairs:
        for case in (plain, offload):
            if "error" in case:
                print(f"| {case['name']} | failed: {case['error']} | | |")
                continue
            differs = "n/a" if "error" in plain else f"{largest_difference(case, plain):.1e}"
            print(f"| {case['name']} | {case['step_s']:.3f} | {case['peak_gib']:.2f} | {differs} |",
                  flush=True)  # fmt: skip
    # after the runs (the directions would take GPU memory from them), and after the table
    # above: at 1B the SVDs take minutes
    directions = frozen_directions(weights(model))
    print("\n| case | frozen residual / bound |\n|---|---|")
    for case in (case for pair in pairs for case in pair if "error" not in case):
        print(f"| {case['name']} | {worst_residual(directions, case['weights']):.2e} |", flush=True)


if __name__ == "__main__":
    main()
