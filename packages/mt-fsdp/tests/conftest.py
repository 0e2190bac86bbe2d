"""Fixtures of mt-fsdp's tests: a one-process gloo group, and a tiny Llama config."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig

from mt_fsdp import init_distributed, shutdown_distributed


@pytest.fixture
def dist_ctx():
    ctx = init_distributed("cpu")
    yield ctx
    shutdown_distributed()


@pytest.fixture(scope="session")
def tiny_config():
    """``tiny_config(tied=False)`` -> the config of a Llama of a few thousand parameters, with
    grouped-query attention (2 KV heads for 4)."""

    def make(tied: bool = False) -> LlamaConfig:
        return LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=64, tie_word_embeddings=tied,
        )  # fmt: skip

    return make
