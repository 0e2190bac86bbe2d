"""Fixtures shared by the cross-package tests: tiny random-init models and SFT datasets built
through mt-data, made on the fly (nothing is downloaded)."""

from __future__ import annotations

import json
from collections.abc import Callable
from itertools import count

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel

from mt_data import SampleDataset, open_token_store

# Small enough for CPU tests in milliseconds, with grouped-query attention (2 KV heads for 4).
TINY_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "max_position_embeddings": 128,
}


@pytest.fixture
def tiny_causal_lm() -> Callable[..., PreTrainedModel]:
    """``tiny_causal_lm(config_class, seed=0, **overrides)`` -> a float32 random-init causal LM of
    :data:`TINY_SHAPE` (``overrides`` replace or add config fields), in train mode."""

    def build(config_class: type[PreTrainedConfig], seed: int = 0, **overrides) -> PreTrainedModel:
        config = config_class(**{**TINY_SHAPE, **overrides})
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32).train()

    return build


@pytest.fixture
def sft_dataset(tmp_path_factory) -> Callable[[list[dict]], SampleDataset]:
    """``sft_dataset(rows)`` -> SampleDataset of JSONL ``rows`` ({"input_ids", "labels"}), built
    through a real token store."""
    folder = tmp_path_factory.mktemp("sft")
    numbers = count()

    def build(rows: list[dict]) -> SampleDataset:
        path = folder / f"data{next(numbers)}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return SampleDataset(open_token_store(path, cache_dir=folder / "cache"))

    return build
