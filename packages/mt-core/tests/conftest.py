"""Fixtures of mt-core's tests: a tiny Llama and SFT samples, made once per session (nothing
downloads) and only read: the runs of the tests write to output folders of their own."""

from __future__ import annotations

import json

import pytest

VOCAB = 64


def pytest_configure(config):
    """The workspace's pyproject.toml declares the ``slow`` mark; this package's tests alone too."""
    config.addinivalue_line("markers", "slow(seconds): about how long the test takes")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, object]:
    """A random-init Llama of a few thousand parameters and 12 SFT samples of 4 to 19 tokens; the
    keys of a 2-step run on them (output_dir left to each test)."""
    import torch  # here, not at the top: only the tests of runs need the model stack
    from transformers import AutoModelForCausalLM, LlamaConfig

    folder = tmp_path_factory.mktemp("tiny")
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder / "model")
    generator = torch.Generator().manual_seed(0)
    rows = []
    for length in torch.randint(4, 20, (12,), generator=generator).tolist():
        tokens = torch.randint(0, VOCAB, (length,), generator=generator).tolist()
        rows.append(json.dumps({"input_ids": tokens, "labels": tokens}))
    (folder / "data.jsonl").write_text("\n".join(rows) + "\n")
    return dict(
        model_name_or_path=str(folder / "model"), data_path=str(folder / "data.jsonl"),
        training_mode="step", max_steps=2, batch_size=4, max_tokens_per_gpu=64,
        attn_backend="sdpa", train_dtype="float32", save_final_checkpoint=False,
        lr_scheduler="constant", learning_rate=1e-3, seed=3,
    )  # fmt: skip
