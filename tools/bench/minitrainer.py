"""mini_trainer (rhai-innovation-mini-trainer 0.9.0) as a contestant of throughput.py.

It runs through its own entry point, ``torchrun -m mini_trainer.train``, on the same model folder
and data file as mt's contestants, and reports its own per-step metrics
(``training_metrics_0.jsonl``: time_per_batch, num_total_tokens, peak_memory_usage_GB). What is
adapted, and only this:

- its flash-attn 2 dependency cannot be built on the GPU machine, so where flash-attn-4 is
  installed, a copy of its package (in the contestant's folder, first on PYTHONPATH) asks
  transformers for "flash_attention_4" where it hard-codes "flash_attention_2"; nothing else
  in it changes;
- it loads a tokenizer from the model folder, which a random-init model lacks: a small
  word-level one is saved there (it is never used to tokenize: the data is pre-tokenized).

Its sampler draws other batches than mt's from the same file, so its tokens are its own count;
FLOPs per token are those of mt's batches of the same mix (exact when every sample has one
length, ``--fixed-len``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

__all__ = ["run_mini_trainer"]


def adapted_package(site: Path) -> str:
    """A copy of the installed mini_trainer under ``site`` whose attention is flash-attn-4's
    when that is what is installed; the attention implementation it will ask for."""
    spec = importlib.util.find_spec("mini_trainer")
    if spec is None or spec.origin is None:
        raise RuntimeError("mini_trainer is not installed (rhai-innovation-mini-trainer 0.9.0)")
    source = Path(spec.origin).parent
    target = site / "mini_trainer"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)
    attention = "flash_attention_2"
    if importlib.util.find_spec("flash_attn.cute") is not None:  # flash-attn-4's namespace
        attention = "flash_attention_4"
        setup = target / "setup_model_for_training.py"
        text = setup.read_text()
        assert '"flash_attention_2"' in text, "mini_trainer changed: check the adaptation"
        setup.write_text(text.replace('"flash_attention_2"', f'"{attention}"'))
    return attention


def ensure_tokenizer(model: Path) -> None:
    """A word-level tokenizer in ``model`` (mini_trainer loads one; the data needs none)."""
    if (model / "tokenizer.json").is_file():
        return
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    tokenizer = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>", pad_token="<pad>").save_pretrained(model)  # fmt: skip


def command_line(spec: dict, run_dir: Path) -> list[str]:
    """torchrun on one GPU with mini_trainer's own flags; ``spec["keys"]`` adds or overrides
    them (``{"max-tokens-per-gpu": 32768}``; true: a flag without a value)."""
    flags = {
        "model-name-or-path": spec["model"], "data-path": spec["data"],
        "batch-size": spec["batch_size"], "max-tokens-per-gpu": 16384, "learning-rate": 1e-5,
        "output-dir": str(run_dir), "training-mode": "step", "max-steps": spec["steps"],
        "use-liger-kernels": True, **spec.get("keys", {}),
    }  # fmt: skip
    line = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
            "-m", "mini_trainer.train"]  # fmt: skip
    for key, value in flags.items():
        if value is True:
            line.append(f"--{key}")
        elif value is not False:
            line += [f"--{key}", str(value)]
    return line


def read_metrics(run_dir: Path) -> dict:
    """Per-step stamps (the running sum of time_per_batch), tokens and the peak memory in GiB
    (mini_trainer reports GB)."""
    lines = (run_dir / "training_metrics_0.jsonl").read_text().splitlines()
    steps = [r for r in map(json.loads, lines) if "time_per_batch" in r]
    stamps, clock = [], 0.0
    for step in steps:
        clock += step["time_per_batch"]
        stamps.append(clock)
    return {
        "stamps": stamps,
        "tokens": [step["num_total_tokens"] for step in steps],
        "peak_mem_gib": max(step["peak_memory_usage_GB"] for step in steps) * 1e9 / 2**30,
    }


def run_mini_trainer(spec: dict) -> dict:
    out = Path(spec["out"])
    site = out / "site"
    attention = adapted_package(site)
    ensure_tokenizer(Path(spec["model"]))
    run_dir = out / "run"
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
    )
    print(f"mini_trainer with attention {attention}:", *command_line(spec, run_dir), flush=True)
    subprocess.run(command_line(spec, run_dir), env=env, check=True)
    return {**read_metrics(run_dir), "attention": attention}
