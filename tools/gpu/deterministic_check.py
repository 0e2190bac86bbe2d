"""Bit-reproducible GPU runs (issue #30): the run-file key ``deterministic`` on the 1B shape, the
same run twice and a run killed and resumed, compared bit for bit; and the key's cost in tokens/s.

On the GPU machine (see shared/GPU.md), from the repository root:

    python3 tools/gpu/deterministic_check.py --out $OUT/det        # 1B shape, 12 steps
    python3 tools/gpu/deterministic_check.py --shape tiny --device cpu --batch-size 8 \\
        --max-tokens 1024 --out /tmp/det                            # a CPU dry run

Every run is ``python3 -m mt run RUN.toml`` in a fresh process, on one random-init model folder
(tools/random_model.py) and one SFT mix, with mt's defaults otherwise (on a GPU: attention auto,
flash_attn_4 where flash-attn-4 is installed, else torch_varlen; compiled blocks; Liger):

* ``det-a`` and ``det-b``: the key on, the same run twice;
* ``det-kill``: the key on, a checkpoint after every step, SIGKILL as soon as step --kill-after's
  checkpoint is complete, then the same command again (it resumes from its newest checkpoint);
* ``default``: the key off, for the tokens/s the key costs.

The runs with the key must log bit-identical losses and gradient norms at every step and end
with bit-identical weights (each run's final HF export in float32: the master weights). The
table also says whether the run's console held a warning, and whether its settings line came
before step 1. Exit status 0 when every run with the key equals det-a.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

from mt_core import args_from_dict, write_run_file

TOOLS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TOOLS))  # tools/: the shared model and data makers
from random_model import SHAPES, make_sft_data  # noqa: E402

FIRST_TIMED_STEP = 3  # step 1 compiles the blocks, step 2 recompiles them for dynamic lengths


def run_file(out: Path, name: str, keys: dict) -> Path:
    """The run file of ``name`` (output in ``out/name``), written beside its log."""
    path = out / f"{name}.toml"
    write_run_file(args_from_dict({**keys, "output_dir": str(out / name)}), path)
    return path


def mt_run(run: Path, env: dict, kill_at: Path | None = None) -> bool:
    """``python3 -m mt run RUN``, its console appended to RUN's .log; SIGKILLed as soon as
    ``kill_at`` exists (returns whether it was). A failed run raises with its last lines."""
    log = run.with_suffix(".log")
    with log.open("a") as stream:
        command = [sys.executable, "-m", "mt", "run", str(run)]
        process = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT, env=env)
        while kill_at is not None and process.poll() is None:
            if kill_at.exists():
                process.kill()  # SIGKILL: no handler, no last checkpoint
                process.wait()
                return True
            time.sleep(0.05)
    if process.wait() != 0:
        last = [line for line in log.read_text().splitlines() if line.strip()][-3:]
        raise RuntimeError(f"{run.stem}: exit status {process.returncode}: {' | '.join(last)}")
    return False


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def export_of(folder: Path) -> Path:
    (export,) = (folder / "hf_format").iterdir()  # the final export, the only one
    return export


def _bits(tensor):
    return tensor.contiguous().view(-1).view(torch.uint8)


def weights_differ(one: Path, two: Path) -> str:
    """How the tensors of two HF exports differ ("" where they are bit-identical)."""
    files = sorted(p.name for p in one.glob("*.safetensors"))
    if files != sorted(p.name for p in two.glob("*.safetensors")):
        return "different files"
    differing, count, worst = [], 0, 0.0
    for name in files:
        with safe_open(one / name, "pt") as a, safe_open(two / name, "pt") as b:
            keys = a.keys()
            if set(keys) != set(b.keys()):
                return f"different tensors in {name}"
            for key in keys:
                x, y = a.get_tensor(key), b.get_tensor(key)
                count += 1
                if x.dtype != y.dtype or x.shape != y.shape:
                    differing.append(key)
                elif not _bits(x).equal(_bits(y)):  # bits, not values: -0.0 is not 0.0
                    differing.append(key)
                    worst = max(worst, (x.double() - y.double()).abs().max().item())
    if not differing:
        return ""
    return f"{len(differing)} of {count} tensors differ (largest |diff| {worst:.3g}; {differing[0]}, ...)"


def console(run: Path) -> tuple[int, bool, str]:
    """Of a run's log: its warning lines (Python's, and torch's logged ``W1204 13:52:08...``
    ones), whether the settings line came before step 1, and the settings line itself."""
    lines = run.with_suffix(".log").read_text().splitlines()
    warned = [x for x in lines if "Warning" in x or "warn(" in x or re.match(r"W\d{4} \d", x)]
    settings = next((i for i, line in enumerate(lines) if line.startswith("settings ")), None)
    step_1 = next((i for i, line in enumerate(lines) if line.startswith("step 1 ")), len(lines))
    first = settings is not None and settings < step_1
    return len(warned), first, lines[settings] if settings is not None else "(no settings line)"


def compare(reference: list[dict], lines: list[dict], export: Path, reference_export: Path) -> str:
    """What differs from the reference run of the losses, gradient norms and weights ("equal":
    nothing, bit for bit)."""
    wrong = []
    for key in ("loss", "grad_norm"):
        ours, theirs = [x[key] for x in lines], [x[key] for x in reference]
        if ours != theirs:  # the first step that differs (or the first one missing)
            pairs = enumerate(zip(ours, theirs, strict=False), 1)
            step = next((i for i, (a, b) in pairs if a != b), min(len(ours), len(theirs)) + 1)
            wrong.append(f"{key} from step {step}")
    problem = weights_differ(reference_export, export)
    wrong += [f"weights: {problem}"] if problem else []
    return "; ".join(wrong) or "equal"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--kill-after", type=int, default=6, help="step of the SIGKILL")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=16384, help="max_tokens_per_gpu")
    options = parser.parse_args()
    out = options.out
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if options.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    model = out / "model"
    if not (model / "config.json").is_file():  # in a process of its own: no CUDA context here
        command = [sys.executable, str(TOOLS / "random_model.py"), "--shape", options.shape,
                   "--out", str(model), "--device", options.device]  # fmt: skip
        subprocess.run(command, check=True, env=env)
    data = make_sft_data(
        out / "sft.jsonl", options.steps * options.batch_size, SHAPES[options.shape][1]["vocab_size"],
        max_len=min(8192, options.max_tokens), mean=min(600, options.max_tokens // 4),
    )  # fmt: skip
    keys = dict(
        model_name_or_path=str(model), data_path=str(data), batch_size=options.batch_size,
        max_tokens_per_gpu=options.max_tokens, learning_rate=1e-5, lr_scheduler="constant",
        training_mode="step", max_steps=options.steps, seed=7, deterministic=True,
        save_final_checkpoint=True, save_dtype="float32",  # the float32 master weights
    )  # fmt: skip
    runs = {
        "det-a": keys,
        "det-b": keys,
        "det-kill": dict(keys, checkpoint_every_steps=1, keep_last_checkpoints=1),
        "default": dict(keys, deterministic=False, save_final_checkpoint=False),
    }
    for name in runs:  # a fresh start: no metrics, checkpoints or lock of an earlier call
        shutil.rmtree(out / name, ignore_errors=True)
        out.joinpath(f"{name}.log").unlink(missing_ok=True)
    killed_at = ""
    for name, run_keys in runs.items():
        print(f"== {name}", flush=True)
        run = run_file(out, name, run_keys)
        if name == "det-kill":
            step = out / name / "checkpoints" / f"step_{options.kill_after}" / "trainer_state.json"
            if not mt_run(run, env, kill_at=step):
                killed_at = "(finished before the kill)"
            else:
                logged = len(metrics(out / name))
                killed_at = f"killed after step {options.kill_after}'s checkpoint ({logged} logged)"
                mt_run(run, env)  # the same command again: resumes from its newest checkpoint
            shutil.rmtree(out / name / "checkpoints")  # 15 GB each at 1B: the disk is 64 GiB
        else:
            mt_run(run, env)

    reference = metrics(out / "det-a")
    rows, failed = [], 0
    for name in runs:
        lines = metrics(out / name)
        if name == "default":
            verdict = "(the key off)"
        else:
            verdict = compare(reference, lines, export_of(out / name), export_of(out / "det-a"))
            failed += verdict != "equal"
        timed = [x["tokens_per_s_per_gpu"] for x in lines[FIRST_TIMED_STEP - 1 :]] or [0.0]
        warnings, settings_first, settings = console(out / f"{name}.toml")
        rows.append((name, lines, verdict, statistics.median(timed), warnings, settings_first))
        print(f"{name}: {settings}")
    print(f"\n{options.shape}, {options.steps} steps of {options.batch_size} samples, "
          f"max_tokens_per_gpu {options.max_tokens}, device {options.device}; det-kill "
          f"{killed_at}")  # fmt: skip
    print("run      | step 1 loss   | last loss     | against det-a (loss, grad norm, weights) "
          "| tokens/s/GPU | warning lines | settings before step 1")  # fmt: skip
    for name, lines, verdict, speed, warnings, settings_first in rows:
        print(f"{name:8} | {lines[0]['loss']:.8f} | {lines[-1]['loss']:.8f} | {verdict} | "
              f"{speed:,.0f} | {warnings} | {'yes' if settings_first else 'NO'}")  # fmt: skip
    key_on, key_off = rows[0][3], rows[-1][3]
    print(f"cost of the key: {key_on:,.0f} vs {key_off:,.0f} tokens/s/GPU "
          f"({key_on / key_off - 1:+.1%})")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
