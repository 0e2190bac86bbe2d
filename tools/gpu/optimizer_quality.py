"""Does a lower-precision setting train as well as float32 AdamW? 300 steps on one GPU.

On the GPU machine (see shared/GPU.md; torchao's wheel on PYTHONPATH), from the repository root:

    python3 tools/gpu/optimizer_quality.py --out $OUT/quality          # 1B shape, 300 steps
    python3 tools/gpu/optimizer_quality.py --shape tiny --device cpu --steps 20 --out /tmp/oq

A random-init model of --shape learns a sorting task (a prompt of 24 random symbols, the answer
the same symbols in ascending order; only the answer is trained), so the loss falls far: from
ln(vocab) to well under a nat. Every setting trains the same model on the same samples in the
same order (same seed) with ``mt run`` in a fresh process; --parallel of them share the GPU at a
time, each started once the others have taken their memory (only the losses are compared here:
speed is tools/bench/throughput.py's job). One more,
"float32 seed 43", is the reference with its samples in another order: how far the final loss
moves with no change of arithmetic, the scale against which the settings' gaps read. The table
gives each setting's final loss (mean of the last 20 steps), how far it lies from the float32
run's in percent, and its curve's distance from the float32 run's: the largest and the mean
absolute difference of the per-step losses.

A relative criterion ("within 1% of float32's final loss") reads poorly where the loss heads for
zero: at 0.09 nats any perturbation of the arithmetic, a different sample order included, moves
the end by several percent. ``--noise P`` gives the task a floor: each answer symbol is replaced
by a uniformly random one with probability P (in the labels and in the input that follows, as a
noisy corpus would have it), so no model predicts it better than "the sorted symbol with
probability 1 - P + P/64, any other with P/64", whose entropy (the Bayes floor, printed) the loss
settles above; with P = 0.25 about 1.5 nats. The settings' gaps then read against a loss that
stays well away from zero, as a fine-tuning loss on real text does.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/: the shared model maker
from random_model import SHAPES, make_model  # noqa: E402

SETTINGS = {  # run-file keys of each setting (float32 AdamW is the reference)
    "float32": {},
    "bfloat16 moments": {"optimizer_state_dtype": "bfloat16"},
    "8-bit moments": {"optimizer_state_dtype": "8bit"},
    "bf16 weights + SR": {"train_dtype": "bfloat16", "stochastic_rounding": True},
    "bf16 weights + SR + 8-bit": {
        "train_dtype": "bfloat16",
        "stochastic_rounding": True,
        "optimizer_state_dtype": "8bit",
    },  # fmt: skip
    "bf16 weights (no SR)": {"train_dtype": "bfloat16"},  # the negative control
    # FP8 compute of the large linear layers (issue #29): within 1% of float32's final loss?
    "float8 tensorwise": {"float8": "tensorwise"},
    "float8 rowwise": {"float8": "rowwise"},
    # the reference again with the samples in another order: how far the final loss moves with
    # no change of arithmetic at all, against which the settings' gaps are read
    "float32 seed 43": {"seed": 43},
}
SYMBOLS, ITEMS = 64, 24  # the alphabet of the sorting task and the items per sample


def make_sort_data(path: Path, samples: int, vocab: int, noise: float = 0.0,
                   seed: int = 0) -> None:  # fmt: skip
    """``samples`` sorting problems: symbols ``first .. first + 63``, a separator and an end
    token; labels only on the answer (and the end token). With ``noise``, each answer symbol is
    a uniformly random one with that probability."""
    first = min(1000, vocab - SYMBOLS - 2)
    separator, end = first + SYMBOLS, first + SYMBOLS + 1
    rng = np.random.default_rng(seed)
    with path.open("w") as out:
        for _ in range(samples):
            items = rng.integers(first, first + SYMBOLS, ITEMS)
            prompt = [*items.tolist(), separator]
            answer = np.sort(items)
            if noise:  # (no draws without: the noiseless data stay those of earlier figures)
                noisy = rng.random(ITEMS) < noise
                answer[noisy] = rng.integers(first, first + SYMBOLS, int(noisy.sum()))
            answer = [*answer.tolist(), end]
            labels = [-100] * len(prompt) + answer
            out.write(json.dumps({"input_ids": prompt + answer, "labels": labels}) + "\n")


def bayes_floor(noise: float) -> float:
    """The lowest mean loss per labelled token any model reaches on ``make_sort_data(noise)``:
    each answer symbol's entropy (the sorted one with probability 1 - P + P/64, each other with
    P/64), the end token certain."""
    if noise == 0.0:
        return 0.0
    right, wrong = 1 - noise + noise / SYMBOLS, noise / SYMBOLS
    entropy = -right * np.log(right) - (SYMBOLS - 1) * wrong * np.log(wrong)
    return float(entropy * ITEMS / (ITEMS + 1))


def run_file(path: Path, options, model: Path, data: Path, out: Path, keys: dict) -> Path:
    run = dict(
        model_name_or_path=str(model), data_path=str(data), output_dir=str(out),
        batch_size=options.batch_size, max_tokens_per_gpu=8192, learning_rate=options.lr,
        num_warmup_steps=15, lr_scheduler="cosine", training_mode="step",
        max_steps=options.steps, seed=42, save_final_checkpoint=False,
    ) | keys  # fmt: skip
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in run.items()))
    return path


def folder_of(root: Path, name: str) -> Path:
    return root / "".join(c if c.isalnum() or c in "-." else "_" for c in name)


def steps_logged(out: Path) -> int:
    metrics = out / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


def losses(out: Path) -> tuple[np.ndarray, float]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return np.array([line["loss"] for line in lines]), max(
        line.get("peak_mem_gib", 0.0) or 0.0 for line in lines
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64, help="samples per step")
    parser.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (cosine)")
    parser.add_argument("--parallel", type=int, default=3, help="settings run at a time")
    parser.add_argument("--only", help="comma-separated settings (default: all)")
    parser.add_argument(
        "--noise",
        type=float,
        default=0.0,
        help="probability that an answer symbol is a random one: a loss floor",
    )
    options = parser.parse_args()
    options.out.mkdir(parents=True, exist_ok=True)
    model = options.out / "model"
    if not (model / "config.json").exists():
        make_model(model, options.shape, device=options.device)
    vocab = SHAPES[options.shape][1]["vocab_size"]
    data = options.out / "sort.jsonl"
    if not 0.0 <= options.noise < 1.0:
        parser.error(f"--noise is a probability below 1, got {options.noise}")
    make_sort_data(data, options.steps * options.batch_size, vocab, options.noise)
    names = options.only.split(",") if options.only else list(SETTINGS)
    env = {**os.environ}
    if options.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    waiting = list(names)
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    failed = []
    while waiting or running:
        # each run plans for the GPU memory the others leave it (mt_core.plan.room.gpu_room):
        # the next starts once the ones running have passed their second step, their memory
        # taken (three started at once each planned for the whole of an 80 GB card, and the
        # last one's step ran out of it)
        while (
            waiting
            and len(running) < options.parallel
            and all(steps_logged(folder_of(options.out, name)) >= 2 for name in running)
        ):
            name = waiting.pop(0)
            folder = folder_of(options.out, name)
            keys = run_file(folder.with_suffix(".toml"), options, model, data, folder,
                            SETTINGS[name])  # fmt: skip
            log = folder.with_suffix(".log").open("w")
            process = subprocess.Popen([sys.executable, "-m", "mt", "run", str(keys)],
                                       stdout=log, stderr=subprocess.STDOUT, env=env)  # fmt: skip
            running[name] = (process, time.time())
            print(f"started {name}", flush=True)
        time.sleep(2)
        for name, (process, started) in list(running.items()):
            if process.poll() is not None:
                del running[name]
                print(f"{name}: exit {process.returncode} after {time.time() - started:.0f} s",
                      flush=True)  # fmt: skip
                if process.returncode:
                    failed.append(name)
    folders = {name: folder_of(options.out, name) for name in names}
    curves = {name: losses(folder) for name, folder in folders.items() if name not in failed}
    reference = curves.get("float32", (None, 0.0))[0]
    floor = bayes_floor(options.noise)
    print(f"\n{options.shape}, {options.steps} steps of {options.batch_size} sorting samples "
          f"(noise {options.noise:g}: Bayes floor {floor:.4f}), lr {options.lr:g} cosine, "
          f"seed 42")  # fmt: skip
    print(f"{'setting':28} {'step 1':>7} {'final':>7} {'vs float32':>10} {'max |diff|':>10} "
          f"{'mean |diff|':>11} {'peak GiB':>8}")  # fmt: skip
    for name, (curve, peak) in curves.items():
        final = curve[-20:].mean()
        if reference is not None and len(curve) == len(reference):
            diff = np.abs(curve - reference)
            relative = 100 * (final / reference[-20:].mean() - 1)
            gap = f"{relative:+9.2f}% {diff.max():10.4f} {diff.mean():11.4f}"
        else:
            gap = f"{'-':>10} {'-':>10} {'-':>11}"
        print(f"{name:28} {curve[0]:7.3f} {final:7.4f} {gap} {peak:8.1f}")
    for name in failed:
        print(f"{name:28} FAILED (see its .log)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
