"""Fixtures of mt-osft's tests: one thread for torch, and the tiny transformers models that some
tests use (transformers is not a dependency of mt-osft: without it those tests are skipped)."""

import pytest
import torch
import torch.distributed as dist

# Config keys every decoder config class of these tests takes: a few thousand parameters, with
# grouped-query attention (2 KV heads for 4).
TINY_SHAPE = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


@pytest.fixture(autouse=True)
def _one_thread():
    """The test matrices are tiny: one thread avoids OpenMP start-up and spinning on a busy
    machine. Restored afterwards, so other packages' tests in the same session are unaffected."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_shape() -> dict[str, int]:
    """:data:`TINY_SHAPE`, for configs of any architecture (``Config(**tiny_shape, ...)``)."""
    return dict(TINY_SHAPE)


@pytest.fixture
def tiny_llama():
    """``tiny_llama(**overrides)`` -> a random-init LlamaForCausalLM of :data:`TINY_SHAPE` (seed
    0), new for each call: tests train it."""
    transformers = pytest.importorskip("transformers")

    def build(**overrides):
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(
            transformers.LlamaConfig(**{**TINY_SHAPE, **overrides})
        )

    return build


@pytest.fixture
def one_rank_group():
    """A one-process gloo group for the test (unless one is up already): DTensors and meshes
    need one."""
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    if started:
        dist.destroy_process_group()
