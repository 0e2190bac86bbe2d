"""Padding-free equivalence: a packed minibatch (one row of concatenated samples, per-document
attention, already-shifted targets, loss divided by the global target count) gives the loss and
every parameter gradient of the unmodified HF model run on each sample alone.

Tolerances (float32): the packed and per-sample runs do the same sums in other orders, so losses
and every gradient element (relative to the model's largest gradient) agree to 2γ_n, n the tokens
plus hidden, intermediate and vocabulary sizes (conftest.pair_rtol: 6.7e-5 here; measured: 2e-7
and 3e-7). Letting documents attend to each other moves the loss by 4e-4..6e-3 relative and
gradients by 0.4..1 of that scale: each negative check below demands at least 3x the tolerance
on the loss and 100x on the gradients.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GraniteConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

from mt_core.model.attention import (
    ATTN_BACKENDS,
    register_padding_free_attention,
    resolve_attn_backend,
    use_padding_free_attention,
)
from mt_core.trainer.loss import minibatch_loss

CPU = torch.device("cpu")
TINY_VOCAB = 128  # TINY_SHAPE's vocab_size in conftest.py

# (config class, overrides): every architecture the issue names, plus the features that change
# attention: tied embeddings, sliding windows (8 tokens, shorter than most samples), qk-norm,
# fused qkv with partial rotary, and Granite's custom attention scaling and multipliers.
ARCHITECTURES = {
    "llama-untied": (LlamaConfig, {"tie_word_embeddings": False}),
    "llama-tied": (LlamaConfig, {"tie_word_embeddings": True}),
    "qwen2-window": (
        Qwen2Config,
        {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1},
    ),
    "qwen3": (Qwen3Config, {"head_dim": 16}),
    "mistral-window": (MistralConfig, {"sliding_window": 8}),
    "phi3": (
        Phi3Config,
        {
            "pad_token_id": None,
            "eos_token_id": 2,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
            },
        },
    ),
    "granite": (
        GraniteConfig,
        {
            "attention_multiplier": 0.3,
            "embedding_multiplier": 2.0,
            "residual_multiplier": 0.5,
            "logits_scaling": 2.0,
        },
    ),
}


@pytest.fixture
def dataset(sft_dataset, equivalence):
    data = sft_dataset(equivalence.sft_rows(seed=1, vocab=TINY_VOCAB))
    assert len(data) == 6 and int(data.lengths.max()) > 8  # the windows of 8 tokens matter
    return data


def rtol(eq, model, dataset) -> float:
    return eq.pair_rtol(model.config, int(dataset.lengths.sum()))


def assert_close(eq, rtol, loss, grads: dict, ref_loss, ref_grads: dict) -> None:
    assert loss == pytest.approx(ref_loss, rel=rtol)
    difference, name = eq.grad_difference(grads, ref_grads)
    assert difference <= rtol, f"{name}: gradients differ by {difference:.2e} of their scale"


def assert_clearly_different(eq, rtol, loss, grads: dict, ref_loss, ref_grads: dict) -> None:
    assert abs(loss - ref_loss) > 3 * rtol * abs(ref_loss)
    assert eq.grad_difference(grads, ref_grads)[0] > 100 * rtol


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_packed_minibatch_equals_samples_alone(arch, tiny_causal_lm, dataset, equivalence):
    eq = equivalence
    config_class, overrides = ARCHITECTURES[arch]
    model = tiny_causal_lm(config_class, **overrides)
    ids = list(range(len(dataset)))
    count = eq.global_count(dataset, ids)

    use_padding_free_attention(model, "sdpa")
    loss, packed_grads = eq.packed_loss_and_grads(model, [eq.packed(dataset, ids, count)])
    ref_loss, ref_grads = eq.reference_loss_and_grads(model, dataset, ids)

    assert_close(eq, rtol(eq, model, dataset), loss, packed_grads, ref_loss, ref_grads)

    # Negative check: the same row as ONE document (attention crossing sample boundaries, as
    # plain causal attention over the row would) is far outside the tolerances above.
    use_padding_free_attention(model, "sdpa")
    leaky = eq.packed(dataset, ids, count)
    leaky["cu_seqlens"] = torch.tensor([0, leaky["input_ids"].shape[1]], dtype=torch.int32)
    leaky["max_seqlen"] = leaky["input_ids"].shape[1]
    leaked = eq.packed_loss_and_grads(model, [leaky])
    assert_clearly_different(eq, rtol(eq, model, dataset), *leaked, ref_loss, ref_grads)


def test_sliding_window_changes_the_result(tiny_causal_lm, dataset, equivalence):
    """The window cases above test something: with the same weights, a window of 8 tokens gives
    another loss and other gradients than no window on these samples."""
    eq = equivalence
    ids = list(range(len(dataset)))
    batch = eq.packed(dataset, ids, eq.global_count(dataset, ids))
    results = []
    for window in (8, None):
        model = tiny_causal_lm(MistralConfig, sliding_window=window)
        use_padding_free_attention(model, "sdpa")
        results.append(eq.packed_loss_and_grads(model, [batch]))
    assert_clearly_different(eq, rtol(eq, model, dataset), *results[0], *results[1])


def test_split_minibatches_accumulate_to_one(tiny_causal_lm, dataset, equivalence):
    eq = equivalence
    model = tiny_causal_lm(LlamaConfig)
    use_padding_free_attention(model, "sdpa")
    ids = list(range(len(dataset)))
    count = eq.global_count(dataset, ids)
    whole_loss, whole = eq.packed_loss_and_grads(model, [eq.packed(dataset, ids, count)])
    split_loss, split = eq.packed_loss_and_grads(
        model, [eq.packed(dataset, ids[:2], count), eq.packed(dataset, ids[2:], count)]
    )
    assert_close(eq, rtol(eq, model, dataset), split_loss, split, whole_loss, whole)


def test_empty_minibatch_adds_exactly_nothing(tiny_causal_lm, dataset, equivalence):
    eq = equivalence
    model = tiny_causal_lm(LlamaConfig, tie_word_embeddings=True)
    use_padding_free_attention(model, "sdpa")
    ids = list(range(len(dataset)))
    count = eq.global_count(dataset, ids)
    empty = eq.packed(dataset, [], count)
    assert empty["input_ids"].shape == (1, 0)

    # alone, it still reaches every parameter (FSDP's collectives run), with zero loss and grad
    model.zero_grad(set_to_none=True)
    loss = minibatch_loss(model, **empty)
    assert loss.requires_grad and loss.item() == 0.0
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0, name

    # after a real minibatch, it leaves every gradient bit for bit as it was
    _, before = eq.packed_loss_and_grads(model, [eq.packed(dataset, ids, count)])
    minibatch_loss(model, **empty).backward()
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, before[name]), name


def test_what_padding_free_attention_cannot_do_is_refused(tiny_causal_lm):
    model = tiny_causal_lm(LlamaConfig)
    use_padding_free_attention(model, "sdpa")
    with pytest.raises(ValueError, match="cu_seq_lens_q"):  # e.g. a padded batch
        model(input_ids=torch.zeros((1, 4), dtype=torch.long))
    with pytest.raises(ValueError, match="global_num_loss_tokens"):
        minibatch_loss(model, **packed_row_of(4, global_num_loss_tokens=0))

    model = tiny_causal_lm(LlamaConfig, attention_dropout=0.1)
    use_padding_free_attention(model, "sdpa")
    with pytest.raises(ValueError, match="attention_dropout"):
        minibatch_loss(model, **packed_row_of(4, global_num_loss_tokens=3))


def packed_row_of(length: int, global_num_loss_tokens: int) -> dict:
    """One document of ``length`` tokens, targets all learnt but the last."""
    tokens = torch.arange(length)[None]
    targets = torch.cat([tokens[:, 1:], torch.tensor([[-100]])], dim=1)
    return dict(
        input_ids=tokens, position_ids=tokens.clone(), targets=targets,
        cu_seqlens=torch.tensor([0, length], dtype=torch.int32), max_seqlen=length,
        global_num_loss_tokens=global_num_loss_tokens,
    )  # fmt: skip


def test_backend_resolution_on_cpu():
    assert ATTN_BACKENDS == ("auto", "flash_attn", "torch_varlen", "sdpa", "flash_attn_4")
    assert resolve_attn_backend("auto", CPU) == "sdpa"
    assert resolve_attn_backend("sdpa", CPU) == "sdpa"
    for cuda_only in ("flash_attn", "torch_varlen", "flash_attn_4"):
        with pytest.raises(ValueError, match="CUDA"):
            resolve_attn_backend(cuda_only, CPU)
    with pytest.raises(ValueError, match="choose one of"):
        resolve_attn_backend("flash", CPU)
    with pytest.raises(ValueError, match="resolve"):
        register_padding_free_attention("auto")
    # names transformers would reinterpret ("flash...", "...sdpa...") are avoided
    names = {register_padding_free_attention(b) for b in ATTN_BACKENDS[1:]}
    assert len(names) == 4 and not any("flash" in n or "sdpa" in n for n in names)
    assert register_padding_free_attention("sdpa") in names  # idempotent
