"""Every run file under examples/ is valid as written (the big ones are not run in CI)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mt_core import load_run_file

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").rglob("*.toml"))


def test_examples_exist():
    assert {p.name for p in EXAMPLES} >= {
        "run.toml",
        "llama-3.1-8b-sft.toml",
        "llama-3.1-8b-2gpu.toml",
        "qwen2.5-1.5b-pretrain.toml",
    }


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_run_file_is_valid(path):
    args = load_run_file(path)
    assert args.output_dir and args.batch_size > 0
