"""Model families beyond plain causal LMs (mt_core.model.families): vision-language models trained on
text (Mistral3, Gemma3, Qwen3-VL), GPT-OSS (MoE router, attention sinks, MXFP4 experts) and
hybrid attention / state-space models whose recurrent layers run per document (mt_core.model.recurrent:
Bamba and GraniteMoeHybrid's Mamba2, LFM2's short convolutions, Qwen3-Next's gated delta rule).

For each, on a tiny random config in float32:
* a packed minibatch gives the loss and gradients of the unmodified HF model run on each sample
  alone (eager attention): the loss and every gradient element (relative to the model's largest
  gradient) to 2γ_n, as in test_padding_free.py (conftest.pair_rtol; measured: <= 3e-7);
* one step of ``mt_core.train`` on a folder written by save_pretrained equals AdamW applied by
  hand to float64 reference gradients (conftest.first_step_atol), frozen weights (vision tower,
  projector, router) are exported bit for bit as they were, and the export reloads with the
  original class and gives the logits of the hand-stepped model (float32 forward passes of the
  same weights: within 2γ_n of the largest logit).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    BambaConfig,
    Gemma3Config,
    GptOssConfig,
    GraniteMoeHybridConfig,
    JambaConfig,
    Lfm2Config,
    Mistral3Config,
    MixtralConfig,
    Mxfp4Config,
    Qwen3MoeConfig,
    Qwen3NextConfig,
    Qwen3VLConfig,
)
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from mt_core.config import ConfigError
from mt_core.model.attention import use_padding_free_attention
from mt_core.model.families import freeze_untrained, mxfp4_experts, new_model
from mt_core.model.recurrent import recurrent_layers
from mt_fsdp.mxfp4 import dequantize, quantize

VOCAB = 128
LR = 1e-2

TEXT = {
    "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "vocab_size": VOCAB, "max_position_embeddings": 128,
}  # fmt: skip
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
          "num_attention_heads": 2, "image_size": 32, "patch_size": 8}  # fmt: skip
# sliding windows of 8 tokens, shorter than most samples, on the first of the two layers
WINDOWS = {"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]}
# Mamba2 mixers of 4 heads, scanned in chunks of 16 tokens (shorter than most samples)
MAMBA2 = {"mamba_n_heads": 4, "mamba_d_head": 32, "mamba_d_state": 16, "mamba_chunk_size": 16}
MOE = {"num_experts_per_tok": 2, "router_aux_loss_coef": 0.0}
# weights 10x the default scale: state crossing documents then changes the loss visibly
LARGE_INIT = {"initializer_range": 0.2}

FAMILIES = {
    "mistral3": lambda: Mistral3Config(
        text_config={"model_type": "mistral", **TEXT, "sliding_window": 8},
        vision_config={"model_type": "pixtral", **VISION},
    ),
    "gemma3": lambda: Gemma3Config(
        text_config={**TEXT, **WINDOWS, "query_pre_attn_scalar": 24},
        vision_config=VISION,
        mm_tokens_per_image=4,
    ),  # fmt: skip
    # text-only positions: the three M-RoPE axes all carry the token's position
    "qwen3_vl": lambda: Qwen3VLConfig(
        text_config={
            **TEXT,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1e4,
                "mrope_section": [2, 3, 3],
            },
        },
        vision_config={
            "depth": 1,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 64,
            "deepstack_visual_indexes": [0],
        },
    ),  # fmt: skip
    "gpt_oss": lambda: GptOssConfig(
        **TEXT,
        **WINDOWS,
        num_local_experts=4,
        num_experts_per_tok=2,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4},
    ),  # fmt: skip
    # experts that a checkpoint stores one by one (transformers fuses them on load)
    "mixtral": lambda: MixtralConfig(**TEXT, **MOE, num_local_experts=4),
    "qwen3_moe": lambda: Qwen3MoeConfig(**TEXT, **MOE, num_experts=4, moe_intermediate_size=32),
    # hybrids: a recurrent layer first, then attention
    "bamba": lambda: BambaConfig(**TEXT, **MAMBA2, attn_layer_indices=[1]),
    "granitemoehybrid": lambda: GraniteMoeHybridConfig(
        **TEXT,
        **MAMBA2,
        **MOE,
        layer_types=["mamba", "attention"],
        num_local_experts=4,
        shared_intermediate_size=32,
    ),  # fmt: skip
    "lfm2": lambda: Lfm2Config(**TEXT, **LARGE_INIT, layer_types=["conv", "full_attention"]),
    # experts (stored one by one, as save_pretrained writes them) and a shared expert
    "qwen3_next": lambda: Qwen3NextConfig(
        **TEXT,
        **MOE,
        num_experts=4,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        layer_types=["linear_attention", "full_attention"],
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
    ),  # fmt: skip
}
VLMS = ("mistral3", "gemma3", "qwen3_vl")
HYBRIDS = ("bamba", "granitemoehybrid", "lfm2", "qwen3_next")
EXPERTS = [f"model.layers.{i}.mlp.experts.{kind}" for i in range(2)
           for kind in ("gate_up_proj", "down_proj")]  # fmt: skip


def tiny(family: str):
    """The float32 random-init model of ``family``, built as mt builds it, frozen as mt trains
    it; GPT-OSS's attention sinks made large enough to matter."""
    torch.manual_seed(0)
    model = new_model(FAMILIES[family](), torch.float32).train()
    if family == "gpt_oss":
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.sinks.normal_(0.0, 2.0)
    freeze_untrained(model)
    return model


@pytest.fixture
def dataset(sft_dataset, equivalence):
    data = sft_dataset(equivalence.sft_rows(seed=1, vocab=VOCAB))
    assert int(data.lengths.max()) > 8  # the windows of 8 tokens matter
    return data


def frozen_names(model) -> set[str]:
    return {name for name, p in model.named_parameters() if not p.requires_grad}


def test_what_is_frozen():
    for family in VLMS:
        model = tiny(family)
        # trained: the text decoder and the LM head (tied or not); frozen: everything else
        text = {*model.get_decoder().parameters(), *model.get_output_embeddings().parameters()}
        trained = {p for p in model.parameters() if p.requires_grad}
        assert trained == text, family
        assert any(
            n.startswith(("model.visual", "model.vision_tower")) for n in frozen_names(model)
        )
        assert type(model).__name__.endswith("ForConditionalGeneration")
    gpt = tiny("gpt_oss")
    assert frozen_names(gpt) == {
        f"model.layers.{i}.mlp.router.{kind}" for i in range(2) for kind in ("weight", "bias")
    }


def test_recurrent_layers_found_and_unknown_hybrids_refused():
    for family in FAMILIES:
        layers = recurrent_layers(tiny(family))
        # exactly the first layer's mixer in a hybrid, none elsewhere
        assert len(layers) == (family in HYBRIDS), family
    # Jamba's Mamba (1) mixers are not run per document: refused, by name, not trained inexactly
    jamba = new_model(
        JambaConfig(**TEXT, num_experts=1, attn_layer_period=2, attn_layer_offset=1,
                    mamba_d_state=8, mamba_dt_rank=8),
        torch.float32,
    )  # fmt: skip
    assert len(recurrent_layers(jamba)) == 1
    with pytest.raises(ConfigError, match="model type 'jamba' has state-space"):
        use_padding_free_attention(jamba, "sdpa")


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_minibatch_equals_samples_alone(family, dataset, equivalence):
    eq = equivalence
    model = tiny(family)
    ids = list(range(len(dataset)))
    count = eq.global_count(dataset, ids)
    use_padding_free_attention(model, "sdpa")
    loss, grads = eq.packed_loss_and_grads(model, [eq.packed(dataset, ids, count)])
    ref_loss, ref_grads = eq.reference_loss_and_grads(model, dataset, ids)
    rtol = eq.pair_rtol(model.config.get_text_config(), int(dataset.lengths.sum()))
    assert loss == pytest.approx(ref_loss, rel=rtol)
    difference, name = eq.grad_difference(grads, ref_grads)
    assert difference <= rtol, f"{name}: gradients differ by {difference:.2e} of their scale"
    assert frozen_names(model).isdisjoint(grads)
    if family in HYBRIDS:  # without the per-document layers, state flows across documents
        for layer in recurrent_layers(model):
            del layer.forward  # back to the class's own forward
        try:
            leaked, other = eq.packed_loss_and_grads(model, [eq.packed(dataset, ids, count)])
        except ValueError as error:  # transformers 5.24's torch gated delta rule refuses rows
            assert "packed sequences" in str(error)
        else:  # measured: loss 1e-5 to 1e-2 relative (within rounding for some), gradients 0.1
            # to 0.5 of their scale: the gradients show the leak
            assert leaked != ref_loss
            assert eq.grad_difference(other, ref_grads)[0] > 100 * rtol
    if family == "gpt_oss":  # the sinks take part: without them the loss is another
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.sinks.fill_(-1e4)
        use_padding_free_attention(model, "sdpa")
        without, other = eq.packed_loss_and_grads(model, [eq.packed(dataset, ids, count)])
        assert abs(without - ref_loss) > 2 * rtol * ref_loss  # measured 3.3x
        assert eq.grad_difference(other, ref_grads)[0] > 100 * rtol


def write_mxfp4(folder: Path) -> None:
    """Rewrites a GPT-OSS folder as its release is stored: experts as MXFP4 blocks/scales."""
    weights = load_file(folder / "model.safetensors")
    for name in [n for n in weights if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        weights[f"{name}_blocks"], weights[f"{name}_scales"] = quantize(
            weights.pop(name).transpose(-1, -2)
        )
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                   "model.embed_tokens", "lm_head"],
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))


def reload(folder: Path, family: str, mxfp4: bool):
    if mxfp4:  # transformers' own MXFP4 reader, dequantizing on the CPU (to bfloat16 in 5.17:
        # exact, MXFP4 values have 2 significant bits)
        return AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, quantization_config=Mxfp4Config(dequantize=True)
        ).float()
    auto = AutoModelForImageTextToText if family in VLMS else AutoModelForCausalLM
    return auto.from_pretrained(folder, dtype=torch.float32)


def logits(model) -> torch.Tensor:
    model.set_attn_implementation("eager")
    ids = (torch.arange(40).reshape(2, 20) * 7) % VOCAB
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize(
    ("family", "mxfp4"), [*((f, False) for f in FAMILIES), ("gpt_oss", True)]
)  # fmt: skip
def test_one_step_through_mt_and_the_export(family, mxfp4, tmp_path, equivalence, sft_dataset):
    from mt_core import args_from_dict, train

    source = tmp_path / "model"
    model = tiny(family)
    model.save_pretrained(source)
    if mxfp4:
        write_mxfp4(source)
        weights = load_file(source / "model.safetensors")
        assert (
            mxfp4_experts(new_model(AutoConfig.from_pretrained(source), torch.float32)) == EXPERTS
        )
        with torch.no_grad():  # what mt trains: the dequantized experts
            for name in EXPERTS:
                blocks, scales = weights[f"{name}_blocks"], weights[f"{name}_scales"]
                model.get_parameter(name).copy_(
                    dequantize(blocks, scales, torch.float32).transpose(-1, -2)
                )
    rows = equivalence.sft_rows(seed=2, vocab=VOCAB, num_samples=4)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    dataset = sft_dataset(rows)

    # the reference, in float64: the unmodified model's gradients over the 4 samples, each alone
    reference = copy.deepcopy(model).double()
    if reference._can_set_experts_implementation():  # grouped_mm has no float64 kernel
        reference.set_experts_implementation("eager")
    ref_loss, ref_grads = equivalence.reference_loss_and_grads(reference, dataset, range(4))
    # eps = the largest gradient: |g| / (|g| + eps) spans 0..1/2 and the update is at most
    # lr / eps as sensitive to a gradient error (conftest.first_step_atol)
    eps = max(g.abs().max().item() for g in ref_grads.values())
    args = args_from_dict({
        "model_name_or_path": str(source), "data_path": str(data),
        "output_dir": str(tmp_path / "out"), "batch_size": 4, "max_tokens_per_gpu": 200,
        "learning_rate": LR, "eps": eps, "weight_decay": 0.0, "max_grad_norm": 0.0,
        "lr_scheduler": "constant", "num_warmup_steps": 0, "training_mode": "step",
        "max_steps": 1, "seed": 7, "train_dtype": "float32", "save_dtype": "float32",
        "attn_backend": "sdpa",
    })  # fmt: skip
    result = train(args)
    (export,) = result.exports

    # mt's float32 loss and gradients are within γ_n of the float64 ones (half of pair_rtol)
    rtol = equivalence.pair_rtol(model.config.get_text_config(), int(dataset.lengths.sum())) / 2
    assert result.last_loss == pytest.approx(ref_loss, rel=rtol)
    weights = dict(model.named_parameters())
    expected = equivalence.adamw_first_step(weights, ref_grads, lr=LR, eps=eps)
    atol = {
        name: equivalence.first_step_atol(w, lr=LR, eps=eps, grad_error=rtol * eps)
        for name, w in weights.items()
    }

    original = load_file(source / "model.safetensors")
    saved = load_file(export / "model.safetensors")
    assert saved.keys() == original.keys()  # the original layout, names and all
    for name, tensor in saved.items():
        assert tensor.dtype == original[name].dtype, name
    frozen = frozen_names(model)
    trained = reload(export, family, mxfp4)
    for name, p in trained.named_parameters():
        if name in frozen:
            assert torch.equal(p.double(), expected[name]), f"{name} (frozen) moved"
        elif not (mxfp4 and name in EXPERTS):
            error = (p.double() - expected[name]).abs()
            assert (error <= atol[name]).all(), (name, (error / atol[name]).max().item())
    if mxfp4:
        check_mxfp4_export(saved, original, expected, atol)
    # the reloaded class computes what the model trained: the same weights give the same logits,
    # bit for bit (the same float32 code on the same numbers)
    stepped = tiny(family)
    stepped.load_state_dict({name: p.detach() for name, p in trained.named_parameters()},
                            strict=False)  # fmt: skip
    assert torch.equal(logits(trained), logits(stepped))


def check_mxfp4_export(saved: dict, original: dict, expected: dict, atol: dict) -> None:
    """The export's experts are the trained weights rounded to MXFP4: within half a step of the
    E2M1 grid at each block's scale (the largest step, 2 at scale 1, bounds it), read the same
    by transformers' decoder, and training moved them (codes changed)."""
    for name in [n.removesuffix("_blocks") for n in saved if n.endswith("_blocks")]:
        blocks, scales = saved[f"{name}_blocks"], saved[f"{name}_scales"]
        ours = dequantize(blocks, scales, torch.float32)
        theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
        assert torch.equal(theirs, ours.transpose(-1, -2)), name
        step = torch.ldexp(torch.ones_like(scales, dtype=torch.float32), scales.int() - 127)
        error = (ours - expected[name].transpose(-1, -2)).abs().unflatten(-1, (-1, 32))
        bound = step.unsqueeze(-1) + atol[name].transpose(-1, -2).unflatten(-1, (-1, 32))
        assert (error <= bound).all(), name
        assert not torch.equal(blocks, original[f"{name}_blocks"]), name
