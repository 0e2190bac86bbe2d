"""Re-create examples/tiny: a tiny random-init Llama and a learnable synthetic SFT dataset.

    uv run python tools/make_tiny_example.py

The task: a prompt of random tokens (not learnt, labels -100), a separator, then a counting run
k, k+1, k+2, ... from a random start. A model that has learnt the successor rule predicts the
answer almost perfectly, so the loss falls from about ln(vocab) to well below 1 within a minute
of CPU training. Everything is seeded: running this again gives identical files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parent.parent / "examples" / "tiny"
VOCAB = 256
SEPARATOR = 2  # token that ends the prompt; ids 0-3 are reserved, the task uses 4..VOCAB-1
NUM_SAMPLES = 2000


def make_model(folder: Path) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=3,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=3, pad_token_id=0)
    model.save_pretrained(folder, safe_serialization=True)


def make_data(path: Path) -> None:
    rng = np.random.default_rng(0)
    with path.open("w") as out:
        for _ in range(NUM_SAMPLES):
            prompt = rng.integers(4, VOCAB, int(rng.integers(4, 24))).tolist()
            length = int(rng.integers(8, 40))
            start = int(rng.integers(4, VOCAB - length))
            answer = list(range(start, start + length))
            input_ids = prompt + [SEPARATOR] + answer
            labels = [-100] * (len(prompt) + 1) + answer
            out.write(json.dumps({"input_ids": input_ids, "labels": labels, "len": len(input_ids)}))
            out.write("\n")


def main() -> None:
    ROOT.mkdir(parents=True, exist_ok=True)
    make_model(ROOT / "model")
    make_data(ROOT / "data.jsonl")
    print(f"wrote {ROOT}")


if __name__ == "__main__":
    main()
