"""FP8 compute leaves checkpoints and exports as they are (issue #29): a checkpoint written with
the key ``float8`` resumes without it and the other way round, and its export loads in
transformers with the tensors, shapes and dtypes of a bfloat16 run's export.

On the GPU machine (see shared/GPU.md; torchao's wheel on PYTHONPATH), from the repository root:

    python3 tools/gpu/float8_check.py --out $OUT/f8           # 1B shape, tensorwise
    python3 tools/gpu/float8_check.py --out $OUT/f8 --recipe rowwise

Every run is ``python3 -m mt run RUN.toml`` in a fresh process (tools/gpu/deterministic_check.py's
helpers), on one random-init model folder (tools/random_model.py) and one SFT mix:

* ``bf16``: 4 steps without the key (the reference curve), a checkpoint at step 2 (a run
  writes none at its last step) and an export at the end; ``fp8-from-bf16``: resumes from that
  checkpoint with the key;
* ``fp8`` and ``bf16-from-fp8``: the same the other way round.

A resumed run must log steps 3 and 4 only, with losses within --tolerance of the reference's
(two steps in FP8 move the weights a little: not bit for bit), and the exports of ``fp8`` and
``bf16`` must hold the same tensor names, shapes and dtypes and load with
``AutoModelForCausalLM.from_pretrained``. Checkpoints are removed once read (20 GB each at 1B).
Exit status 0 when all holds. Speed and quality: tools/bench/RESULTS.md ("FP8 compute").
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from safetensors import safe_open

TOOLS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TOOLS))  # tools/: the shared model and data makers
sys.path.insert(0, str(TOOLS / "gpu"))
from deterministic_check import export_of, metrics, mt_run, run_file  # noqa: E402
from random_model import SHAPES, make_sft_data  # noqa: E402

CHECKPOINT_STEP, STEPS = 2, 4


def tensors(export: Path) -> dict[str, tuple]:
    """Name -> (shape, dtype) of every tensor of an HF export."""
    found = {}
    for file in sorted(export.glob("*.safetensors")):
        with safe_open(file, "pt") as opened:
            for key in opened.keys():  # noqa: SIM118 (safe_open has no __iter__)
                part = opened.get_slice(key)
                found[key] = (tuple(part.get_shape()), part.get_dtype())
    return found


def loads(export: Path) -> str:
    """ "" where transformers loads the export, else why not."""
    from transformers import AutoModelForCausalLM

    try:
        AutoModelForCausalLM.from_pretrained(export, dtype="auto")
    except Exception as error:  # the verdict, not a traceback
        return f"{type(error).__name__}: {error}"
    return ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    parser.add_argument("--recipe", default="tensorwise", choices=["tensorwise", "rowwise"])
    parser.add_argument("--out", type=Path, required=True)
    # small steps: the check is of resumes and exports, not speed (64 samples of 16k-token rows
    # took over 400 s for the four runs; these, 376 s on an H100, most of it start-up and saving)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=4096, help="max_tokens_per_gpu")
    parser.add_argument("--tolerance", type=float, default=0.02, help="relative, of the loss")
    options = parser.parse_args()
    out = options.out
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    model = out / "model"
    if not (model / "config.json").is_file():  # in a process of its own: no CUDA context here
        command = [sys.executable, str(TOOLS / "random_model.py"), "--shape", options.shape,
                   "--out", str(model), "--device", "cuda"]  # fmt: skip
        subprocess.run(command, check=True, env=env)
    data = make_sft_data(
        out / "sft.jsonl", STEPS * options.batch_size, SHAPES[options.shape][1]["vocab_size"],
        max_len=min(8192, options.max_tokens), mean=min(600, options.max_tokens // 4),
    )  # fmt: skip
    keys = dict(
        model_name_or_path=str(model), data_path=str(data), batch_size=options.batch_size,
        max_tokens_per_gpu=options.max_tokens, learning_rate=1e-5, lr_scheduler="constant",
        training_mode="step", max_steps=STEPS, seed=7, save_final_checkpoint=False,
    )  # fmt: skip
    fp8 = {"float8": options.recipe}
    writer = dict(checkpoint_every_steps=CHECKPOINT_STEP, save_final_checkpoint=True)
    runs = {"bf16": (writer, "fp8-from-bf16", fp8),  # the reference first
            "fp8": ({**fp8, **writer}, "bf16-from-fp8", {})}  # fmt: skip
    for name in [*runs, *(reader for _, reader, _ in runs.values())]:
        shutil.rmtree(out / name, ignore_errors=True)  # a fresh start
        out.joinpath(f"{name}.log").unlink(missing_ok=True)
    failed, reference = [], {}
    for name, (written, reader, read) in runs.items():
        print(f"== {name}, then {reader}", flush=True)
        mt_run(run_file(out, name, {**keys, **written}), env)
        reference = reference or {line["step"]: line["loss"] for line in metrics(out / name)}
        checkpoint = out / name / "checkpoints" / f"step_{CHECKPOINT_STEP}"
        mt_run(run_file(out, reader, {**keys, **read, "resume": str(checkpoint)}), env)
        shutil.rmtree(out / name / "checkpoints")
        lines = metrics(out / reader)
        steps = [line["step"] for line in lines]
        gaps = [abs(line["loss"] / reference[line["step"]] - 1) for line in lines]
        verdict = "ok" if steps == [3, 4] and max(gaps) <= options.tolerance else "FAILED"
        failed += [reader] if verdict != "ok" else []
        print(f"{reader}: steps {steps}, loss {[round(x['loss'], 5) for x in lines]} against "
              f"bf16's {[round(reference[s], 5) for s in steps]} (largest gap "
              f"{max(gaps):.2%}): {verdict}")  # fmt: skip
    fp8_export, bf16_export = export_of(out / "fp8"), export_of(out / "bf16")
    same = tensors(fp8_export) == tensors(bf16_export)
    problem = loads(fp8_export)
    print(f"fp8's export: tensors, shapes and dtypes as bf16's: {'yes' if same else 'NO'}; "
          f"loads in transformers: {problem or 'yes'}")  # fmt: skip
    failed += [] if same and not problem else ["export"]
    verdict = f"FAILED {', '.join(failed)}" if failed else "all hold"
    print(f"{options.shape}, float8 = {options.recipe!r}: {verdict}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
