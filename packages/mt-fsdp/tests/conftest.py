"""Fixtures of mt-fsdp's tests: a one-process gloo group, a key-value store as torchrun's agent
holds it (with the environment torchrun gives its ranks), and a tiny Llama config."""

from __future__ import annotations

import pytest
import torch.distributed as dist
from transformers import LlamaConfig

from mt_fsdp import init_distributed, shutdown_distributed


@pytest.fixture
def dist_ctx():
    ctx = init_distributed("cpu")
    yield ctx
    shutdown_distributed()


@pytest.fixture
def agent(monkeypatch) -> dist.TCPStore:
    """The agent's store, and this process as rank 2 of the job."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port),
                        "TORCHELASTIC_USE_AGENT_STORE": "True",
                        "TORCHELASTIC_RESTART_COUNT": "0", "RANK": "2"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    return store


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
