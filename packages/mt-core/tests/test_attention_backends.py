"""Which attention backend ``resolve_attn_backend`` picks for the kernels installed, and what the
flash-attn-4 backend hands its kernel (issue #17).

A backend is available only when the function it calls imports: flash-attn-4 installs
``flash_attn`` as a namespace package holding only ``flash_attn.cute``, and flash-attn 2 loads
CUDA libraries on import. Fake packages in a temporary folder stand in for both, and a CUDA
device is only named, never touched (its compute capability, which flash-attn-4 needs, is faked
where a test asks for it), so all of this runs on a CPU-only machine. A fake flash-attn-4 kernel
that computes attention in plain float32 tensor ops lets its backend run whole models on CPU.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable, Iterator
from importlib.machinery import ModuleSpec
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GptOssConfig,
    LlamaConfig,
    MistralConfig,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from mt_core.model.attention import (
    register_padding_free_attention,
    resolve_attn_backend,
    use_padding_free_attention,
)

CPU = torch.device("cpu")
CUDA = torch.device("cuda")

FUNCTION = "def flash_attn_varlen_func(*args, **kwargs):\n    raise AssertionError('not called')\n"
# flash-attn-4's layout: ``flash_attn`` has no ``__init__.py``; mt calls the forward and backward
# of its autograd function, in ``flash_attn.cute.interface``
HALVES = "def _flash_attn_fwd(*args, **kwargs):\n    raise AssertionError('not called')\n\n\n"
HALVES += HALVES.replace("_fwd", "_bwd")
FA4 = {"flash_attn/cute/__init__.py": "", "flash_attn/cute/interface.py": HALVES}


def _flash_attn_modules() -> list[str]:
    return [name for name in sys.modules if name.split(".")[0] == "flash_attn"]


@pytest.fixture(autouse=True)
def cuda_untouched(monkeypatch: pytest.MonkeyPatch) -> None:
    """Resolution reads only ``device.type``: the CUDA device of these tests is just a name on a
    CPU-only machine, and resolving must have no side effects, so any CUDA call fails a test."""

    def touched(*args: object, **kwargs: object) -> None:
        raise AssertionError("resolve_attn_backend touched CUDA")

    for name in ("is_available", "init", "_lazy_init", "current_device", "device_count"):
        monkeypatch.setattr(torch.cuda, name, touched)


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty folder first on ``sys.path`` for fake packages. A real ``flash_attn`` is hidden:
    its folder is dropped from ``sys.path`` (torch's submodules import through ``torch.__path__``,
    not ``sys.path``), and its modules leave ``sys.modules`` until the test ends."""
    for name in _flash_attn_modules():
        monkeypatch.delitem(sys.modules, name)
    others = [p for p in sys.path if not (Path(p) / "flash_attn").exists()]
    monkeypatch.setattr(sys, "path", [str(tmp_path), *others])
    importlib.invalidate_caches()  # the import system caches folder listings
    yield tmp_path
    # the fakes imported during the test; monkeypatch puts back any real ones after this
    for name in _flash_attn_modules():
        del sys.modules[name]
    importlib.invalidate_caches()


def _write(site: Path, files: dict[str, str]) -> None:
    for relative, text in files.items():
        path = site / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.fixture
def flash_attn_4(site: Path) -> None:
    _write(site, FA4)


class FakeGpu:
    """The compute capability ``torch.cuda.get_device_capability`` reports, and the devices it
    was asked about."""

    def __init__(self) -> None:
        self.capability = (9, 0)
        self.asked: list[object] = []


@pytest.fixture
def gpu(monkeypatch: pytest.MonkeyPatch) -> FakeGpu:
    """A Hopper GPU (SM 9.0) unless a test says otherwise; other CUDA calls still fail a test."""
    fake = FakeGpu()

    def capability(device: object = None) -> tuple[int, int]:
        fake.asked.append(device)
        return fake.capability

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    return fake


@pytest.fixture
def flash_attn_2(site: Path) -> None:
    _write(site, {"flash_attn/__init__.py": FUNCTION})


def test_flash_attn_4_namespace_is_not_flash_attn_2(flash_attn_4: None, gpu: FakeGpu) -> None:
    gpu.capability = (8, 0)  # an A100: flash-attn-4 cannot run, and its namespace is no fa2
    assert resolve_attn_backend("auto", CUDA) == "torch_varlen"  # this torch has varlen_attn
    assert resolve_attn_backend("auto", CPU) == "sdpa"


def test_explicit_flash_attn_with_only_flash_attn_4(flash_attn_4: None) -> None:
    with pytest.raises(ValueError, match="flash_attn_varlen_func") as caught:
        resolve_attn_backend("flash_attn", CUDA)
    message = str(caught.value)
    assert "flash-attn 2" in message and "flash-attn-4" in message and "flash_attn.cute" in message
    assert "pip install flash-attn" in message and "torch_varlen" in message


@pytest.mark.parametrize("capability", [(9, 0), (10, 0), (12, 0)])
def test_auto_picks_flash_attn_4_on_hopper_and_blackwell(
    flash_attn_4: None, gpu: FakeGpu, capability: tuple[int, int]
) -> None:
    gpu.capability = capability
    assert resolve_attn_backend("auto", CUDA) == "flash_attn_4"
    assert resolve_attn_backend("flash_attn_4", CUDA) == "flash_attn_4"
    assert gpu.asked == [CUDA, CUDA]  # the device resolved for, not whichever is current
    assert resolve_attn_backend("auto", CPU) == "sdpa"
    assert len(gpu.asked) == 2  # nothing asked for a CPU run


def test_flash_attn_4_comes_before_flash_attn_2(site: Path, gpu: FakeGpu) -> None:
    # both installed: flash-attn 2's package with flash-attn-4's cute folder inside it
    _write(site, {"flash_attn/__init__.py": FUNCTION, **FA4})
    assert resolve_attn_backend("auto", CUDA) == "flash_attn_4"
    assert resolve_attn_backend("flash_attn", CUDA) == "flash_attn"
    gpu.capability = (8, 0)
    assert resolve_attn_backend("auto", CUDA) == "flash_attn"


def test_explicit_flash_attn_4_below_sm90(flash_attn_4: None, gpu: FakeGpu) -> None:
    gpu.capability = (8, 0)
    with pytest.raises(ValueError, match="attn_backend='flash_attn_4' cannot run here") as caught:
        resolve_attn_backend("flash_attn_4", CUDA)
    message = str(caught.value)
    assert "compute capability 8.0" in message and "9.0 or higher" in message
    assert "'torch_varlen'" in message and "'auto'" in message


@pytest.mark.parametrize("installed", [{}, {"flash_attn/__init__.py": FUNCTION}])
def test_explicit_flash_attn_4_not_installed(site: Path, installed: dict[str, str]) -> None:
    """Nothing installed, or flash-attn 2 alone (a ``flash_attn`` without ``cute``): one error
    saying what to install; the GPU is not asked anything (no ``gpu`` fixture here)."""
    _write(site, installed)
    with pytest.raises(ValueError, match="flash-attn-4 is not installed") as caught:
        resolve_attn_backend("flash_attn_4", CUDA)
    message = str(caught.value)
    assert 'pip install "mt-core[flash-attn-4]"' in message
    assert "pip install flash-attn-4" in message and "'torch_varlen'" in message
    assert resolve_attn_backend("auto", CUDA) == ("flash_attn" if installed else "torch_varlen")


def test_explicit_flash_attn_4_on_cpu(flash_attn_4: None) -> None:
    with pytest.raises(ValueError, match="'flash_attn_4' needs a CUDA device, not cpu.*'sdpa'"):
        resolve_attn_backend("flash_attn_4", CPU)


def test_flash_attn_4_that_fails_to_import(site: Path) -> None:
    """The CuTe DSL raises RuntimeError on import where no runtime flavour suits the driver."""
    cause = "None of the installed toolkit flavors (cu13) are compatible with the CUDA driver"
    _write(site, {"flash_attn/cute/__init__.py": f"raise RuntimeError({cause!r})\n"})
    assert resolve_attn_backend("auto", CUDA) == "torch_varlen"
    with pytest.raises(ValueError, match="flash-attn-4 failed to import") as caught:
        resolve_attn_backend("flash_attn_4", CUDA)
    assert f"RuntimeError: {cause}" in str(caught.value)


def test_flash_attn_4_without_the_functions_mt_calls(site: Path, gpu: FakeGpu) -> None:
    """Another flash-attn-4 release may move the private halves of its autograd function: such
    an install is refused when resolved, naming what is missing, not at the first backward."""
    _write(site, {**FA4, "flash_attn/cute/interface.py": HALVES.split("\n\n\n")[0] + "\n"})
    assert resolve_attn_backend("auto", CUDA) == "torch_varlen"
    with pytest.raises(ValueError, match="flash-attn-4 failed to import") as caught:
        resolve_attn_backend("flash_attn_4", CUDA)
    assert "_flash_attn_bwd" in str(caught.value) and "4.0.0b36" in str(caught.value)


def test_models_with_sinks(site: Path, gpu: FakeGpu) -> None:
    """Only flash-attn-4 and the per-document SDPA compute attention sinks."""
    assert resolve_attn_backend("auto", CUDA, sinks=True) == "sdpa"  # no flash-attn-4
    _write(site, {"flash_attn/__init__.py": FUNCTION, **FA4})
    importlib.invalidate_caches()
    assert resolve_attn_backend("auto", CUDA, sinks=True) == "flash_attn_4"
    assert resolve_attn_backend("flash_attn_4", CUDA, sinks=True) == "flash_attn_4"
    assert resolve_attn_backend("auto", CPU, sinks=True) == "sdpa"
    gpu.capability = (8, 0)  # flash-attn 2 is installed, but has no sinks
    assert resolve_attn_backend("auto", CUDA, sinks=True) == "sdpa"
    for name in ("flash_attn", "torch_varlen"):
        with pytest.raises(ValueError, match="attention sinks") as caught:
            resolve_attn_backend(name, CUDA, sinks=True)
        assert "'flash_attn_4'" in str(caught.value) and "'sdpa'" in str(caught.value)


def test_flash_attn_2_is_picked(flash_attn_2: None) -> None:
    assert resolve_attn_backend("auto", CUDA) == "flash_attn"
    assert resolve_attn_backend("flash_attn", CUDA) == "flash_attn"
    assert resolve_attn_backend("auto", CPU) == "sdpa"
    with pytest.raises(ValueError, match="CUDA"):
        resolve_attn_backend("flash_attn", CPU)


def test_no_flash_attn(site: Path) -> None:
    assert resolve_attn_backend("auto", CUDA) == "torch_varlen"
    with pytest.raises(ValueError, match="needs the flash-attn package.*pip install flash-attn"):
        resolve_attn_backend("flash_attn", CUDA)


@pytest.mark.parametrize(
    ("kind", "cause"),
    [
        ("ImportError", "flash_attn_2_cuda.so: undefined symbol: _ZN3c10"),
        ("OSError", "libcudart.so.12: cannot open shared object file"),
    ],
)
def test_flash_attn_2_that_fails_to_import(site: Path, kind: str, cause: str) -> None:
    """flash-attn 2 built for another torch or CUDA fails in its own ``__init__``: refused when
    resolved, with the cause, not at the first forward."""
    _write(site, {"flash_attn/__init__.py": f"raise {kind}({cause!r})\n"})
    assert resolve_attn_backend("auto", CUDA) == "torch_varlen"
    with pytest.raises(ValueError, match="failed to import") as caught:
        resolve_attn_backend("flash_attn", CUDA)
    assert f"{kind}: {cause}" in str(caught.value)


def test_torch_without_varlen_attn(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``torch.nn.attention.varlen`` without ``varlen_attn`` does not count as torch_varlen."""
    name = "torch.nn.attention.varlen"
    stub = types.ModuleType(name)
    stub.__spec__ = ModuleSpec(name, None)
    monkeypatch.setitem(sys.modules, name, stub)
    assert resolve_attn_backend("auto", CUDA) == "sdpa"
    with pytest.raises(ValueError, match="torch.nn.attention.varlen"):
        resolve_attn_backend("torch_varlen", CUDA)


# ---------------------------------------------------------------------------------------------
# What the flash_attn_4 backend hands flash-attn-4's kernel, and what comes back

# A stand-in for flash_attn.cute.interface: records every call of the two halves mt calls and
# computes what the kernels compute (causal, a left window, GQA, softcapping of the scaled
# scores, a sink logit per head), in float32 with plain tensor ops, one document at a time. Like
# 4.0.0b36's, the forward returns (out, lse, p, row_max, o_lo) and the backward dq, dk, dv (and
# the sinks' gradient when there are sinks).
FA4_REFERENCE = """
import torch

CALLS = []


def _attention(q, k, v, cu_seqlens_q, softmax_scale, window_size_left, learnable_sink, softcap):
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    groups = q.shape[1] // k.shape[1]
    bounds = cu_seqlens_q.tolist()
    outputs, lses = [], []
    for start, end in zip(bounds[:-1], bounds[1:]):
        qd, kd, vd = (t[start:end].float().transpose(0, 1) for t in (q, k, v))
        kd, vd = kd.repeat_interleave(groups, 0), vd.repeat_interleave(groups, 0)
        scores = qd @ kd.transpose(-1, -2) * scale
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        i = torch.arange(end - start)[:, None]
        j = torch.arange(end - start)[None, :]
        seen = j <= i
        if window_size_left is not None:
            seen = seen & (j >= i - window_size_left)
        scores = scores.masked_fill(~seen, float("-inf"))
        if learnable_sink is not None:
            sink = learnable_sink.float()[:, None, None].expand(-1, end - start, 1)
            scores = torch.cat([scores, sink], dim=-1)
        lses.append(torch.logsumexp(scores, dim=-1))
        weights = torch.softmax(scores, dim=-1)[..., : end - start]
        outputs.append((weights @ vd).transpose(0, 1))
    return torch.cat(outputs).to(q.dtype), torch.cat(lses, dim=1)


def _record(half, softmax_scale, causal, window_size_left, window_size_right, softcap, **rest):
    CALLS.append(dict(half=half, softmax_scale=softmax_scale, causal=causal, softcap=softcap,
                      window_size=(window_size_left, window_size_right), **rest))


def _flash_attn_fwd(q, k, v, qv=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                    max_seqlen_k=None, softmax_scale=None, causal=False, window_size_left=None,
                    window_size_right=None, learnable_sink=None, softcap=0.0, return_lse=False,
                    **others):
    _record("forward", softmax_scale, causal, window_size_left, window_size_right, softcap,
            q=q, k=k, v=v, qv=qv, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
            max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
            learnable_sink=learnable_sink, return_lse=return_lse, others=others)
    out, lse = _attention(q, k, v, cu_seqlens_q, softmax_scale, window_size_left,
                          learnable_sink, softcap)
    return out, lse, None, None, None


def _flash_attn_bwd(q, k, v, out, dout, lse, softmax_scale=None, causal=False, softcap=0.0,
                    window_size_left=None, window_size_right=None, cu_seqlens_q=None,
                    cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
                    learnable_sink=None, **others):
    _record("backward", softmax_scale, causal, window_size_left, window_size_right, softcap,
            q=q, k=k, v=v, out=out, dout=dout, lse=lse, cu_seqlens_q=cu_seqlens_q,
            cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
            learnable_sink=learnable_sink, others=others)
    # (torch.func, not autograd: inside a torch op's kernel autograd is switched off)
    def attention(q, k, v, *sinks):
        return _attention(q, k, v, cu_seqlens_q, softmax_scale, window_size_left,
                          sinks[0] if sinks else None, softcap)[0]

    inputs = (q, k, v) + (() if learnable_sink is None else (learnable_sink,))
    _, gradients = torch.func.vjp(attention, *inputs)
    return gradients(dout)
"""


@pytest.fixture
def fa4_kernel(site: Path) -> Callable[..., list[dict]]:
    """The reference flash-attn-4 installed; returns a function that gives the calls so far of
    one half ("forward" or "backward")."""
    _write(site, {**FA4, "flash_attn/cute/interface.py": FA4_REFERENCE})

    def calls(half: str = "forward") -> list[dict]:
        made = importlib.import_module("flash_attn.cute.interface").CALLS
        return [call for call in made if call["half"] == half]

    return calls


class Causal(torch.nn.Module):
    is_causal = True


def _attend(backend: str, q, k, v, cu, max_len, **options) -> torch.Tensor:
    fn = ALL_ATTENTION_FUNCTIONS[register_padding_free_attention(backend)]
    out, _ = fn(
        Causal(), q, k, v, None, dropout=0.0, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
        max_length_q=max_len, max_length_k=max_len, **options,
    )  # fmt: skip
    return out


def _bf16(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The tensors rounded to bf16 (as the kernel gets them) and back, as new leaves: the sdpa
    backend then sees the very numbers the kernel sees, and only the output's rounding differs."""
    return [t.bfloat16().float().requires_grad_() for t in tensors]


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"sliding_window": 3},
        {"sliding_window": 64},  # longer than every document: plain causal
        {"softcap": 2.0},
        {"s_aux": "sinks"},
        {"softcap": 2.0, "s_aux": "sinks", "sliding_window": 4},
    ],
    ids=["causal", "window", "window-past-documents", "softcap", "sinks", "all"],
)
def test_flash_attn_4_kernel_call(fa4_kernel: Callable[..., list[dict]], options: dict) -> None:
    """GQA (4 query heads over 2 K/V heads), three documents, a scale that is not the default:
    the kernel gets the packed layout in bf16, contiguous, every option by keyword, the max
    lengths as Python ints even when the caller has a tensor (the CuTe DSL refuses one), HF's
    sliding window less the query itself; its backward gets what the forward saw and gave; the
    output and gradients are the sdpa backend's."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 17, 8, generator=g) for h in (4, 2, 2))
    q, k, v = _bf16(q, k, v)
    cu = torch.tensor([0, 5, 14, 17], dtype=torch.int32)
    options = dict(options, scaling=0.3)
    if options.get("s_aux") == "sinks":
        options["s_aux"] = torch.randn(4, generator=g).mul(2).requires_grad_()
    out = _attend("flash_attn_4", q, k, v, cu, torch.tensor(9), **options)
    (call,) = fa4_kernel("forward")
    assert type(call["max_seqlen_q"]) is int and type(call["max_seqlen_k"]) is int
    assert call["max_seqlen_q"] == call["max_seqlen_k"] == 9
    assert torch.equal(call["cu_seqlens_q"], cu) and torch.equal(call["cu_seqlens_k"], cu)
    assert call["q"].shape == (17, 4, 8) and call["k"].shape == (17, 2, 8)  # no repeated K/V
    assert call["q"].dtype == call["k"].dtype == call["v"].dtype == torch.bfloat16
    assert all(call[name].is_contiguous() for name in "qkv")
    assert call["qv"] is None and call["causal"] is True and call["softmax_scale"] == 0.3
    window = options.get("sliding_window")
    assert call["window_size"] == ((window - 1, 0) if window and window < 9 else (None, None))
    assert call["softcap"] == options.get("softcap", 0.0)
    sinks = options.get("s_aux")
    assert (call["learnable_sink"] is None) if sinks is None else torch.equal(
        call["learnable_sink"], sinks)  # fmt: skip
    assert call["return_lse"] is True and call["others"] == {}

    leaves = [q, k, v] + ([options["s_aux"]] if "s_aux" in options else [])
    grad_out = torch.randn(out.shape, generator=g)
    got = [out, *torch.autograd.grad(out, leaves, grad_out)]
    (back,) = fa4_kernel("backward")
    for name in ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "learnable_sink"):
        assert (back[name] is None) if call[name] is None else torch.equal(back[name], call[name])
    for name in ("max_seqlen_q", "max_seqlen_k", "softmax_scale", "causal", "window_size",
                 "softcap"):  # fmt: skip
        assert back[name] == call[name], name
    assert torch.equal(back["dout"], grad_out[0].bfloat16())
    assert back["lse"].shape == (4, 17) and back["lse"].dtype == torch.float32
    assert back["others"] == {}
    reference = _attend("sdpa", q, k, v, cu, 9, **options)
    want = [reference, *torch.autograd.grad(reference, leaves, grad_out)]
    for a, b in zip(got, want, strict=True):
        # bf16 output (2^-8 relative) and bf16 gradients of the kernel's inputs
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


def test_flash_attn_4_in_a_compiled_block(
    fa4_kernel: Callable[..., list[dict]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """flash-attn-4 is plain Python around CuTe DSL kernels, which dynamo cannot trace; as two
    torch ops with shape functions it stays inside a compiled block's graph: compiled whole
    (fullgraph: a graph break is an error), forward and backward run the kernels once each,
    with the same arguments, result and gradients as uncompiled."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # dynamo asks; no resolving
    q, k, v = _bf16(*(torch.randn(1, h, 12, 8) for h in (4, 2, 2)))
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    function = ALL_ATTENTION_FUNCTIONS[register_padding_free_attention("flash_attn_4")]
    compiled = torch.compile(function, backend="aot_eager", fullgraph=True)
    try:
        out, _ = compiled(Causal(), q, k, v, None, scaling=0.3, sliding_window=3,
                          cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=7, max_length_k=7)  # fmt: skip
        got = [out, *torch.autograd.grad(out.square().sum(), (q, k, v))]
    finally:
        torch._dynamo.reset()
    (call,) = fa4_kernel("forward")
    assert len(fa4_kernel("backward")) == 1
    assert type(call["max_seqlen_q"]) is int and call["window_size"] == (2, 0)
    assert call["softmax_scale"] == 0.3
    eager = _attend("flash_attn_4", q, k, v, cu, 7, scaling=0.3, sliding_window=3)
    want = [eager, *torch.autograd.grad(eager.square().sum(), (q, k, v))]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)  # the same operations on the same numbers


TEXT = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, vocab_size=64,
)  # fmt: skip
MODELS: dict[str, Callable[[], object]] = {
    "llama": lambda: LlamaConfig(**TEXT),
    "mistral-window": lambda: MistralConfig(**TEXT, sliding_window=4),
    # sinks on alternating windowed and full layers
    "gpt_oss-sinks": lambda: GptOssConfig(
        **TEXT,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
        num_local_experts=4,
        num_experts_per_tok=2,
    ),  # fmt: skip
    "gemma2-softcap": lambda: Gemma2Config(
        **TEXT,
        sliding_window=4,
        attn_logit_softcapping=1.0,
        final_logit_softcapping=None,
        query_pre_attn_scalar=16,
    ),  # fmt: skip
}


def _logits_and_grads(model, cu: torch.Tensor, ids, positions) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    logits = model(
        input_ids=ids, position_ids=positions, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
        max_length_q=int((cu[1:] - cu[:-1]).max()), max_length_k=int((cu[1:] - cu[:-1]).max()),
        use_cache=False,
    ).logits  # fmt: skip
    logits.square().mean().backward()
    return [logits.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("family", MODELS)
def test_flash_attn_4_models_equal_sdpa(fa4_kernel: Callable[[], list[dict]], family: str) -> None:
    """Real HF attention modules hand the backend its options (GPT-OSS's sinks as ``s_aux``,
    Gemma 2's ``softcap``, the windows of some layers, its own scaling); logits and gradients
    through flash_attn_4 equal the sdpa backend's to the bf16 rounding of the kernel's inputs.
    The same model with its sinks or softcapping left out is ten times further off, so the
    tolerance does tell them apart."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(MODELS[family](), dtype=torch.float32).train()
    with torch.no_grad():  # sinks and scores large enough for sinks and softcapping to matter
        for layer in model.model.layers:
            if family == "gpt_oss-sinks":
                layer.self_attn.sinks.normal_(0.0, 2.0)
            if family == "gemma2-softcap":
                layer.self_attn.q_proj.weight.mul_(30.0)
    cu = torch.tensor([0, 7, 9, 20], dtype=torch.int32)
    ids = torch.randint(0, 64, (1, 20), generator=torch.Generator().manual_seed(1))
    positions = torch.cat([torch.arange(int(n)) for n in cu[1:] - cu[:-1]])[None]
    use_padding_free_attention(model, "flash_attn_4")
    got = _logits_and_grads(model, cu, ids, positions)
    calls = fa4_kernel()
    assert len(calls) == 2  # one per layer, and these are the kernel's
    if family == "gpt_oss-sinks":
        assert [
            torch.equal(c["learnable_sink"], layer.self_attn.sinks)
            for c, layer in zip(calls, model.model.layers, strict=True)
        ] == [True, True]
        assert [c["window_size"] for c in calls] == [(3, 0), (None, None)]
    if family == "gemma2-softcap":
        assert {c["softcap"] for c in calls} == {1.0}
        assert {c["softmax_scale"] for c in calls} == {16**-0.5}
    use_padding_free_attention(model, "sdpa")
    want = _logits_and_grads(model, cu, ids, positions)
    scale = [w.abs().max() for w in want]
    errors = [((g - w).abs().max() / s).item() for g, w, s in zip(got, want, scale, strict=True)]
    assert max(errors) < 2e-2, errors
    if family in ("gpt_oss-sinks", "gemma2-softcap"):  # the same model without them
        with torch.no_grad():
            for layer in model.model.layers:
                if family == "gpt_oss-sinks":
                    layer.self_attn.sinks.fill_(-1e4)
                else:
                    layer.self_attn.attn_logit_softcapping = None
        other = _logits_and_grads(model, cu, ids, positions)
        apart = max(
            ((o - w).abs().max() / s).item() for o, w, s in zip(other, want, scale, strict=True)
        )
        assert apart > 10 * max(errors), (apart, errors)


FA2_RECORDING = "CALLS = []\n\n\ndef flash_attn_varlen_func(q, k, v, *args, **kwargs):\n"
FA2_RECORDING += "    CALLS.append(kwargs)\n    return q * 1\n"


def test_the_flash_attn_kernels_are_deterministic_under_the_key(
    fa4_kernel: Callable[..., list[dict]], site: Path
) -> None:
    """Inside deterministic_kernels (the run-file key ``deterministic``) flash-attn-4's backward
    and flash-attn 2's function are asked for their deterministic mode; outside, for nothing
    (their own default)."""
    from mt_core.model.determinism import deterministic_kernels

    _write(site, {"flash_attn/__init__.py": FA2_RECORDING})  # beside flash-attn-4's cute folder
    fa2_calls = importlib.import_module("flash_attn").CALLS
    q, k, v = _bf16(*(torch.randn(1, h, 9, 8) for h in (4, 2, 2)))
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    for enabled in (True, False):
        with deterministic_kernels(enabled):
            out = _attend("flash_attn_4", q, k, v, cu, 5)
            torch.autograd.grad(out.sum(), (q, k, v))
            _attend("flash_attn", q, k, v, cu, 5)
    on, off = fa4_kernel("backward")
    assert on["others"] == {"deterministic": True} and off["others"] == {}
    assert [call.get("deterministic") for call in fa2_calls] == [True, None]
