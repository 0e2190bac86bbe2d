"""Random-init HF model folders at real shapes, and realistic SFT data, for benchmarks and GPU runs.

Nothing can be downloaded on the GPU machine, so every benchmark builds its model from a config
with random weights (speed and memory depend on the shape only) and its data from a seeded
length distribution. Importable (``sys.path`` gets ``tools/``) and a command:

    python3 tools/random_model.py --shape llama-3.1-8b --out /tmp/llama8b [--device cuda]
    python3 tools/random_model.py --shape llama-3.1-70b --out /tmp/llama70b --config-only
    python3 tools/random_model.py --data /tmp/sft.jsonl --samples 4096 --vocab 128256
"""

from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path

import numpy as np

_LLAMA3 = dict(vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072)
SHAPES: dict[str, tuple[str, dict]] = {
    # name: (model_type, config fields); the published models' shapes, weights random
    "tiny": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                           tie_word_embeddings=True)),
    # ~29 M parameters: a CPU step takes seconds
    "mid": ("llama", dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                          num_attention_heads=8, num_key_value_heads=4, vocab_size=8192,
                          tie_word_embeddings=True)),
    "llama-3.2-1b": ("llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   num_attention_heads=32, num_key_value_heads=8,
                                   tie_word_embeddings=True, **_LLAMA3)),
    "llama-3.2-3b": ("llama", dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                                   num_attention_heads=24, num_key_value_heads=8,
                                   tie_word_embeddings=True, **_LLAMA3)),
    "llama-3.1-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336,
                                   num_hidden_layers=32, num_attention_heads=32,
                                   num_key_value_heads=8, tie_word_embeddings=False, **_LLAMA3)),
    "llama-3.1-70b": ("llama", dict(hidden_size=8192, intermediate_size=28672,
                                    num_hidden_layers=80, num_attention_heads=64,
                                    num_key_value_heads=8, tie_word_embeddings=False, **_LLAMA3)),
    "qwen2.5-1.5b": ("qwen2", dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                   num_attention_heads=12, num_key_value_heads=2,
                                   vocab_size=151936, tie_word_embeddings=True,
                                   rope_theta=1000000.0, max_position_embeddings=32768)),
}  # fmt: skip


def model_config(shape: str, layers: int | None = None):
    """The transformers config of ``shape`` (bf16, as the published checkpoints are), with
    ``layers`` decoder blocks where given (a shape's blocks on a GPU too small for all of
    them: the step's time per block is the same)."""
    from transformers import AutoConfig

    model_type, fields = SHAPES[shape]
    if layers is not None:
        fields = {**fields, "num_hidden_layers": layers}
    return AutoConfig.for_model(model_type, dtype="bfloat16", **fields)


def make_model(
    folder: Path,
    shape: str,
    device: str = "cpu",
    config_only: bool = False,
    layers: int | None = None,
) -> Path:
    """A random-init bf16 model folder (config.json + safetensors) of ``shape`` (with
    ``layers`` decoder blocks where given); with ``config_only`` just config.json, which is all
    ``mt check`` reads."""
    import torch
    from transformers import AutoModelForCausalLM

    config = model_config(shape, layers)
    if config_only:
        config.save_pretrained(folder)
        return folder
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="5GB")  # files as the published ones are split
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return folder


def sft_lengths(num_samples: int, max_len: int, mean: int = 600, seed: int = 0) -> np.ndarray:
    """A long-tailed SFT length mix: log-normal (sigma 1) with the given mean, clipped to
    [16, max_len]."""
    rng = np.random.default_rng(seed)
    sigma = 1.0
    mu = np.log(mean) - sigma**2 / 2
    return np.clip(rng.lognormal(mu, sigma, num_samples), 16, max_len).astype(int)


def make_sft_data(
    path: Path,
    num_samples: int,
    vocab: int,
    max_len: int = 8192,
    mean: int = 600,
    seed: int = 0,
    fixed_len: int | None = None,
) -> Path:
    """mt's JSONL with the :func:`sft_lengths` mix, or every sample ``fixed_len`` tokens long (so
    that a chosen batch fills each GPU's row exactly, for throughput); a random 10-60% prompt
    share of each sample is masked (-100), as chat data's prompts are."""
    rng = np.random.default_rng(seed + 1)
    if fixed_len:
        lengths = np.full(num_samples, fixed_len)
    else:
        lengths = sft_lengths(num_samples, max_len, mean, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as out:
        for length in lengths:
            tokens = rng.integers(0, vocab, int(length)).tolist()
            prompt = int(length * rng.uniform(0.1, 0.6))
            labels = [-100] * prompt + tokens[prompt:]
            out.write(json.dumps({"input_ids": tokens, "labels": labels}) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), help="model shape to write to --out")
    parser.add_argument("--out", type=Path, help="model folder to create")
    parser.add_argument("--device", default="cpu", help="where to run the random init")
    parser.add_argument("--config-only", action="store_true", help="write config.json only")
    parser.add_argument("--data", type=Path, help="also write an SFT JSONL file here")
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--vocab", type=int, help="data vocabulary (default: the shape's)")
    parser.add_argument("--max-len", type=int, default=8192)
    options = parser.parse_args()
    if options.shape and options.out:
        make_model(options.out, options.shape, options.device, options.config_only)
        print(f"{options.shape} -> {options.out}")
    if options.data:
        vocab = options.vocab or SHAPES[options.shape or "llama-3.2-1b"][1]["vocab_size"]
        make_sft_data(options.data, options.samples, vocab, options.max_len)
        print(f"{options.samples} samples -> {options.data}")


if __name__ == "__main__":
    main()
