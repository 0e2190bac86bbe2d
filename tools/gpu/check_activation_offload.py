"""Activation offloading on one GPU: peak memory, speed and losses with and without it.

On the GPU machine (see shared/GPU.md), from the repository root:

    python3 tools/gpu/check_activation_offload.py --out $OUT              # 1B shape, 16k rows
    python3 tools/gpu/check_activation_offload.py --shape llama-3.2-3b --tokens 32768 --out $OUT
    python3 tools/gpu/check_activation_offload.py --shape tiny --tokens 1024 --device cpu \\
        --out /tmp/cao                                                  # a dry run

A random-init model of the shape is written (bf16, from config, in --out); each case runs
``mt_core.train`` (what ``mt run`` calls) for --steps steps of one full row of --tokens tokens,
in a process of its own (a clean peak counter), with activation_offload false or true and
activation checkpointing off or on (blocks compiled, as on a GPU by default). The table gives
the measured peak (``peak_mem_gib``), mt check's estimate for the same settings, tokens/s (the
median from step 3 on: the first steps compile), what one minibatch offloaded (``offloaded_gib``)
and the largest relative difference of the step losses from the same case without offload (the
same numbers go through the same kernels, though a fetched tensor's alignment may pick another
kernel variant: expect 0 or bf16 rounding, ~1e-3, no more).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig

from mt_core import args_from_dict, train
from mt_core.model.build import liger_available
from mt_core.plan.fit import choose_fit
from mt_core.plan.memory import GIB, Settings, estimate, usable_bytes
from mt_core.plan.shape import model_shape

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/: the shared model maker
from random_model import SHAPES, make_model  # noqa: E402

SAMPLES_PER_STEP = 8
# (activation checkpointing, activation offload)
CASES = ((False, False), (False, True), (True, False), (True, True))


def make_data(path: Path, max_tokens: int, vocab: int, steps: int) -> None:
    """Samples of max_tokens / 8 tokens: 8 of them fill one minibatch exactly."""
    rng = np.random.default_rng(0)
    length = max_tokens // SAMPLES_PER_STEP
    with path.open("w") as out:
        for _ in range(SAMPLES_PER_STEP * steps):
            tokens = rng.integers(0, vocab, length).tolist()
            out.write(json.dumps({"input_ids": tokens, "labels": tokens}) + "\n")


def one_case(spec: str) -> int:
    """Train one case in this (fresh) process; print its metrics lines as the last line."""
    case = json.loads(spec)
    cuda = case["device"] == "cuda"
    args = args_from_dict(
        dict(
            model_name_or_path=case["folder"], data_path=case["data"], output_dir=case["run_dir"],
            batch_size=SAMPLES_PER_STEP, max_tokens_per_gpu=case["tokens"], learning_rate=1e-5,
            lr_scheduler="constant", training_mode="step", max_steps=case["steps"],
            save_final_checkpoint=False, activation_checkpointing=case["ac"],
            activation_offload=case["offload"], attn_backend="auto" if cuda else "sdpa",
            torch_compile=cuda, use_liger_kernels=case["liger"],
        )
    )  # fmt: skip
    train(args)
    metrics = Path(case["run_dir"]) / "metrics.jsonl"
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    print(json.dumps(lines), flush=True)
    return 0


def run_case(case: dict) -> list[dict]:
    command = [sys.executable, __file__, "--one-case", json.dumps(case)]
    result = subprocess.run(command, capture_output=True, text=True)
    log = Path(case["run_dir"] + ".log")
    log.write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise RuntimeError(f"exit {result.returncode}: {result.stderr.strip()[-300:]} (log {log})")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--one-case":
        return one_case(sys.argv[2])
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, required=True)
    options = parser.parse_args()
    options.out.mkdir(parents=True, exist_ok=True)
    cuda = options.device == "cuda"
    liger = cuda and liger_available()  # as the trainer chooses it
    if cuda:
        props = torch.cuda.get_device_properties(0)
        print(f"{props.name}: total_memory {props.total_memory / GIB:.2f} GiB", flush=True)
    folder = options.out / f"model-{options.shape}"
    make_model(folder, options.shape, options.device)
    dims = model_shape(AutoConfig.from_pretrained(folder))
    data = options.out / f"data-{options.tokens}.jsonl"
    make_data(data, options.tokens, SHAPES[options.shape][1]["vocab_size"], options.steps)
    rows, losses = [], {}
    for ac, offload in CASES:
        name = f"ac={'on' if ac else 'off'} offload={'on' if offload else 'off'}"
        print(f"== {options.shape} T={options.tokens} {name}", flush=True)
        run_dir = options.out / f"run-{ac:d}{offload:d}"
        case = dict(folder=str(folder), data=str(data), run_dir=str(run_dir), ac=ac,
                    offload=offload, tokens=options.tokens, steps=options.steps, liger=liger,
                    device=options.device)  # fmt: skip
        try:
            lines = run_case(case)
        except Exception as error:  # report and go on with the other cases
            print(f"{name} failed: {error!r}", flush=True)
            rows.append(f"{name} | FAILED: {str(error)[:200]}")
            continue
        losses[ac, offload] = [line["loss"] for line in lines]
        settings = Settings(max_tokens=options.tokens, world_size=1, checkpointing=ac,
                            activation_offload=offload, liger=liger, compiled=cuda)  # fmt: skip
        if cuda:  # the activation budget and gathering the trainer chose
            usable = usable_bytes(props.total_memory)
            settings = choose_fit(dims, settings, usable, budget=None).applied(settings)
        memory = estimate(dims, settings)
        speed = statistics.median(line["tokens_per_s"] for line in lines[2:] or lines)
        moved = max((line.get("offloaded_gib", 0.0) for line in lines), default=0.0)
        gap = "-"
        if offload and (ac, False) in losses:
            base = losses[ac, False]
            pairs = zip(losses[ac, offload], base, strict=True)
            gap = f"{max(abs(a - b) / abs(b) for a, b in pairs):.1e}"
        peak = max(line["peak_mem_gib"] for line in lines)
        rows.append(
            f"{name} | {peak:.2f} | {memory.peak / GIB:.2f} | {speed:,.0f} | {moved:.2f} | "
            f"{memory.host / GIB:.2f} | {gap}"
        )
        print(rows[-1], flush=True)
    blocks = "compiled blocks" if cuda else "eager blocks"
    print(f"\n{options.shape}, {options.tokens} tokens per step, {options.steps} steps, "
          f"{blocks}, Liger {'on' if liger else 'off'}")  # fmt: skip
    print(
        "case | peak GiB | mt check estimate GiB | tokens/s | offloaded GiB per minibatch | "
        "host GiB estimated | largest loss difference from offload=off"
    )
    for row in rows:
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
