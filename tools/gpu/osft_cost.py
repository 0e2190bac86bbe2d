"""What OSFT costs: step time, tokens/s, peak memory and SVD start-up vs full fine-tuning.

On the GPU machine (see shared/GPU.md), from the repository root:

    python3 tools/gpu/osft_cost.py --out $OUT                      # Llama-3.2-1B shape, one GPU
    uv run python tools/gpu/osft_cost.py --shape tiny --device cpu --out /tmp/oc   # dry run
    uv run python tools/gpu/osft_cost.py --shape mid --device cpu --out /tmp/oc    # CPU figures

One random-init model folder (bf16 on disk) and one synthetic SFT mix (log-normal lengths as in
tools/gpu/first_run.py, a prompt share masked); each contestant runs ``mt_core.train`` (what
``mt run`` calls) for a few steps with the same data order: full fine-tuning, then OSFT at each
ratio. Every contestant runs in a fresh child process, so peak memory is its own (GPU: torch's
peak allocated; CPU: the process's peak RSS, which includes ~0.8 GB of imports).

Figures: median step time and tokens/s of steps 2..N (step 1 is warm-up) and peak memory from
the trainer's metrics.jsonl; "start-up" is the wall time of ``train()`` minus its steps (model
build and load, data, OSFT set-up); "OSFT set-up" is the wall time of mt's OSFT set-up
(``setup_osft``: SVDs, bases, W0), and "SVD" is the time OSFT itself reports for its SVDs (also
in the ``OSFT: ... SVDs x s`` log line).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/: the shared model maker
from random_model import SHAPES, make_model, make_sft_data  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import memory_peak  # noqa: E402

# Defaults per shape: batch_size, max_tokens_per_gpu, mean sample length, steps.
DEFAULTS = {
    "llama-3.1-8b": (32, 16384, 600, 6),
    "llama-3.2-1b": (32, 16384, 600, 6),
    "mid": (8, 4096, 256, 6),
    "tiny": (4, 2048, 128, 3),
}


# ---------------------------------------------------------------- one contestant (child process)


def child(spec_path: Path) -> None:
    """Run one contestant as the spec says; write its figures beside the spec."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    spec = json.loads(spec_path.read_text())
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    import mt_core.trainer.setup as trainer_setup
    from mt_core import args_from_dict, train

    osft_timing = {}
    setup_osft = trainer_setup.setup_osft

    def timed_setup_osft(*args, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        state = setup_osft(*args, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if state is not None:
            osft_timing["setup_s"] = time.perf_counter() - started
            osft_timing["svd_s"] = state.svd_seconds
            osft_timing["targets"] = len(state.targets)
            osft_timing["frozen_directions"] = sum(row["n_frozen"] for row in state.summary())
        return state

    trainer_setup.setup_osft = timed_setup_osft  # time mt's own OSFT set-up inside train()
    profile = spec["memory_profile"] and torch.cuda.is_available()
    if profile:
        memory_peak.record()
    started = time.perf_counter()
    try:
        train(args_from_dict(spec["keys"]))
    finally:  # an out-of-memory run too: its breakdown says what filled the GPU
        if profile:
            text = memory_peak.breakdown(torch.cuda.memory._snapshot())
            spec_path.with_suffix(".memory.txt").write_text(text + "\n")
    wall = time.perf_counter() - started
    output_dir = Path(spec["keys"]["output_dir"])
    lines = [json.loads(x) for x in (output_dir / "metrics.jsonl").read_text().splitlines()]
    later = lines[1:] or lines
    result = {
        "name": spec["name"],
        "steps": len(lines),
        "losses": [x["loss"] for x in lines],
        "step_time_s": statistics.median(x["step_time_s"] for x in later),
        "step_times_s": [x["step_time_s"] for x in lines],
        "tokens_per_s_per_gpu": statistics.median(x["tokens_per_s_per_gpu"] for x in later),
        "peak_mem_gib": max(x["peak_mem_gib"] for x in lines),
        "wall_s": wall,
        "startup_s": wall - sum(x["step_time_s"] for x in lines),
        **osft_timing,
    }
    spec_path.with_suffix(".result.json").write_text(json.dumps(result, indent=1))


# ---------------------------------------------------------------- the comparison (parent)


def run_contestant(name: str, keys: dict, out: Path, threads: int, memory_profile: bool) -> dict:
    spec_path = out / f"{name}.spec.json"
    spec = {"name": name, "keys": keys, "threads": threads, "memory_profile": memory_profile}
    spec_path.write_text(json.dumps(spec))
    print(f"== {name}", flush=True)
    with (out / f"{name}.log").open("w") as log:
        code = subprocess.call(
            [sys.executable, __file__, "--child", str(spec_path)], stdout=log, stderr=log
        )
    if spec_path.with_suffix(".memory.txt").exists():
        print(spec_path.with_suffix(".memory.txt").read_text(), flush=True)
    if code != 0:
        tail = (out / f"{name}.log").read_text()[-2000:]
        print(tail, flush=True)
        return {"name": name, "error": f"exit code {code}, log {out / f'{name}.log'}"}
    for line in (out / f"{name}.log").read_text().splitlines():
        if "OSFT:" in line:
            print("   ", line.strip(), flush=True)
    return json.loads(spec_path.with_suffix(".result.json").read_text())


def machine(device: str) -> str:
    if device == "cuda" and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--shape", default="llama-3.2-1b", choices=sorted(DEFAULTS))
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--ratios", default="0.25,0.5", help="OSFT unfreeze ratios")
    parser.add_argument("--steps", type=int, help="default: 6 (tiny: 3)")
    parser.add_argument("--batch-size", type=int, help="default: 32 (mid 8, tiny 4)")
    parser.add_argument("--max-tokens", type=int, help="default: 16384 (mid 4096, tiny 2048)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    parser.add_argument("--extra", default="{}", help="more run-file keys for every contestant")
    parser.add_argument(
        "--variants",
        default='{"": {}}',
        help='JSON {"suffix": {keys}}: every contestant once per variant (e.g. with and without '
        "activation checkpointing), named contestant_suffix",
    )
    parser.add_argument("--no-full", action="store_true", help="OSFT contestants only")
    parser.add_argument(
        "--memory-profile",
        action="store_true",
        help="CUDA: what is alive at each contestant's peak, by the code that made it "
        "(tools/gpu/memory_peak.py; slower steps)",
    )
    options = parser.parse_args()
    if options.child is not None:
        child(options.child)
        return 0
    if options.out is None:
        parser.error("--out is required")
    if options.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: use --device cpu (e.g. --shape tiny --device cpu)")
    batch_size, max_tokens, mean_len, steps = DEFAULTS[options.shape]
    batch_size = options.batch_size or batch_size
    max_tokens = options.max_tokens or max_tokens
    steps = options.steps or steps

    out = options.out
    out.mkdir(parents=True, exist_ok=True)
    folder, data = out / "model", out / "data.jsonl"
    started = time.perf_counter()
    if not (folder / "config.json").exists():  # a later call on the same --out reuses it
        make_model(folder, options.shape, options.device)
    vocab = SHAPES[options.shape][1]["vocab_size"]
    make_sft_data(data, max(256, 4 * batch_size * steps), vocab, min(8192, max_tokens), mean_len)
    print(f"model and data in {time.perf_counter() - started:.0f} s", flush=True)

    keys = dict(
        model_name_or_path=str(folder), data_path=str(data), batch_size=batch_size,
        max_tokens_per_gpu=max_tokens, learning_rate=1e-5, lr_scheduler="constant",
        training_mode="step", max_steps=steps, seed=1, save_final_checkpoint=False,
        resume="off", **json.loads(options.extra),
    )  # fmt: skip
    if options.device == "cpu":
        keys.setdefault("attn_backend", "sdpa")
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the children too
    kinds = [] if options.no_full else [("full_ft", {})]
    kinds += [
        (f"osft_{ratio}", dict(osft=True, osft_unfreeze_rank_ratio=float(ratio)))
        for ratio in options.ratios.split(",")
    ]

    def named(name: str, suffix: str) -> str:
        return "_".join(filter(None, (name, suffix)))

    contestants = [  # (name, keys, the full fine-tuning run it is compared with)
        (named(name, suffix), {**extra, **variant}, named("full_ft", suffix))
        for suffix, variant in json.loads(options.variants).items()
        for name, extra in kinds
    ]
    results, by_name = [], {}
    for name, extra, _ in contestants:
        keys_of = {**keys, **extra, "output_dir": str(out / name)}
        results.append(run_contestant(name, keys_of, out, options.threads, options.memory_profile))
        by_name[name] = results[-1]

    print(
        f"\n{machine(options.device)}; shape {options.shape}, batch {batch_size} samples, "
        f"max_tokens_per_gpu {max_tokens}, {steps} steps (median of steps 2..{steps})"
    )
    print(
        "contestant | step s | vs full | tokens/s/GPU | peak GiB | vs full | start-up s | "
        "OSFT set-up s | SVD s | targets / frozen directions | loss step 1 -> last"
    )
    print("---|---|---|---|---|---|---|---|---|---|---")
    failures = 0
    for r, (_, _, full) in zip(results, contestants, strict=True):
        base = by_name.get(full)
        base = None if base is None or "error" in base else base
        if "error" in r:
            print(f"{r['name']} | FAILED: {r['error']}")
            failures += 1
            continue
        speed = f"{r['step_time_s'] / base['step_time_s']:.2f}x" if base else "-"
        memory = f"{r['peak_mem_gib'] - base['peak_mem_gib']:+.2f}" if base else "-"
        osft = (
            f"{r['setup_s']:.2f} | {r['svd_s']:.2f} | {r['targets']} / {r['frozen_directions']:,}"
            if "setup_s" in r
            else "- | - | -"
        )
        print(
            f"{r['name']} | {r['step_time_s']:.3f} | {speed} | {r['tokens_per_s_per_gpu']:,.0f} | "
            f"{r['peak_mem_gib']:.2f} | {memory} | {r['startup_s']:.1f} | {osft} | "
            f"{r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}"
        )
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
