"""Tokens/s and MFU of mt's train step against the padded HF-style baseline and a dense reference.

On the GPU machine (shared/GPU.md recipe), from the repository root:

    python3 tools/bench/throughput.py --out $OUT                        # Llama-3.2-1B shape
    python3 tools/bench/throughput.py --shape llama-3.2-3b --out $OUT
    python3 tools/bench/throughput.py --shape tiny --device cpu --out /tmp/tp --steps 3   # dry run

Long samples: ``--fixed-len L`` makes every sample L tokens long (mt contestants then come from
``--extra``, with ``max_tokens_per_gpu`` = L: one sample per minibatch), e.g. issue #17's figures:

    python3 tools/bench/throughput.py --out $OUT/32k --fixed-len 32768 --batch-size 2 \
        --steps 4 --warmup 1 --only none --extra '{"mt 32k torch_varlen": {"max_tokens_per_gpu":
        32768, "attn_backend": "torch_varlen"}, "mt 32k flash_attn_4": {...}}'

One random-init model folder and one SFT length mix (log-normal, mean 600 tokens, max 8,192, a
10-60% prompt share masked; tools/random_model.py) serve every contestant, and each contestant
trains on the same global batches (mt's seeded sampler), each in a fresh process:

- ``padded``: what HF Trainer does: micro-batches padded to their longest sample with an
  attention mask, SDPA, bf16 autocast over fp32 weights, fused AdamW, gradient accumulation, at
  the largest micro-batch size that fits the longest sample.
- ``mt ...``: ``mt_core.train`` itself (what ``mt run`` calls) at each setting.
- ``dense``: the same ``mt_core.train`` on full 8,192-token rows of plain causal attention
  (``[pretraining]`` contiguous blocks): no documents to separate, the per-token ceiling.
- ``--mini-trainer``: mini_trainer 0.9.0 through its own entry point on the same model folder
  and data file (tools/bench/minitrainer.py says what is adapted).

Timing is external: a callback (named by import path, like a user's) stamps the end of every
step; the first ``--warmup`` steps (compilation) are left out. Tokens are real (non-pad) tokens.
FLOPs per token: 6N + 12 * layers * hidden * context (N = matmul weights, context = the mean
number of tokens each token attends to), counted here from the config and the batches, apart
from the trainer's own count, which metrics.jsonl must match within 3%.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TOOLS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TOOLS))  # tools/: the shared model maker
from random_model import SHAPES, make_model, make_sft_data  # noqa: E402

from mt_core import TrainerCallback  # noqa: E402

PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # datasheet dense bf16 FLOP/s
AGREEMENT = 0.03  # the trainer's own tokens/s and MFU vs this script's timing
MAX_LEN = 8192


def contestants(quick: bool) -> list[dict]:
    """Every contestant of one table: name and the mt keys (or kind) it runs with."""
    mt = [
        ("mt 16k eager", dict(max_tokens_per_gpu=16384, torch_compile=False)),
        ("mt 16k compiled", dict(max_tokens_per_gpu=16384, torch_compile=True)),
    ]
    if not quick:
        mt += [
            ("mt 8k eager", dict(max_tokens_per_gpu=8192, torch_compile=False)),
            ("mt 8k compiled", dict(max_tokens_per_gpu=8192, torch_compile=True)),
            ("mt 32k eager", dict(max_tokens_per_gpu=32768, torch_compile=False)),
            ("mt 32k compiled", dict(max_tokens_per_gpu=32768, torch_compile=True)),
            ("mt 16k compiled no-liger", dict(max_tokens_per_gpu=16384, torch_compile=True,
                                              use_liger_kernels=False)),
            ("mt 16k compiled AC", dict(max_tokens_per_gpu=16384, torch_compile=True,
                                        activation_checkpointing=True)),
            ("mt 32k compiled AC", dict(max_tokens_per_gpu=32768, torch_compile=True,
                                        activation_checkpointing=True)),
        ]  # fmt: skip
    return (
        [{"name": "padded", "kind": "padded"}]
        + [{"name": name, "kind": "mt", "keys": keys} for name, keys in mt]
        + [{"name": "dense 16k compiled", "kind": "dense",
            "keys": dict(max_tokens_per_gpu=16384, torch_compile=True)}]
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# FLOPs, counted apart from the trainer


def matmul_weights(config) -> int:
    """N: the weights that take part in a matrix multiply (the embedding lookup does not; the
    LM head does, tied or not)."""
    hidden, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    kv = config.num_key_value_heads * head_dim
    per_layer = hidden * q + 2 * hidden * kv + q * hidden + 3 * hidden * inter
    return layers * per_layer + config.vocab_size * hidden


def step_flops(config, lengths: np.ndarray) -> float:
    """Training FLOPs of one step over documents of these lengths, causal attention within each."""
    lengths = lengths.astype(np.float64)
    attention = 12.0 * config.num_hidden_layers * config.hidden_size
    return float(6.0 * matmul_weights(config) * lengths.sum()
                 + attention * (lengths * (lengths + 1) / 2).sum())  # fmt: skip


def batches(
    data: Path, batch_size: int, steps: int, seed: int, cache: Path, dense: bool = False
) -> list[np.ndarray]:
    """The sample lengths of each of the first ``steps`` global batches, as mt's sampler draws
    them (the same samples every contestant trains on); ``dense``: the contiguous blocks."""
    from mt_data import InfiniteSampler, PretrainingBlocks, SampleDataset, open_token_store

    store = open_token_store(data, cache_dir=cache)
    dataset = PretrainingBlocks(store, MAX_LEN, False) if dense else SampleDataset(store)
    sampler = iter(InfiniteSampler(len(dataset), batch_size, seed=seed))
    return [dataset.lengths[next(sampler)] for _ in range(steps)]


# ---------------------------------------------------------------------------------------------
# The contestants, each in a process of its own


class StepClock(TrainerCallback):
    """A trainer callback that collects the end of every step (this script's own timing: the
    wall clock from one step's end to the next, bookkeeping included)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self.optimizer: list[float] = []  # seconds of each optimizer step (host wall clock)

    def on_step_end(self, **info) -> None:
        self.stamps.append(info["time"])  # when the step ended, not when this thread ran

    def on_before_optimizer_step(self, **info) -> None:
        self.optimizer.append(-info["time"])

    def on_after_optimizer_step(self, **info) -> None:
        self.optimizer[-1] += info["time"]

    def on_train_end(self, **info) -> None:
        stamps = {"steps": self.stamps, "optimizer": self.optimizer}
        Path(os.environ["MT_BENCH_STAMPS"]).write_text(json.dumps(stamps))


def run_mt(spec: dict) -> dict:
    import torch
    from experiments import apply_experiments  # levers tried that mt does not have

    from mt_core import args_from_dict, train

    out = Path(spec["out"])
    keys = apply_experiments(dict(spec["keys"]))
    keys = dict(
        model_name_or_path=spec["model"], data_path=spec["data"], output_dir=str(out / "run"),
        batch_size=spec["batch_size"], learning_rate=1e-5, lr_scheduler="constant",
        training_mode="step", max_steps=spec["steps"], seed=1, save_final_checkpoint=False,
        callbacks=["throughput:StepClock"], **keys,
    )  # fmt: skip
    if spec["kind"] == "dense":
        keys["pretraining"] = {"block_size": MAX_LEN, "segment_documents": False}
    os.environ["MT_BENCH_STAMPS"] = str(out / "stamps.json")
    torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
    if spec.get("gpu_memory_gib"):
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(spec["gpu_memory_gib"] * 2**30 / total)
    if spec.get("profile"):
        from torch.profiler import ProfilerActivity, profile
        from trace_summary import summarise

        activities = [ProfilerActivity.CPU]
        activities += [ProfilerActivity.CUDA] if torch.cuda.is_available() else []
        with profile(activities=activities) as profiler:
            train(args_from_dict(keys))
        profiler.export_chrome_trace(str(out / "trace.json"))
        summary = summarise(json.loads((out / "trace.json").read_text()), spec["warmup"])
        return {"profile": summary}
    train(args_from_dict(keys))
    lines = (out / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    stamps = json.loads((out / "stamps.json").read_text())
    return {"records": records, "stamps": stamps["steps"], "optimizer_s": stamps["optimizer"],
            **allocator_stats()}  # fmt: skip


def allocator_stats() -> dict:
    """What the CUDA caching allocator went through: retries (it freed its cache and tried
    again, synchronising the device: a sign of fragmentation near the memory limit) and its
    peak reserved memory."""
    import torch

    if not torch.cuda.is_available():
        return {}
    stats = torch.cuda.memory_stats()
    return {"alloc_retries": stats.get("num_alloc_retries", 0),
            "peak_reserved_gib": stats.get("reserved_bytes.all.peak", 0) / 2**30}  # fmt: skip


def run_padded(spec: dict) -> dict:
    """HF Trainer's way: padded micro-batches, attention mask, SDPA, autocast, accumulation."""
    import torch
    from transformers import AutoModelForCausalLM

    from mt_data import InfiniteSampler, SampleDataset, open_token_store

    device = torch.device(spec["device"])
    model = AutoModelForCausalLM.from_pretrained(
        spec["model"], dtype=torch.float32, attn_implementation="sdpa"
    ).to(device)
    model.config.use_cache = False
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    dataset = SampleDataset(open_token_store(Path(spec["data"]), cache_dir=Path(spec["cache"])))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def micro_step(indices: list[int], accumulation: int) -> None:
        rows = [dataset.store.tokens(int(dataset.kept[i])).astype(np.int64) for i in indices]
        labels = [dataset.store.sample_labels(int(dataset.kept[i])).astype(np.int64)
                  for i in indices]  # fmt: skip
        width = max(len(row) for row in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        target = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (row, label) in enumerate(zip(rows, labels, strict=True)):
            ids[r, : len(row)] = torch.from_numpy(row)
            target[r, : len(row)] = torch.from_numpy(label)
            mask[r, : len(row)] = 1
        with autocast:
            loss = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                         labels=target.to(device)).loss  # fmt: skip
        (loss / accumulation).backward()

    # the largest micro-batch size whose worst case (the longest sample, repeated) fits beside
    # the gradients and the optimizer state that a training step holds
    shortest, longest = int(np.argmin(dataset.lengths)), int(np.argmax(dataset.lengths))
    micro_step([shortest], 1)
    optimizer.step()  # allocates AdamW's state
    micro = None
    for size in (16, 8, 4, 2, 1):
        try:
            micro_step([shortest], 1)  # gradients exist while a step accumulates
            micro_step([longest] * size, 1)
            micro = size
            break
        except torch.OutOfMemoryError:
            pass
        finally:
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache() if device.type == "cuda" else None
    if micro is None:
        raise RuntimeError("even one sample of the longest length does not fit")

    def padded_steps(micro: int) -> list[float]:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sampler = iter(InfiniteSampler(len(dataset), spec["batch_size"], seed=1))
        stamps = []
        for _ in range(spec["steps"]):
            batch = [int(i) for i in next(sampler)]
            groups = [batch[i : i + micro] for i in range(0, len(batch), micro)]
            for group in groups:
                micro_step(group, len(groups))
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
        return stamps

    while True:  # the probe's worst case fits, yet a real step can still fragment its way out
        try:
            stamps = padded_steps(micro)
            break
        except torch.OutOfMemoryError:
            if micro == 1:
                raise
            micro //= 2
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache() if device.type == "cuda" else None
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"stamps": stamps, "micro_batch": micro, "peak_mem_gib": peak}


def child(spec_file: Path) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("mt_core").setLevel(logging.INFO)  # the trainer's choices, in log.txt
    spec = json.loads(spec_file.read_text())
    if spec["kind"] == "mini_trainer":
        from minitrainer import run_mini_trainer

        result = run_mini_trainer(spec)
    else:
        result = run_padded(spec) if spec["kind"] == "padded" else run_mt(spec)
    (Path(spec["out"]) / "result.json").write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# The table


def summarise(name: str, result: dict, lengths: list[np.ndarray], config, peak: float | None,
              warmup: int) -> dict:  # fmt: skip
    """This script's tokens/s and MFU over the steps after ``warmup``; for mt, the trainer's own
    figures over the same steps and how far they are from this script's."""
    stamps = result["stamps"]
    measured = range(warmup, len(stamps))
    seconds = stamps[-1] - stamps[warmup - 1]
    tokens = sum(int(lengths[i].sum()) for i in measured)
    flops = sum(step_flops(config, lengths[i]) for i in measured)
    if "tokens" in result:  # its own batches (mini_trainer): mt's FLOPs per token of the mix
        flops *= sum(result["tokens"][i] for i in measured) / tokens
        tokens = sum(result["tokens"][i] for i in measured)
    row = {"name": name, "tokens_per_s": tokens / seconds,
           "mfu": flops / seconds / peak if peak else None,
           "peak_mem_gib": result.get("peak_mem_gib"), "micro_batch": result.get("micro_batch"),
           "alloc_retries": result.get("alloc_retries"),
           "peak_reserved_gib": result.get("peak_reserved_gib"),
           "step_s": list(np.diff(stamps[warmup - 1:]))}  # fmt: skip
    if result.get("optimizer_s"):  # the optimizer step's share (its host time, all of it on CPU)
        row["optimizer_s"] = float(np.mean([result["optimizer_s"][i] for i in measured]))
    records = result.get("records")
    if records:
        steps = [records[i] for i in measured]
        step_time = sum(r["step_time_s"] for r in steps)
        own_tokens = sum(r["tokens"] for r in steps)
        row["own_tokens_per_s"] = own_tokens / step_time
        if own_tokens != tokens:  # the sampler draws other batches than the trainer trained on
            row["batch_mismatch"] = (own_tokens, tokens)
        if peak:
            row["own_mfu"] = sum(r["mfu"] * r["step_time_s"] for r in steps) / step_time
        row["peak_mem_gib"] = max(r["peak_mem_gib"] for r in records)
        row["losses"] = [r["loss"] for r in records]
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    parser.add_argument(
        "--layers", type=int,
        help="the shape with this many decoder blocks (all: default); the model folder in --out "
        "is made once, so give each count its own --out",
    )  # fmt: skip
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, help="folder for the model, data and logs (required)")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per contestant")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of timing")
    parser.add_argument("--batch-size", type=int, default=128, help="samples per step")
    parser.add_argument("--quick", action="store_true", help="padded, mt 16k eager/compiled, dense")
    parser.add_argument("--only", help="comma-separated contestant names to run")
    parser.add_argument("--fixed-len", type=int, help="every sample this many tokens long")
    parser.add_argument(
        "--extra",
        help="more mt contestants (JSON: name -> keys), e.g. "
        '\'{"mt 32k bf16": {"max_tokens_per_gpu": 32768, '
        '"train_dtype": "bfloat16"}}\'; an "env" key holds environment variables for that '
        'contestant\'s process, a "gpu_memory_gib" key caps what its process may allocate on '
        "the GPU (as on a smaller one: the caching allocator gives back its cache and retries "
        "before it fails); experiment keys: see experiments.py",
    )
    parser.add_argument(
        "--mini-trainer",
        help="mini_trainer 0.9.0 contestants (JSON: name -> its own flags), e.g. "
        '\'{"mini_trainer 16k": {"max-tokens-per-gpu": 16384}}\' (tools/bench/minitrainer.py)',
    )
    parser.add_argument(
        "--profile",
        help="also profile mt with these keys (JSON), e.g. "
        '\'{"max_tokens_per_gpu": 16384, "torch_compile": true}\'',
    )
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        child(options.child)
        return 0
    if options.out is None:
        parser.error("--out is required")

    from transformers import AutoConfig

    out = options.out
    out.mkdir(parents=True, exist_ok=True)
    folder, data = out / "model", out / "data.jsonl"
    if not (folder / "config.json").is_file():
        make_model(folder, options.shape, options.device, layers=options.layers)
    vocab = SHAPES[options.shape][1]["vocab_size"]
    if not data.is_file():
        make_sft_data(data, options.batch_size * (options.steps + 2), vocab, MAX_LEN,
                      fixed_len=options.fixed_len)  # fmt: skip
    config = AutoConfig.from_pretrained(folder)
    if options.layers and config.num_hidden_layers != options.layers:
        parser.error(f"{folder} holds {config.num_hidden_layers} decoder blocks, not --layers "
                     f"{options.layers}: give this count its own --out")  # fmt: skip
    sft = batches(data, options.batch_size, options.steps, 1, out / "cache")
    # the dense reference trains about as many tokens per step, in full rows
    dense_blocks = max(1, int(sum(int(b.sum()) for b in sft) / len(sft) / MAX_LEN))
    dense_rows = batches(data, dense_blocks, options.steps, 1, out / "cache", dense=True)
    peak = None
    if options.device == "cuda":
        import torch

        name = torch.cuda.get_device_name()
        peak = next((value for key, value in PEAK.items() if key in name), None)

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TOOLS / "bench"),
                                                         os.environ.get("PYTHONPATH", "")]))  # fmt: skip
    rows = []
    wanted = set(options.only.split(",")) if options.only else None
    runs = contestants(options.quick)
    extra = json.loads(options.extra) if options.extra else {}
    runs += [{"name": name, "kind": "mt", "env": keys.pop("env", {}),
              "gpu_memory_gib": keys.pop("gpu_memory_gib", None), "keys": keys}
             for name, keys in extra.items()]  # fmt: skip
    rivals = json.loads(options.mini_trainer) if options.mini_trainer else {}
    runs += [
        {"name": name, "kind": "mini_trainer", "keys": flags} for name, flags in rivals.items()
    ]
    extra = {**extra, **rivals}  # contestants named on the command line run whatever --only says
    if options.profile:  # timed apart: the profiler slows the step it records
        runs.append({"name": "profile", "kind": "mt", "keys": json.loads(options.profile),
                     "profile": True})  # fmt: skip
    for contestant in runs:
        if wanted and contestant["name"] not in wanted | {"profile", *extra}:
            continue
        place = out / contestant["name"].replace(" ", "_")
        shutil.rmtree(place, ignore_errors=True)  # a fresh run: no metrics of an earlier one
        place.mkdir()
        dense = contestant["kind"] == "dense"
        spec = dict(contestant, out=str(place), model=str(folder), data=str(data),
                    cache=str(out / "cache"), device=options.device, steps=options.steps,
                    warmup=options.warmup,
                    batch_size=dense_blocks if dense else options.batch_size)  # fmt: skip
        (place / "spec.json").write_text(json.dumps(spec))
        print(f"== {contestant['name']}", flush=True)
        started = time.perf_counter()
        # the baseline gets its best shot: less fragmentation between its padded shapes
        own_env = dict(env, PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True") if (
            contestant["kind"] == "padded") else env  # fmt: skip
        own_env = dict(own_env, **contestant.get("env", {}))
        with (place / "log.txt").open("w") as log:
            done = subprocess.run([sys.executable, __file__, "--child", str(place / "spec.json")],
                                  env=own_env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        if done.returncode != 0:
            log = (place / "log.txt").read_text().splitlines()
            errors = [line for line in log if "Error" in line or "error:" in line]
            print(f"   failed ({place / 'log.txt'}):", *dict.fromkeys(errors[-8:] or log[-8:]),
                  sep="\n   ", flush=True)  # fmt: skip
            rows.append({"name": contestant["name"], "error": (errors or log or ["?"])[-1]})
            continue
        result = json.loads((place / "result.json").read_text())
        if "profile" in result:
            from trace_summary import render

            text = f"profile of mt with {contestant['keys']}\n{render(result['profile'])}"
            (out / "profile.txt").write_text(text + "\n")
            continue
        lengths = dense_rows if dense else sft
        row = summarise(contestant["name"], result, lengths, config, peak, options.warmup)
        row["wall_s"] = time.perf_counter() - started
        rows.append(row)
        print(f"   {row['tokens_per_s']:,.0f} tokens/s ({row['wall_s']:.0f} s)", flush=True)
        (out / "results.json").write_text(json.dumps(rows, indent=1))  # kept if a later one hangs

    (out / "results.json").write_text(json.dumps(rows, indent=1))
    if options.device == "cuda":  # after the contestants: nothing of it is left in their way
        from machine import machine_speed

        speed = machine_speed()
        (out / "machine.json").write_text(json.dumps(speed, indent=1))
        print(f"\nmachine: {speed['gpu']}, bf16 matmul 8192^3 {speed['matmul_tflops']:.0f} "
              f"TFLOP/s, device copy {speed['copy_gb_s']:,.0f} GB/s (the H100s lent differ: "
              "compare rows of one call)")  # fmt: skip
    status = print_table(rows, options, config, peak, dense_blocks)
    if (out / "profile.txt").is_file():
        print("\n" + (out / "profile.txt").read_text())
    return status


def print_table(rows: list[dict], options, config, peak: float | None, dense_blocks: int) -> int:
    padded = next((r for r in rows if r["name"] == "padded" and "error" not in r), None)
    dense = next((r for r in rows if r["name"].startswith("dense") and "error" not in r), None)
    print(f"\nshape {options.shape} (N = {matmul_weights(config) / 1e9:.3f}B matmul weights), "
          f"{options.batch_size} samples per step (dense: {dense_blocks} rows of {MAX_LEN}), "
          f"steps {options.warmup + 1}-{options.steps} timed; MFU of "
          f"{peak / 1e12 if peak else 0:.0f} TFLOP/s")  # fmt: skip
    print(
        "contestant | tokens/s | MFU | peak GiB (allocated / reserved) | x padded | of dense | "
        "trainer's tokens/s, MFU"
    )
    bad = 0
    for r in rows:
        if "error" in r:
            print(f"{r['name']} | FAILED: {r['error'][:100]}")
            bad += 1
            continue
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
        mem += f" / {r['peak_reserved_gib']:.1f}" if r.get("peak_reserved_gib") else ""
        ratio = f"{r['tokens_per_s'] / padded['tokens_per_s']:.2f}x" if padded else "-"
        of_dense = f"{r['tokens_per_s'] / dense['tokens_per_s']:.0%}" if dense else "-"
        own = "-"
        if "own_tokens_per_s" in r:
            gaps = [r["own_tokens_per_s"] / r["tokens_per_s"] - 1]
            if r.get("own_mfu") is not None and r["mfu"]:
                gaps.append(r["own_mfu"] / r["mfu"] - 1)
            ok = all(abs(g) <= AGREEMENT for g in gaps) and "batch_mismatch" not in r
            bad += not ok
            own = " ".join(f"{g:+.1%}" for g in gaps) + (" ok" if ok else " DISAGREE")
        extra = f" (micro-batch {r['micro_batch']})" if r.get("micro_batch") else ""
        if r.get("optimizer_s"):
            extra += f" [optimizer {r['optimizer_s']:.2f} of {np.mean(r['step_s']):.2f} s a step]"
        if r.get("alloc_retries"):  # each one synchronised the device: the row is slowed by it
            extra += f" [{r['alloc_retries']} allocator retries]"
        print(f"{r['name']}{extra} | {r['tokens_per_s']:,.0f} | {mfu} | {mem} | {ratio} | "
              f"{of_dense} | {own}")  # fmt: skip
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
