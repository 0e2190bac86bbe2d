"""Sharded loading reproduces the HF model exactly; the export reloads with plain transformers."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from mt_fsdp import (
    export_hf,
    load_hf_weights,
    materialize,
    parameters_on_meta,
    shard_model,
)


def sharded_copy(config, folder, ctx):
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    assert all(p.device.type == "meta" for p in model.parameters())
    shard_model(model, ctx.mesh, param_dtype=None)
    materialize(model, ctx.device, lambda m: None)
    load_hf_weights(model, folder)
    return model


@pytest.mark.parametrize("tied", [True, False])
def test_sharded_load_gives_the_hf_logits_and_keeps_ties(tmp_path, dist_ctx, tiny_config, tied):
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(tiny_config(tied))
    reference.to(torch.bfloat16).save_pretrained(tmp_path / "src")  # bf16 on disk, fp32 in training
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.float32)
    model = sharded_copy(tiny_config(tied), tmp_path / "src", dist_ctx)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    tokens = torch.randint(0, reference.config.vocab_size, (2, 12))
    with torch.no_grad():
        # buffers (RoPE frequencies) survived the meta construction: logits are bitwise equal
        assert torch.equal(model(tokens).logits, reference(tokens).logits)


@pytest.mark.parametrize("save_dtype", [None, torch.bfloat16])
def test_export_reloads_with_the_in_memory_logits(tmp_path, dist_ctx, tiny_config, save_dtype):
    config = tiny_config(True)
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "src")
    (tmp_path / "src" / "tokenizer_config.json").write_text("{}")
    model = sharded_copy(config, tmp_path / "src", dist_ctx)
    with torch.no_grad():
        for p in model.parameters():  # move away from the source weights, as training would
            p.add_(0.01 * torch.randn_like(p))
    target = export_hf(
        model,
        tmp_path / "hf_format" / "samples_8",
        save_dtype=save_dtype,
        source_folder=tmp_path / "src",
    )
    assert sorted(p.name for p in target.parent.iterdir()) == ["samples_8"]  # no temporary left
    assert (target / "tokenizer_config.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(target, dtype="auto")
    expected_dtype = save_dtype or torch.float32
    assert reloaded.dtype == expected_dtype
    assert json.loads((target / "config.json").read_text()).get("dtype", "float32") == str(
        expected_dtype
    ).removeprefix("torch.")
    tokens = torch.randint(0, config.vocab_size, (2, 12))
    with torch.no_grad():
        if save_dtype is None:
            want = model(tokens).logits
        else:  # the in-memory weights rounded to bf16, in the plain model computing in bf16
            plain = AutoModelForCausalLM.from_config(config, dtype=save_dtype)
            plain.load_state_dict({k: v.full_tensor() for k, v in model.state_dict().items()})
            want = plain(tokens).logits
        # the same weights and the same arithmetic on both sides: equal bit for bit
        torch.testing.assert_close(reloaded(tokens).logits, want, rtol=0, atol=0)


def test_missing_weights_are_named(tmp_path, dist_ctx, tiny_config):
    from safetensors.torch import save_file

    folder = tmp_path / "broken"
    folder.mkdir()
    config = tiny_config(True)
    embedding = torch.zeros(config.vocab_size, config.hidden_size)
    save_file({"model.embed_tokens.weight": embedding}, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"lack \d+ weight\(s\).*model\.layers\.0"):
        sharded_copy(config, folder, dist_ctx)
