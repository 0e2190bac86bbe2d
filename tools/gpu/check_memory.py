"""How close is ``mt check``'s memory estimate to the peak a real run measures? One GPU.

On the GPU machine (see shared/GPU.md), from the repository root:

    python3 tools/gpu/check_memory.py --out $OUT                    # 1B and 3B Llama shapes
    python3 tools/gpu/check_memory.py --osft --out $OUT             # OSFT at 8B and 1B (issue #27)
    python3 tools/gpu/check_memory.py --budgets 0.2,0.4,0.6,0.8,1 --shapes llama-3.2-1b --out $OUT
    python3 tools/gpu/check_memory.py --shapes tiny --device cpu --out /tmp/cm   # a dry run

For each shape a random-init model is written (bf16, from config, in --out), then each case runs
``mt_core.train`` (what ``mt run`` calls) for a few steps on data of fixed-length samples, so that
every step is exactly one minibatch of max_tokens_per_gpu tokens (two for the --osft cases: the
second starts its backward pass with the first one's gradients alive): the case ``mt check``
plans for.
The measured peak is the trainer's own ``peak_mem_gib`` (torch.cuda.max_memory_allocated, the
largest over the steps: from step 2 on the AdamW state exists); the estimate is
``mt_core.plan.memory.estimate`` for the same shape and settings, exactly what ``mt check`` prints. The
table gives both and the error (estimate - measured) / measured; the goal is within 15% (issue #8), within 3% for OSFT (issue #27: --osft).

``--budgets``: compiled blocks at each of these activation memory budgets, full fine-tuning and
OSFT (ratio 0.25) on each shape, 16k tokens, Liger on: the check of the memory model's
compiled-activation term (mt_core.plan.memory.compiled_bytes_per_token_layer). Each row also
gives the share s of ``c·h + s·(a - c·h)`` that the compiled blocks kept by the measured peak,
taking every other term of the estimate as it is, beside the share the model counts.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig

from mt_core import args_from_dict, train
from mt_core.plan.memory import GIB, compiled_share, estimate, kept_activation_share
from mt_core.plan.resolve import Machine, resolve
from mt_core.plan.room import gpu_room
from mt_core.plan.shape import run_shape

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/: the shared model maker
from random_model import SHAPES, make_model  # noqa: E402


@dataclass(frozen=True)
class Case:
    shape: str
    liger: bool
    ac: bool  # activation checkpointing
    max_tokens: int
    extra: dict = field(default_factory=dict)  # more run-file keys
    rows: int = 1  # full minibatches per step: from 2 on, later ones start with gradients alive


CASES = (
    Case("llama-3.2-1b", True, False, 16384),
    Case("llama-3.2-1b", True, True, 16384),
    Case("llama-3.2-1b", False, False, 8192),
    Case("llama-3.2-3b", True, True, 16384),
    Case("llama-3.2-3b", True, False, 4096),
    Case("tiny", False, False, 1024),
    Case("tiny", False, True, 1024),
    Case("tiny", False, True, 1024, {"osft": True, "osft_reference_on_host": True}),
)
# --osft: issue #27's runs, two full rows a step (the case its plans are made for: the second
# row's backward pass starts with the first one's gradients alive), the fit choosing as for a
# run: 8B with bfloat16 master weights and moments, its default plan and the lean one
# (activation checkpointing: W0 in host memory), and 1B with the defaults
EIGHT_B = {
    "train_dtype": "bfloat16",
    "stochastic_rounding": True,
    "optimizer_state_dtype": "bfloat16",
    "osft": True,
    "osft_unfreeze_rank_ratio": 0.25,
}
OSFT_CASES = (
    Case("llama-3.1-8b", True, False, 16384, EIGHT_B, rows=2),
    Case("llama-3.1-8b", True, True, 16384, EIGHT_B, rows=2),
    Case("llama-3.2-1b", True, False, 16384, {"osft": True, "osft_unfreeze_rank_ratio": 0.25},
         rows=2),
)  # fmt: skip
SAMPLES_PER_ROW = 8


def budget_cases(shapes: list[str], budgets: list[float], liger: bool) -> list[Case]:
    """--budgets: full fine-tuning and OSFT 0.25 at each activation budget, compiled blocks."""
    osft = {"osft": True, "osft_unfreeze_rank_ratio": 0.25}
    return [Case(shape, liger, False, 16384, {"activation_memory_budget": budget, **extra})
            for shape in shapes for extra in ({}, osft) for budget in budgets]  # fmt: skip


def make_data(path: Path, max_tokens: int, vocab: int, samples: int) -> None:
    """``samples`` samples of max_tokens / 8 tokens: 8 of them fill one minibatch exactly."""
    rng = np.random.default_rng(0)
    length = max_tokens // SAMPLES_PER_ROW
    with path.open("w") as out:
        for _ in range(samples):
            tokens = rng.integers(0, vocab, length).tolist()
            labels = [-100] * (length // 10) + tokens[length // 10 :]
            out.write(json.dumps({"input_ids": tokens, "labels": labels}) + "\n")


def run_keys(case: Case, folder: Path, data: Path, out: Path, steps: int, device: str) -> dict:
    """The run file of one case: every step ``case.rows`` full minibatches of max_tokens."""
    return dict(
        model_name_or_path=str(folder), data_path=str(data), output_dir=str(out),
        batch_size=SAMPLES_PER_ROW * case.rows, max_tokens_per_gpu=case.max_tokens,
        learning_rate=1e-5, lr_scheduler="constant", training_mode="step", max_steps=steps,
        save_final_checkpoint=False, use_liger_kernels=case.liger,
        activation_checkpointing=case.ac, attn_backend="auto" if device == "cuda" else "sdpa",
        **case.extra,
    )  # fmt: skip


def measure(keys: dict) -> float:
    args = args_from_dict(keys)
    max_tokens = args.max_tokens_per_gpu
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    train(args)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    lines = [
        json.loads(x) for x in (Path(args.output_dir) / "metrics.jsonl").read_text().splitlines()
    ]
    rows = args.batch_size // SAMPLES_PER_ROW
    assert all(line["tokens"] == rows * max_tokens for line in lines), "every row should be full"
    assert all(line["num_minibatches"] == rows for line in lines)
    return max(line["peak_mem_gib"] for line in lines)


def one_case(spec: str) -> int:
    """Run one case in this (fresh) process and print its measured peak as the last line.

    Each case gets a process of its own: the peak counter starts clean, and Liger's patches of
    module-level functions (applied for one case) cannot leak into the next."""
    peak = measure(json.loads(spec)["keys"])
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
    parser.add_argument("--osft", action="store_true", help="the OSFT cases (8B and 1B) instead")
    parser.add_argument("--budgets", help="comma-separated activation budgets: that sweep instead")
    options = parser.parse_args()
    cases = OSFT_CASES if options.osft else CASES
    if options.budgets:
        budgets = [float(b) for b in options.budgets.split(",")]
        cases = budget_cases(options.shapes.split(","), budgets, options.device == "cuda")
    shapes = options.shapes.split(",") if not options.osft else ["llama-3.1-8b", "llama-3.2-1b"]
    options.out.mkdir(parents=True, exist_ok=True)
    if options.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        print(f"{props.name}: total_memory {props.total_memory / GIB:.2f} GiB", flush=True)
    rows = []
    for shape in shapes:
        folder = options.out / f"model-{shape}"
        if not (folder / "config.json").is_file():  # (one made by an earlier call is reused)
            make_model(folder, shape, options.device)
        config = AutoConfig.from_pretrained(folder)
        for index, case in enumerate(cases):
            if case.shape != shape:
                continue
            name = (f"{shape} liger={'on' if case.liger else 'off'} "
                    f"ac={'on' if case.ac else 'off'} T={case.max_tokens}"
                    + (f" rows={case.rows}" if case.rows > 1 else ""))  # fmt: skip
            name += "".join(f" {key}={value}" for key, value in case.extra.items())
            print(f"== {name}", flush=True)
            samples = SAMPLES_PER_ROW * case.rows * options.steps
            data = options.out / f"data-{shape}-{case.max_tokens}-{samples}.jsonl"
            make_data(data, case.max_tokens, SHAPES[shape][1]["vocab_size"], samples)
            run_dir = options.out / f"run-{shape}-{index}"
            keys = run_keys(case, folder, data, run_dir, options.steps, options.device)
            # the estimate of mt check and the trainer's fit: its plan for this GPU (activation
            # budget, blocks kept gathered, W0 on the host), from the same keys and functions
            args = args_from_dict(keys)
            room = gpu_room(torch.device("cuda"), 1)[0] if options.device == "cuda" else None
            machine = Machine(gpu=options.device == "cuda", world_size=1,
                              liger_installed=case.liger, attention_backends=("sdpa",),
                              gpu_bytes=room)  # fmt: skip
            lengths = np.full(samples, case.max_tokens // SAMPLES_PER_ROW)
            plan = resolve(args, config, machine, lengths, warn=False)
            dims = plan.shape or run_shape(config, args)
            memory = estimate(dims, plan.settings)
            print(f"   plan: {plan.describe()}", flush=True)
            try:
                measured = run_case(dict(keys=keys, run_dir=str(run_dir)))
            except Exception as error:  # report and go on with the other cases
                print(f"{name} failed: {error!r}", flush=True)
                rows.append({"case": name, "error": repr(error)})
                continue
            # the share of the activations the measured peak implies, every other term as
            # estimated (None under activation checkpointing: nothing for the compiler to keep)
            implied = kept_activation_share(dims, plan.settings, measured * GIB)
            counted = plan.settings.compiled and not plan.settings.checkpointing
            row = {
                "case": name,
                "implied_share": implied,
                "counted_share": compiled_share(dims, plan.settings.activation_budget)
                if counted
                else None,
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
                        "osft",
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
    print("\ncase | measured peak GiB | mt check estimate GiB | error | estimate's peak at | "
          "share kept: implied / counted")  # fmt: skip
    worst = 0.0
    for row in rows:
        if "error" in row and isinstance(row["error"], str):
            print(f"{row['case']} | FAILED: {row['error'][:100]}")
            continue
        worst = max(worst, abs(row["error"]))
        shares = "-"
        if row["implied_share"] is not None:
            shares = f"{row['implied_share']:.2f} / {row['counted_share']:.2f}"
        print(f"{row['case']} | {row['measured_gib']:.2f} | {row['estimate_gib']:.2f} | "
              f"{row['error']:+.1%} | {row['peak_at']} | {shares}")  # fmt: skip
    print(f"largest error {worst:.1%} (goal: within {3 if options.osft else 15}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
