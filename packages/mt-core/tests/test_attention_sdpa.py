"""The sdpa backend as one torch op (mt::sdpa_per_document): its shape function and backward
agree with what it computes (torch.library.opcheck), its gradients are those of the
per-document loop differentiated directly, bit for bit, and a compiled block keeps it inside one
graph (fullgraph: a graph break is an error) with the eager result, bit for bit."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from mt_core.model.attention_sdpa import _attend, sdpa_per_document

# (1, heads, tokens, head_dim) with 4 query heads over 2 key/value heads; three documents
CU = torch.tensor([0, 5, 6, 14], dtype=torch.int32)
CASES = {
    "causal": dict(scaling=None, sliding_window=None, softcap=None, sinks=False),
    "window": dict(scaling=0.3, sliding_window=3, softcap=None, sinks=False),
    "softcap": dict(scaling=None, sliding_window=4, softcap=1.5, sinks=False),
    "sinks": dict(scaling=0.25, sliding_window=None, softcap=None, sinks=True),
}


def _inputs(case: dict) -> tuple[list[torch.Tensor], dict]:
    generator = torch.Generator().manual_seed(0)
    # transposed from (1, tokens, heads, head_dim), as HF's attention modules hand them over
    tensors = [torch.randn(1, 14, heads, 8, generator=generator).transpose(1, 2).requires_grad_()
               for heads in (4, 2, 2)]  # fmt: skip
    if case["sinks"]:
        tensors.append(torch.randn(4, generator=generator, requires_grad=True))
    options = {name: case[name] for name in ("scaling", "sliding_window", "softcap")}
    return tensors, options


def _call(function, tensors: list[torch.Tensor], options: dict) -> torch.Tensor:
    q, k, v, *sinks = tensors
    out, _ = function(torch.nn.Module(), q, k, v, None, **options, s_aux=sinks[0] if sinks else None,
                      cu_seq_lens_q=CU, cu_seq_lens_k=CU, max_length_q=8, max_length_k=8)  # fmt: skip
    return out


@pytest.mark.parametrize("case", CASES)
def test_the_op_passes_torch_opcheck(case: str) -> None:
    tensors, options = _inputs(CASES[case])
    q, k, v, *sinks = tensors
    args = (q, k, v, CU, CU, options["scaling"], options["sliding_window"], options["softcap"],
            sinks[0] if sinks else None)  # fmt: skip
    torch.library.opcheck(torch.ops.mt.sdpa_per_document.default, args)
    # the backward op alone (opcheck's cross-checks cannot look inside its torch.func
    # transform): its shape function gives the sizes, strides and dtypes it returns
    plain = [t.detach() for t in (q, k, v, *sinks)]
    args = (torch.randn(1, 14, 4, 8), *plain[:3], *args[3:8], plain[3] if sinks else None)
    backward = torch.ops.mt.sdpa_per_document_backward.default
    with FakeTensorMode() as mode:
        fake = backward(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
    for f, r in zip(fake, backward(*args), strict=True):
        assert (f.shape, f.stride(), f.dtype) == (r.shape, r.stride(), r.dtype)


@pytest.mark.parametrize("case", CASES)
def test_gradients_are_those_of_the_loop_differentiated_directly(case: str) -> None:
    tensors, options = _inputs(CASES[case])
    out = _call(sdpa_per_document, tensors, options)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    got = [out, *torch.autograd.grad(out, tensors, grad_out)]
    q, k, v, *sinks = tensors
    direct = _attend(q, k, v, CU.tolist(), options["scaling"], options["sliding_window"],
                     options["softcap"], sinks[0] if sinks else None)  # fmt: skip
    want = [direct, *torch.autograd.grad(direct, tensors, grad_out)]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)  # the same operations on the same numbers


@pytest.mark.parametrize("case", ["window", "sinks"])
def test_a_compiled_call_keeps_the_op_in_one_graph(case: str) -> None:
    tensors, options = _inputs(CASES[case])
    compiled = torch.compile(sdpa_per_document, backend="aot_eager", fullgraph=True)
    try:
        out = _call(compiled, tensors, options)
        got = [out, *torch.autograd.grad(out.square().sum(), tensors)]
    finally:
        torch._dynamo.reset()
    eager = _call(sdpa_per_document, tensors, options)
    want = [eager, *torch.autograd.grad(eager.square().sum(), tensors)]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)  # aot_eager runs the same operations


def test_documents_that_do_not_cover_the_row_are_refused() -> None:
    tensors, options = _inputs(CASES["causal"])
    q, k, v = tensors
    short = torch.tensor([0, 5, 12], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"covers tokens 0\.\.12, the row has 14"):
        sdpa_per_document(torch.nn.Module(), q, k, v, None, cu_seq_lens_q=short,
                          cu_seq_lens_k=short, max_length_q=7, max_length_k=7)  # fmt: skip


def test_the_backward_pass_keeps_the_inputs_not_the_scores() -> None:
    """What autograd keeps of a call for the backward pass: the inputs (query, key, value, the
    bounds, the sinks) and nothing of the (heads, tokens, tokens) scores, which the backward
    pass computes again: the memory of a long document's scores is one layer's at a time."""
    tensors, options = _inputs(CASES["sinks"])  # the materialised path: scores as tensors
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        _call(sdpa_per_document, tensors, options)
    inputs = {t.data_ptr() for t in (*tensors, CU)}
    assert {t.data_ptr() for t in kept} == inputs
    # CU twice: as the queries' and as the keys' bounds
    assert sum(t.numel() for t in kept) == sum(t.numel() for t in (*tensors, CU, CU))
