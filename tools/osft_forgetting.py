"""OSFT vs full fine-tuning on a two-task continual-learning toy, on CPU in about 2 minutes.

    uv run python tools/osft_forgetting.py                 # table + docs/osft_forgetting.png
    uv run python tools/osft_forgetting.py --tasks shared --plot /tmp/shared.png

A tiny random-init Llama (hidden 128, 4 layers, vocab 256, ~0.7 M parameters) learns task A
through the real training path (``mt_core.train``, what ``mt run`` calls). From task A's export
it then learns task B with full fine-tuning and with OSFT at each ratio, all with the same
steps, batch, learning rate and schedule (--lr-b, --steps-b), plus full fine-tuning at other
learning rates / step counts (--full-runs) as the tuned-lr reference. Every --export-every steps
the run exports the model (float32); each export is loaded in plain transformers (SDPA) and
scored on held-out samples of both tasks: mean token loss and greedy next-token accuracy over
the answer tokens only.

    task A:  random prompt tokens, MARK_A, k, k+1, k+2, ...     (counting up)
    task B:  random prompt tokens, MARK_B, k, k-1, k-2, ...     (counting down)

The start ``k`` is part of the prompt (labels -100), so every answer token is determined and a
model that knows the rule gets loss ~0. ``--tasks disjoint`` (default): task A counts on the
number tokens 8..131, task B on 132..255 (a new task on new inputs). ``--tasks shared``: both
count on 8..255, so task B contradicts task A on the same inputs (only the marker tells them
apart, and a model that has learnt task A alone never needed it).

"Comparable task-B loss": besides the state after the last step, the table gives each run's
task-A loss where its task-B loss first reaches (interpolated between exports) the worst final
task-B loss of the runs with the shared recipe.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from mt_core import args_from_dict, train

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 256
MARK_A, MARK_B = 4, 5  # task markers; ids 0-3 are pad/bos/(unused)/eos, numbers are 8..255
LOW, HIGH = 8, VOCAB  # number tokens


# ---------------------------------------------------------------- data and model


def token_range(task: str, tasks: str) -> tuple[int, int]:
    """The number tokens ``task`` uses: all of them ("shared"), or half each ("disjoint")."""
    if tasks == "shared":
        return LOW, HIGH
    middle = (LOW + HIGH) // 2
    return (LOW, middle) if task == "A" else (middle, HIGH)


def make_sample(rng: np.random.Generator, task: str, tasks: str) -> tuple[list[int], list[int]]:
    """One sample of ``task`` ("A" or "B"): (input_ids, labels) with labels on the answer."""
    low, high = token_range(task, tasks)
    prompt = rng.integers(low, high, int(rng.integers(4, 16))).tolist()
    length = int(rng.integers(8, 32))
    if task == "A":
        start = int(rng.integers(low, high - length))
        run = list(range(start, start + length + 1))
    else:
        start = int(rng.integers(low + length, high))
        run = list(range(start, start - length - 1, -1))
    context = prompt + [MARK_A if task == "A" else MARK_B, run[0]]
    answer = run[1:]
    return context + answer, [-100] * len(context) + answer


def write_task(path: Path, task: str, tasks: str, num_samples: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    with path.open("w") as out:
        for _ in range(num_samples):
            input_ids, labels = make_sample(rng, task, tasks)
            out.write(json.dumps({"input_ids": input_ids, "labels": labels}) + "\n")


def make_model(folder: Path, seed: int) -> None:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=3, pad_token_id=0,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=3, pad_token_id=0)
    model.save_pretrained(folder, safe_serialization=True)


# ---------------------------------------------------------------- evaluation


def eval_batches(task: str, tasks: str, num_samples: int, seed: int) -> list[dict]:
    """Held-out samples (another seed than training) as right-padded batches of 64."""
    rng = np.random.default_rng(seed)
    samples = [make_sample(rng, task, tasks) for _ in range(num_samples)]
    batches = []
    for i in range(0, num_samples, 64):
        chunk = samples[i : i + 64]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (sample_ids, sample_labels) in enumerate(chunk):
            ids[row, : len(sample_ids)] = torch.tensor(sample_ids)
            labels[row, : len(sample_labels)] = torch.tensor(sample_labels)
            mask[row, : len(sample_ids)] = 1
        batches.append({"input_ids": ids, "labels": labels, "attention_mask": mask})
    return batches


@torch.no_grad()
def evaluate(folder: Path, batches: dict[str, list]) -> dict[str, tuple[float, float]]:
    """{task: (mean answer-token loss, greedy next-token accuracy)} of the exported model,
    loaded as plain transformers (SDPA, float32). Right padding never reaches a real token
    under the causal mask, and padded positions carry no label."""
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    result = {}
    for task, task_batches in batches.items():
        loss_sum, correct, count = 0.0, 0, 0
        for batch in task_batches:
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits[:, :-1]
            target = batch["labels"][:, 1:]
            keep = target != -100
            loss_sum += torch.nn.functional.cross_entropy(
                logits[keep], target[keep], reduction="sum"
            ).item()
            correct += int((logits[keep].argmax(-1) == target[keep]).sum())
            count += int(keep.sum())
        result[task] = (loss_sum / count, correct / count)
    return result


# ---------------------------------------------------------------- training


def run_training(keys: dict, quiet: bool) -> float:
    """``mt_core.train`` with these run-file keys; returns the wall time in seconds."""
    started = time.perf_counter()
    sink = io.StringIO()
    if quiet:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            train(args_from_dict(keys))
    else:
        train(args_from_dict(keys))
    return time.perf_counter() - started


def exports_of(output_dir: Path) -> list[tuple[int, Path]]:
    """(samples seen, folder) of every HF export of a run, in order."""
    folders = (output_dir / "hf_format").glob("samples_*")
    return sorted((int(f.name.split("_")[1]), f) for f in folders)


def loss_at(trajectory: list[dict], b_target: float) -> float | None:
    """Task-A loss where the task-B loss first falls to ``b_target`` (linear interpolation
    between consecutive exports); None if it never does."""
    for before, after in zip(trajectory[:-1], trajectory[1:], strict=True):
        if after["B_loss"] <= b_target <= before["B_loss"]:
            span = before["B_loss"] - after["B_loss"]
            t = 0.0 if span == 0 else (before["B_loss"] - b_target) / span
            return before["A_loss"] + t * (after["A_loss"] - before["A_loss"])
    return None


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def lr_steps(text: str) -> list[tuple[float, int]]:
    pairs = [item.split(":") for item in text.split(",") if item]
    return [(float(lr), int(steps)) for lr, steps in pairs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/osft_forgetting"))
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "osft_forgetting.png")
    parser.add_argument("--steps-a", type=int, default=150)
    parser.add_argument("--steps-b", type=int, default=100)
    parser.add_argument("--lr-a", type=float, default=3e-3)
    parser.add_argument("--lr-b", type=float, default=3e-3, help="every task-B run's lr")
    parser.add_argument(
        "--full-runs",
        type=lr_steps,
        default=lr_steps("1e-3:100,1e-3:200"),
        help="extra full fine-tuning runs, lr:steps,... (the tuned-lr reference)",
    )
    parser.add_argument("--warmup", type=int, default=10, help="task-B warmup steps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--export-every", type=int, default=10, help="task-B steps per export")
    parser.add_argument("--ratios", type=floats, default=[0.1, 0.25, 0.5])
    parser.add_argument("--eval-samples", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks", default="disjoint", choices=["disjoint", "shared"])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--verbose", action="store_true", help="show the trainer's output")
    options = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(options.threads)
    if not options.verbose:
        hf_logging.disable_progress_bar()
    started = time.perf_counter()

    out = options.out
    out.mkdir(parents=True, exist_ok=True)
    make_model(out / "init", options.seed)
    samples = 4000
    write_task(out / "task_a.jsonl", "A", options.tasks, samples, options.seed + 1)
    write_task(out / "task_b.jsonl", "B", options.tasks, samples, options.seed + 2)
    batches = {
        "A": eval_batches("A", options.tasks, options.eval_samples, options.seed + 101),
        "B": eval_batches("B", options.tasks, options.eval_samples, options.seed + 102),
    }
    common = dict(
        batch_size=options.batch_size, max_tokens_per_gpu=2048, lr_scheduler="cosine",
        weight_decay=0.0, max_grad_norm=1.0, training_mode="step",
        seed=options.seed, save_dtype="float32", attn_backend="sdpa", resume="off",
        save_final_checkpoint=True,
    )  # fmt: skip

    # Task A from scratch.
    task_a_dir = out / "task_a"
    seconds = run_training(
        dict(
            common, model_name_or_path=str(out / "init"), data_path=str(out / "task_a.jsonl"),
            output_dir=str(task_a_dir), learning_rate=options.lr_a, max_steps=options.steps_a,
            num_warmup_steps=10,
        ),
        quiet=not options.verbose,
    )  # fmt: skip
    base = exports_of(task_a_dir)[-1][1]
    start_eval = evaluate(base, batches)
    print(
        f"task A: {options.steps_a} steps in {seconds:.0f} s; after A: task-A loss "
        f"{start_eval['A'][0]:.4f} (acc {start_eval['A'][1]:.1%}), task-B loss "
        f"{start_eval['B'][0]:.4f} (acc {start_eval['B'][1]:.1%})",
        flush=True,
    )

    # Task B from task A's export: full fine-tuning and OSFT at each ratio with the same lr,
    # steps and schedule; then full fine-tuning at other lrs / step counts (--full-runs).
    steps_b, lr_b = options.steps_b, options.lr_b
    contestants = [(f"full FT lr {lr_b:g}", lr_b, steps_b, {})]
    contestants += [
        (f"OSFT r={ratio:g} lr {lr_b:g}", lr_b, steps_b,
         dict(osft=True, osft_unfreeze_rank_ratio=ratio))
        for ratio in options.ratios
    ]  # fmt: skip
    contestants += [
        (f"full FT lr {lr:g}" + (f" {steps} steps" if steps != steps_b else ""), lr, steps, {})
        for lr, steps in options.full_runs
    ]
    results = []
    for name, lr, steps, extra in contestants:
        output_dir = out / ("b_" + name.replace(" ", "_").replace("=", ""))
        seconds = run_training(
            dict(
                common, **extra, model_name_or_path=str(base),
                data_path=str(out / "task_b.jsonl"), output_dir=str(output_dir),
                learning_rate=lr, max_steps=steps, num_warmup_steps=options.warmup,
                min_samples_per_checkpoint=options.export_every * options.batch_size,
            ),
            quiet=not options.verbose,
        )  # fmt: skip
        trajectory = [{"step": 0, "A_loss": start_eval["A"][0], "B_loss": start_eval["B"][0]}]
        for seen, folder in exports_of(output_dir):
            scores = evaluate(folder, batches)
            trajectory.append(
                {
                    "step": seen // options.batch_size,
                    "A_loss": scores["A"][0],
                    "A_acc": scores["A"][1],
                    "B_loss": scores["B"][0],
                    "B_acc": scores["B"][1],
                }
            )
        results.append(
            {"name": name, "lr": lr, "steps": steps, "seconds": seconds, "trajectory": trajectory}
        )
        last = trajectory[-1]
        print(
            f"{name}: {seconds:.0f} s; task-A loss {last['A_loss']:.4f}, task-B loss "
            f"{last['B_loss']:.4f}",
            flush=True,
        )

    # the comparison point: the worst final task-B loss of the runs of the shared recipe
    b_target = max(
        r["trajectory"][-1]["B_loss"]
        for r in results
        if (r["lr"], r["steps"]) == (options.lr_b, options.steps_b)
    )
    print(
        f"\ntasks {options.tasks}; task A: {options.steps_a} steps, lr {options.lr_a:g}; task B: "
        f"{options.steps_b} steps (unless stated) of {options.batch_size} samples; cosine, "
        f"warmup 10 / {options.warmup}, AdamW, clip 1.0; held-out {options.eval_samples} "
        "samples per task"
    )
    print(
        f"after task A (start of B): task-A loss {start_eval['A'][0]:.4f} "
        f"(acc {start_eval['A'][1]:.1%}), task-B loss {start_eval['B'][0]:.4f} "
        f"(acc {start_eval['B'][1]:.1%})"
    )
    header = (
        "run | task-A loss after B | task-A acc | task-B loss | task-B acc | "
        f"task-A loss at task-B loss {b_target:.3f} | train s"
    )
    print(header)
    print("|".join("---" for _ in header.split("|")))
    for r in results:
        last = r["trajectory"][-1]
        matched = loss_at(r["trajectory"], b_target)
        print(
            f"{r['name']} | {last['A_loss']:.4f} | {last['A_acc']:.1%} | {last['B_loss']:.4f} | "
            f"{last['B_acc']:.1%} | {'-' if matched is None else f'{matched:.4f}'} | "
            f"{r['seconds']:.0f}"
        )
    (out / "results.json").write_text(
        json.dumps({"start": start_eval, "b_target": b_target, "results": results}, indent=1)
    )
    plot(results, start_eval, options, b_target)
    print(f"\nresults in {out / 'results.json'}; total {time.perf_counter() - started:.0f} s")


def plot(results: list[dict], start_eval: dict, options: argparse.Namespace, b_target: float):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (uv sync --extra plot, or pip install it)")
        return
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in results:
        steps = [p["step"] for p in r["trajectory"]]
        a = [p["A_loss"] for p in r["trajectory"]]
        b = [p["B_loss"] for p in r["trajectory"]]
        style = dict(marker="o", markersize=3, label=r["name"])
        if r["name"].startswith("full"):  # black at the shared lr, grey at the others
            shared = (r["lr"], r["steps"]) == (options.lr_b, options.steps_b)
            style["color"] = "black" if shared else "0.6"
            style["linestyle"] = "-" if shared or r["steps"] == options.steps_b else "--"
        left.plot(b, a, **style)
        right.plot(steps, a, **style)
    left.axvline(b_target, color="grey", linestyle=":", linewidth=1)
    left.set_xlabel("task-B loss (held-out, answer tokens)")
    left.set_ylabel("task-A loss (held-out, answer tokens)")
    left.set_title(f"forgetting vs learning along task B ({options.tasks} tokens)")
    left.set_xscale("log")
    left.set_yscale("log")
    left.invert_xaxis()
    right.set_xlabel("task-B step")
    right.set_ylabel("task-A loss")
    right.set_yscale("log")
    right.set_title("task-A loss during task B")
    right.legend(loc="upper right", fontsize="small")
    right.axhline(start_eval["A"][0], color="grey", linestyle=":", linewidth=1)
    figure.tight_layout()
    options.plot.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(options.plot, dpi=110)
    print(f"plot: {options.plot}")


if __name__ == "__main__":
    main()
