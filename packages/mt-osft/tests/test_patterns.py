"""Default target patterns against the real module names of tiny transformers models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mt_osft import DEFAULT_TARGET_PATTERNS, default_target_patterns, match_targets, name_matches

SEPARATE = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]  # fmt: skip
FUSED = ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"]

CASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", SEPARATE, {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", SEPARATE, {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", SEPARATE, {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", SEPARATE, {"head_dim": 8}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", SEPARATE, {}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", FUSED, {"pad_token_id": 0}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", SEPARATE, {"head_dim": 8}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", SEPARATE, {"head_dim": 8}),
}


def test_every_default_has_a_case():
    assert set(CASES) == set(DEFAULT_TARGET_PATTERNS)


@pytest.mark.parametrize("model_type", sorted(CASES))
def test_defaults_match_exactly_the_attention_and_mlp_matrices(model_type, tiny_shape):
    transformers = pytest.importorskip("transformers")
    config_name, model_name, suffixes, extra = CASES[model_type]
    config = getattr(transformers, config_name)(**tiny_shape, **extra)
    assert config.model_type == model_type
    with torch.device("meta"):  # names only: no memory, no initialisation
        model = getattr(transformers, model_name)(config)
    found = match_targets(model, default_target_patterns(config.model_type))
    layers = range(config.num_hidden_layers)
    expected = [f"model.layers.{i}.{s}" for i in layers for s in suffixes]
    assert sorted(found) == sorted(expected)
    modules = dict(model.named_modules())
    assert all(isinstance(modules[name], nn.Linear) for name in found)


def test_unknown_model_type_names_the_key():
    with pytest.raises(ValueError, match="osft_target_patterns.*no default.*'gpt2'"):
        default_target_patterns("gpt2")


def test_glob_and_regex_semantics():
    name = "model.layers.12.self_attn.q_proj"
    assert name_matches(name, "*.self_attn.q_proj")
    assert name_matches(name, "*q_proj")
    assert not name_matches(name, "self_attn.q_proj")  # the whole name must match
    assert not name_matches(name, "*.Q_PROJ")  # case-sensitive
    assert name_matches(name, r"re:.*\.layers\.1[0-9]\..*_proj")
    assert not name_matches(name, r"re:.*\.layers\.[0-9]\..*_proj")
    assert not name_matches(name, "re:layers")  # fullmatch, not search
