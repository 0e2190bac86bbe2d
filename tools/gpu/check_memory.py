"""How close is ``mt check``'s memory estimate to the peak a real run measures? One GPU.

On the GPU machine (see shared/GPU.md), from the repository root:

    python3 tools/gpu/check_memory.py --out $OUT                    # 1B and 3B Llama shapes
    python3 tools/gpu/check_memory.py --shapes tiny --device cpu --out /tmp/cm   # a dry run

For each shape a random-init model is written (bf16, from config, in --out), then each case runs
``mt_core.train`` (what ``mt run`` calls) for a few steps on data of fixed-length samples, so that
every step is exactly one minibatch of max_tokens_per_gpu tokens: the case ``mt check`` plans for.
The measured peak is the trainer's own ``peak_mem_gib`` (torch.cuda.max_memory_allocated, the
largest over the steps: from step 2 on the AdamW state exists); the estimate is
``mt_core.plan.memory.estimate`` for the same shape and settings, exactly what ``mt check`` prints. The
table gives both and the error (estimate - measured) / measured; the goal is within 15%.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig

from mt_core import args_from_dict, train
from mt_core.plan.memory import GIB, Settings, estimate
from mt_core.plan.shape import model_shape

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/: the shared model maker
from random_model import SHAPES, make_model  # noqa: E402

# (shape, Liger, activation checkpointing, max_tokens_per_gpu)
CASES = (
    ("llama-3.2-1b", True, False, 16384),
    ("llama-3.2-1b", True, True, 16384),
    ("llama-3.2-1b", False, False, 8192),
    ("llama-3.2-3b", True, True, 16384),
    ("llama-3.2-3b", True, False, 4096),
    ("tiny", False, False, 1024),
    ("tiny", False, True, 1024),
)
SAMPLES_PER_STEP = 8


def make_data(path: Path, max_tokens: int, vocab: int, steps: int) -> None:
    """Samples of max_tokens / 8 tokens: 8 of them fill one minibatch exactly."""
    rng = np.random.default_rng(0)
    length = max_tokens // SAMPLES_PER_STEP
    with path.open("w") as out:
        for _ in range(SAMPLES_PER_STEP * steps):
            tokens = rng.integers(0, vocab, length).tolist()
            labels = [-100] * (length // 10) + tokens[length // 10 :]
            out.write(json.dumps({"input_ids": tokens, "labels": labels}) + "\n")


def measure(folder: Path, data: Path, out: Path, liger: bool, ac: bool, max_tokens: int,
            steps: int, device: str) -> float:  # fmt: skip
    args = args_from_dict(
        dict(
            model_name_or_path=str(folder), data_path=str(data), output_dir=str(out),
            batch_size=SAMPLES_PER_STEP, max_tokens_per_gpu=max_tokens, learning_rate=1e-5,
            lr_scheduler="constant", training_mode="step", max_steps=steps,
            save_final_checkpoint=False, use_liger_kernels=liger, activation_checkpointing=ac,
            attn_backend="auto" if device == "cuda" else "sdpa",
        )
    )  # fmt: skip
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    train(args)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(line["tokens"] == max_tokens for line in lines), "every step should be one full row"
    assert all(line["num_minibatches"] == 1 for line in lines)
    return max(line["peak_mem_gib"] for line in lines)


def one_case(spec: str) -> int:
    """Run one case in this (fresh) process and print its measured peak as the last line.

    Each case gets a process of its own: the peak counter starts clean, and Liger's patches of
    module-level functions (applied for one case) cannot leak into the next."""
    case = json.loads(spec)
    peak = measure(Path(case["folder"]), Path(case["data"]), Path(case["run_dir"]), case["liger"],
                   case["ac"], case["max_tokens"], case["steps"], case["device"])  # fmt: skip
    print(json.dumps({"measured_gib": peak}), flush=True)
    return 0


def run_case(case: dict) -> float:
    command = [sys.executable, __file__, "--one-case", json.dumps(case)]
    result = subprocess.run(command, capture_output=True, text=True)
    log = Path(case["run_dir"] + ".log")
    log.write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise RuntimeError(
            f"exit {result.returncode}: {result.stderr.strip().splitlines()[-1:]} (log {log})"
        )
    return json.loads(result.stdout.strip().splitlines()[-1])["measured_gib"]


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--one-case":
        return one_case(sys.argv[2])
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="llama-3.2-1b,llama-3.2-3b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=3)
    options = parser.parse_args()
    shapes = options.shapes.split(",")
    options.out.mkdir(parents=True, exist_ok=True)
    if options.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        print(f"{props.name}: total_memory {props.total_memory / GIB:.2f} GiB", flush=True)
    rows = []
    for shape in shapes:
        folder = options.out / f"model-{shape}"
        make_model(folder, shape, options.device)
        config = AutoConfig.from_pretrained(folder)
        dims = model_shape(config)
        for case_shape, liger, ac, max_tokens in CASES:
            if case_shape != shape:
                continue
            name = f"{shape} liger={'on' if liger else 'off'} ac={'on' if ac else 'off'} T={max_tokens}"
            print(f"== {name}", flush=True)
            data = options.out / f"data-{shape}-{max_tokens}.jsonl"
            make_data(data, max_tokens, SHAPES[shape][1]["vocab_size"], options.steps)
            run_dir = options.out / f"run-{shape}-{int(liger)}{int(ac)}-{max_tokens}"
            settings = Settings(max_tokens=max_tokens, world_size=1, liger=liger, checkpointing=ac)
            memory = estimate(dims, settings)
            try:
                measured = run_case(
                    dict(folder=str(folder), data=str(data), run_dir=str(run_dir), liger=liger,
                         ac=ac, max_tokens=max_tokens, steps=options.steps, device=options.device)
                )  # fmt: skip
            except Exception as error:  # report and go on with the other cases
                print(f"{name} failed: {error!r}", flush=True)
                rows.append({"case": name, "error": repr(error)})
                continue
            row = {
                "case": name,
                "measured_gib": measured,
                "estimate_gib": memory.peak / GIB,
                "error": memory.peak / GIB / measured - 1,
                "peak_at": memory.peak_at,
                "parts_gib": {
                    key: getattr(memory, key) / GIB
                    for key in (
                        "weights",
                        "gradients",
                        "optimizer",
                        "copies",
                        "activations",
                        "activations_end",
                        "loss",
                    )
                },  # fmt: skip
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    (options.out / "check_memory.json").write_text(json.dumps(rows, indent=1))
    print("\ncase | measured peak GiB | mt check estimate GiB | error | estimate's peak at")
    worst = 0.0
    for row in rows:
        if "error" in row and isinstance(row["error"], str):
            print(f"{row['case']} | FAILED: {row['error'][:100]}")
            continue
        worst = max(worst, abs(row["error"]))
        print(f"{row['case']} | {row['measured_gib']:.2f} | {row['estimate_gib']:.2f} | "
              f"{row['error']:+.1%} | {row['peak_at']}")  # fmt: skip
    print(f"largest error {worst:.1%} (goal: within 15%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
