"""Small JSONL files and stores made on the fly: nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mt_data import open_token_store


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def make_store(tmp_path):
    """``make_store(rows, require_labels=True)`` -> TokenStore built from those JSONL rows."""
    counter = iter(range(1_000_000))

    def build(rows: list[dict], require_labels: bool = True):
        path = write_jsonl(tmp_path / f"data{next(counter)}.jsonl", rows)
        return open_token_store(path, cache_dir=tmp_path / "cache", require_labels=require_labels)

    return build


def _sft_row(tokens: list[int], masked: int = 0) -> dict:
    return {"input_ids": tokens, "labels": [-100] * masked + tokens[masked:]}


@pytest.fixture
def sft_row():
    """``sft_row(tokens, masked=0)`` -> a JSONL row whose first ``masked`` labels are -100."""
    return _sft_row
