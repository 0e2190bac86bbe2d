"""Fixtures of the tools' tests: a local tokenizer with a chat template, a tiny model folder with
it, token data, run files, and fresh processes of the mt command. Everything is made here; nothing
downloads.

Each fresh process costs seconds (``mt`` imports torch and transformers), so tests call the
commands in this process (``cli.main``) unless the process itself is what they test."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

BIN = Path(sys.executable).parent  # the workspace venv: python, mt and torchrun

WORDS = [
    "hello",
    "how",
    "are",
    "you",
    "i",
    "am",
    "fine",
    "thank",
    "you",
    "what",
    "is",
    "two",
    "plus",
    "two",
    "it",
    "is",
    "four",
    "the",
    "cat",
    "sat",
    "on",
    "the",
    "mat",
    "tell",
    "me",
    "a",
    "story",
    "once",
    "upon",
    "a",
    "time",
    "there",
    "was",
    "a",
    "small",
    "model",
    "learning",
    "to",
    "count",
]

# A ChatML-style template, like Qwen's: a default system turn, <|im_start|>role ... <|im_end|>.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nbe brief<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# The same template with {% generation %} markers around what the assistant says.
MARKED_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}<|im_end|>"
    "{% endgeneration %}{% else %}{{ message['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def make_tokenizer(folder: Path, template: str = CHAT_TEMPLATE) -> Path:
    """A word-level tokenizer (one token per word, newline or special token), saved as a HF
    tokenizer folder with ``template`` as its chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIALS)}
    for word in [*WORDS, "system", "user", "assistant", "be", "brief", "\n"]:
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # words, each newline on its own, and special tokens whole (added tokens split first)
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("\n", behavior="isolated"), pre_tokenizers.WhitespaceSplit()]
    )
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )  # fmt: skip
    tokenizer.chat_template = template
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session", autouse=True)
def _one_thread_per_worker():
    """Under pytest-xdist the workers already fill the cores: a second thread per worker would
    only spin in OpenMP's waits (and the fresh processes these tests start use one thread too)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A random-init Llama of a few thousand parameters, with the test tokenizer beside it; made
    once per session and only read (runs write to output folders of their own)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    folder = tmp_path_factory.mktemp("model")
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    make_tokenizer(folder)
    return folder


def token_rows(count: int, vocab: int = 64, low: int = 5, high: int = 17, seed: int = 0) -> list:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        length = rng.randrange(low, high)
        ids = [rng.randrange(vocab) for _ in range(length)]
        rows.append({"input_ids": ids, "labels": [-100, -100] + ids[2:]})
    return rows


def run_toml(folder: Path, model: Path, data: Path, **keys) -> Path:
    """A run file in ``folder`` (output_dir folder/out) with ``keys`` added (None: left out)."""
    base = {
        "model_name_or_path": str(model), "data_path": str(data), "output_dir": str(folder / "out"),
        "batch_size": 4, "max_tokens_per_gpu": 64, "learning_rate": 1e-3, "attn_backend": "sdpa",
        "training_mode": "step", "max_steps": 2,
    }  # fmt: skip
    base.update(keys)
    text = "".join(f"{key} = {json.dumps(v)}\n" for key, v in base.items() if v is not None)
    path = folder / "run.toml"
    path.write_text(text)
    return path


def _env() -> dict[str, str]:
    # one thread per process: the tiny runs gain nothing from more, and the processes of a
    # torchrun share the machine's cores
    return {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


def mt(*args: str) -> subprocess.CompletedProcess:
    """The installed ``mt`` script in a fresh process, as a user runs it."""
    return subprocess.run(
        [str(BIN / "mt"), *args], capture_output=True, text=True, timeout=300, env=_env()
    )


def torchrun_mt(nproc: int, *args: str) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node=NPROC --no-python mt ARGS``, as a user types it; on a free
    port of its own (--standalone), so that runs of tests side by side do not meet."""
    assert (BIN / "mt").is_file(), "the workspace venv should hold the mt script"
    command = ["torchrun", "--standalone", f"--nproc-per-node={nproc}", "--no-python", "mt"]
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, timeout=300, env=_env()
    )


@pytest.fixture(scope="session")
def kit():
    """The helpers above, for the test modules (importlib mode: they cannot import conftest)."""
    return SimpleNamespace(
        make_tokenizer=make_tokenizer, write_jsonl=write_jsonl, token_rows=token_rows,
        run_toml=run_toml, mt=mt, torchrun_mt=torchrun_mt, CHAT_TEMPLATE=CHAT_TEMPLATE,
        MARKED_TEMPLATE=MARKED_TEMPLATE,
    )  # fmt: skip
