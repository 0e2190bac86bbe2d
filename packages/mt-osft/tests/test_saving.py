"""Saving and resuming: dense weights under the original names that load into the unmodified
architecture (a custom module and a tiny transformers Llama), output dtype, and an exact resume
of the OSFT state."""

from __future__ import annotations

import torch
from torch import nn

from mt_osft import OSFTConfig, apply_osft


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(12, 30), nn.GELU(), nn.Linear(30, 12))
        self.out = nn.Linear(12, 5)

    def forward(self, x):
        return self.out(self.inner(x))


PATTERNS = ["inner.0", "inner.2"]


def _net() -> Net:
    torch.manual_seed(0)
    return Net()


def _steps(model, state, steps, seed=3):
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 12, generator=generator), torch.randn(16, 5, generator=generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(steps):
        ((model(x) - y) ** 2).mean().backward()
        state.project_gradients_()
        optimizer.step()
        state.project_()
        optimizer.zero_grad()
    return optimizer


def test_model_state_dict_is_unchanged_by_osft():
    model = _net()
    before = model.state_dict()
    apply_osft(model, OSFTConfig(0.5, PATTERNS))
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(
        after[k].dtype == before[k].dtype and after[k].shape == before[k].shape for k in after
    )


def test_dense_state_dict_reloads_into_the_unmodified_module():
    model = _net()
    state = apply_osft(model, OSFTConfig(0.5, PATTERNS))
    _steps(model, state, 5)
    fresh = _net()  # the plain architecture, never touched by OSFT
    fresh.load_state_dict(state.dense_state_dict(model), strict=True)
    x = torch.randn(7, 12)
    assert torch.equal(fresh(x), model(x))
    assert not torch.equal(fresh.inner[0].weight, _net().inner[0].weight)  # it trained


def test_output_dtype_casts_the_targets_only():
    model = _net()
    state = apply_osft(model, OSFTConfig(0.5, PATTERNS, output_dtype=torch.bfloat16))
    dense = state.dense_state_dict(model)
    assert dense["inner.0.weight"].dtype == torch.bfloat16
    assert dense["inner.2.weight"].dtype == torch.bfloat16
    assert dense["inner.0.bias"].dtype == torch.float32
    assert dense["out.weight"].dtype == torch.float32
    default = apply_osft(_net(), OSFTConfig(0.5, PATTERNS)).dense_state_dict(_net())
    assert default["inner.0.weight"].dtype == torch.float32  # the weight's own dtype


def test_svd_is_deterministic():
    a = apply_osft(_net(), OSFTConfig(0.4, PATTERNS)).state_dict()
    b = apply_osft(_net(), OSFTConfig(0.4, PATTERNS)).state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_restores_the_osft_state_exactly(tmp_path):
    config = OSFTConfig(0.3, PATTERNS)
    # Uninterrupted: 10 steps.
    straight = _net()
    straight_state = apply_osft(straight, config)
    _steps(straight, straight_state, 10)
    # Interrupted after 4: save model, optimizer and OSFT state; resume in a fresh process-like
    # setting (a new model, OSFT rebuilt without an SVD, everything loaded), 6 more steps.
    first = _net()
    first_state = apply_osft(first, config)
    optimizer = _steps(first, first_state, 4)
    torch.save(
        {
            "model": first.state_dict(),
            "opt": optimizer.state_dict(),
            "osft": first_state.state_dict(),
        },
        tmp_path / "ckpt.pt",
    )
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed = _net()
    resumed.load_state_dict(saved["model"])
    resumed_state = apply_osft(resumed, config, ratios=first_state.ratios, decompose=False)
    resumed_state.load_state_dict(saved["osft"])
    generator = torch.Generator().manual_seed(3)
    x, y = torch.randn(16, 12, generator=generator), torch.randn(16, 5, generator=generator)
    optimizer = torch.optim.AdamW(resumed.parameters(), lr=1e-2, weight_decay=0.1)
    optimizer.load_state_dict(saved["opt"])
    for _ in range(6):
        ((resumed(x) - y) ** 2).mean().backward()
        resumed_state.project_gradients_()
        optimizer.step()
        resumed_state.project_()
        optimizer.zero_grad()
    for (name, a), b in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_tiny_llama_export_reloads_in_plain_transformers(tmp_path, tiny_llama):
    from transformers import LlamaForCausalLM  # installed: tiny_llama skips the test otherwise

    model = tiny_llama()
    config = model.config
    name = "model.layers.0.self_attn.q_proj.weight"
    original = model.state_dict()[name].clone()
    state = apply_osft(model, OSFTConfig(0.5), model_type=config.model_type)
    assert len(state.targets) == config.num_hidden_layers * 7
    ids = torch.randint(0, config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        state.project_gradients_()
        optimizer.step()
        state.project_()
        optimizer.zero_grad()
    model.save_pretrained(tmp_path, state_dict=state.dense_state_dict(model))
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        got = reloaded(input_ids=ids).logits
    assert torch.equal(got, expected)
    assert not torch.equal(reloaded.state_dict()[name], original)  # the trained weights
