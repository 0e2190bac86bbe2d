"""Checks mt's CUDA attention backends against per-document SDPA in float32 on one GPU.

On the GPU machine (see shared/GPU.md; flash-attn-4 by its recipe there), from the repository root:

    PYTHONPATH=$(ls -d packages/*/src | tr '\\n' ':') python3 tools/gpu/check_attention.py

Every backend available there (torch_varlen; flash_attn_4 on Hopper/Blackwell and flash_attn when
installed) runs one random row of 8,192 tokens in ~20 documents and is compared with the truth,
``sdpa`` (scaled_dot_product_attention per document) in float32, next to ``sdpa`` in bf16, so a
backend's error reads against SDPA's own bf16 error. Two levels:

* kernel: the registered attention function alone (GQA 32/8 heads, head_dim 128; MHA head_dim 64;
  a sliding window of 512; float32 q/k with bf16 v as HF's RoPE hands them over under autocast;
  attention softcapping and sinks, with and without a window, for the backends that compute
  them): max abs error of the output and of dq/dk/dv (and d sinks);
* model: 4-layer models through ``minibatch_loss`` + backward, bf16 weights and float32 weights
  under bf16 autocast: Llama-3.2-1B-shaped (GQA 32/8), Mistral-shaped (a 512-token window on every
  layer), Qwen2-shaped (q/k/v biases, a 512-token window on its last 2 layers), GPT-OSS-shaped
  (sinks; 128-token windows on every other layer; 2 experts, both used by every token, so that
  rounding cannot flip a routing choice) and Gemma-2-shaped (softcapping at 5,
  a 512-token window on every other layer): loss difference and the largest gradient error
  relative to the largest gradient; then each backend against torch_varlen in the same mode
  (the issue's "flash-attn-4 against torch varlen"); plus an empty minibatch, whose loss and
  gradients must be exactly 0.

Pass criteria: a backend's errors are at most twice SDPA's own bf16 errors (its loss may also be
off by up to 1e-3), an empty minibatch gives exactly 0. The "leak" rows run causal attention over
the whole row (documents see each other), and the "no window", "no softcap" and "no sinks" rows
leave those out: their output must be off by more than 10x SDPA's error, which shows the checks
can fail. A backend
that cannot compute a case (sinks, softcapping) must refuse it with ValueError ("refused" rows).
Ends with fwd+bwd milliseconds per backend for the kernel, then "all checks passed" (exit 0) or
the failures.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GptOssConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from mt_core.model.attention import (
    register_padding_free_attention,
    resolve_attn_backend,
    use_padding_free_attention,
)
from mt_core.trainer.loss import minibatch_loss

TOKENS = 8192
DOCUMENTS = 20
DEVICE = torch.device("cuda")
FAILURES: list[str] = []
# the backends that compute attention sinks and softcapping (the others must refuse them)
EXTRAS = ("sdpa", "flash_attn_4")


def documents(seed: int) -> tuple[torch.Tensor, int, torch.Tensor]:
    """cu_seqlens (int32), max length and position ids of ~DOCUMENTS random documents."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(DOCUMENTS, generator=g) ** 2 + 0.05
    lengths = (weights / weights.sum() * TOKENS).long().clamp(min=1)
    lengths[-1] += TOKENS - lengths.sum()
    cu = torch.zeros(DOCUMENTS + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    positions = torch.cat([torch.arange(int(n)) for n in lengths])
    return cu.to(DEVICE), int(lengths.max()), positions[None].to(DEVICE)


def available_backends() -> list[str]:
    backends = []
    for name in ("torch_varlen", "flash_attn", "flash_attn_4"):
        try:
            backends.append(resolve_attn_backend(name, DEVICE))
        except ValueError as error:
            print(f"# skipped {name}: {error}")
    return backends


def verdict(ok: bool, *what: str) -> str:
    """ "ok", or "FAIL" remembered in FAILURES."""
    if not ok:
        FAILURES.append(" ".join(what))
    return "ok" if ok else "FAIL"


class Causal(torch.nn.Module):
    is_causal = True


def attend(backend: str, q, k, v, cu, max_len, window, **extra):
    fn = ALL_ATTENTION_FUNCTIONS[register_padding_free_attention(backend)]
    out, _ = fn(
        Causal(), q, k, v, None, scaling=q.shape[-1] ** -0.5, dropout=0.0,
        sliding_window=window, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_len,
        max_length_k=max_len, **extra,
    )  # fmt: skip
    return out


def run_kernel(backend, tensors, grad_out, cu, max_len, window, dtypes, softcap, autocast=False):
    """Output and gradients (q, k, v, then the sinks if ``tensors`` has them) as float32."""
    leaves = [t.detach().to(d).requires_grad_() for t, d in zip(tensors[:3], dtypes, strict=True)]
    extra = {"softcap": softcap} if softcap else {}
    if len(tensors) == 4:  # sinks: kept in float32, as a model's parameter under mixed precision
        leaves.append(tensors[3].detach().clone().requires_grad_())
        extra["s_aux"] = leaves[3]
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = attend(backend, *leaves[:3], cu, max_len, window, **extra)
    out.float().backward(grad_out)
    return [out.float()] + [t.grad.float() for t in leaves]


def kernel_checks(backends: list[str]) -> list[str]:
    rows = []
    cases = [  # label, heads, K/V heads, head_dim, window, mode, softcap, sinks
        ("gqa 32/8 d128", 32, 8, 128, None, "bf16", None, False),
        ("mha 16/16 d64", 16, 16, 64, None, "bf16", None, False),
        ("gqa window 512", 32, 8, 128, 512, "bf16", None, False),
        ("gqa fp32 q/k", 32, 8, 128, None, "autocast", None, False),
        ("gqa softcap 5", 32, 8, 128, None, "bf16", 5.0, False),
        ("gqa sinks", 32, 8, 128, None, "bf16", None, True),
        ("gqa sinks window", 32, 8, 64, 128, "bf16", None, True),
    ]
    cu, max_len, _ = documents(seed=0)
    whole = torch.tensor([0, TOKENS], dtype=torch.int32, device=DEVICE)
    for label, heads, kv_heads, dim, window, mode, softcap, sinks in cases:
        g = torch.Generator(device=DEVICE).manual_seed(1)
        q = torch.randn(1, heads, TOKENS, dim, device=DEVICE, generator=g)
        k = torch.randn(1, kv_heads, TOKENS, dim, device=DEVICE, generator=g)
        v = torch.randn(1, kv_heads, TOKENS, dim, device=DEVICE, generator=g)
        tensors = [q, k, v]
        if sinks:  # logits of the order of the scores', so that they matter
            tensors.append(torch.randn(heads, device=DEVICE, generator=g) * 2)
        grad_out = torch.randn(1, TOKENS, heads, dim, device=DEVICE, generator=g)
        bf16 = torch.bfloat16
        dtypes = (bf16, bf16, bf16) if mode == "bf16" else (torch.float32, torch.float32, bf16)
        truth = run_kernel("sdpa", tensors, grad_out, cu, max_len, window, [torch.float32] * 3,
                           softcap)  # fmt: skip
        # (row name, backend, documents, window, softcap, inputs); the last rows are wrong on
        # purpose: documents that see each other, the window, softcapping or sinks left out
        runs = [("sdpa", "sdpa", cu, max_len, window, softcap, tensors)]
        runs += [(b, b, cu, max_len, window, softcap, tensors) for b in backends]
        runs.append(("leak", "sdpa", whole, TOKENS, window, softcap, tensors))
        if window is not None:
            runs.append(("no window", "sdpa", cu, max_len, None, softcap, tensors))
        if softcap is not None:
            runs.append(("no softcap", "sdpa", cu, max_len, window, None, tensors))
        if sinks:
            runs.append(("no sinks", "sdpa", cu, max_len, window, softcap, tensors[:3]))
        sdpa_errors = None
        for name, backend, cu_b, max_b, window_b, softcap_b, inputs in runs:
            extras = softcap is not None or sinks
            try:
                got = run_kernel(backend, inputs, grad_out, cu_b, max_b, window_b, dtypes,
                                 softcap_b, mode == "autocast")  # fmt: skip
            except Exception as error:  # refused (ValueError) where it must be, else a failure
                ok = isinstance(error, ValueError) and extras and backend not in EXTRAS
                what = "refused" if isinstance(error, ValueError) else type(error).__name__
                rows.append(f"kernel | {label:16s} | {name:12s} | {what}: {str(error)[:200]} | "
                            f"{verdict(ok, label, name, what)}")  # fmt: skip
                continue
            # (a "no sinks" row has no sinks' gradient: it is compared on the rest)
            errors = [(a - b).abs().max().item() for a, b in zip(got, truth, strict=False)]
            sdpa_errors = sdpa_errors or errors
            ratio = [e / s for e, s in zip(errors, sdpa_errors, strict=False)]
            wrong = name in ("leak", "no window", "no softcap", "no sinks")
            ok = ratio[0] > 10 if wrong else max(ratio) <= 2
            ok = ok and (not extras or backend in EXTRAS)  # computing what it cannot: a fault
            sink = f" | dsink {errors[4]:.2e}" if len(errors) > 4 else ""
            rows.append(
                f"kernel | {label:16s} | {name:12s} | out {errors[0]:.2e} | dq {errors[1]:.2e}"
                f" | dk {errors[2]:.2e} | dv {errors[3]:.2e}{sink} | {verdict(ok, label, name)}"
            )
    return rows


SHAPE = dict(
    hidden_size=2048, intermediate_size=8192, num_hidden_layers=4, num_attention_heads=32,
    num_key_value_heads=8, head_dim=64, vocab_size=32000, max_position_embeddings=TOKENS,
)  # fmt: skip
MODELS = [  # label, config class, overrides, uses sinks or softcapping
    ("llama-1b x4 layers", LlamaConfig, {}, False),
    ("mistral window 512", MistralConfig, {"sliding_window": 512}, False),
    ("qwen2 window 512 x2", Qwen2Config,
     {"use_sliding_window": True, "sliding_window": 512, "max_window_layers": 2}, False),
    ("gpt-oss sinks w128", GptOssConfig,
     {"sliding_window": 128, "num_local_experts": 2, "num_experts_per_tok": 2,
      "intermediate_size": 1024, "layer_types": ["sliding_attention", "full_attention"] * 2},
     True),
    ("gemma2 softcap 5", Gemma2Config,
     {"sliding_window": 512, "attn_logit_softcapping": 5.0, "final_logit_softcapping": None,
      "query_pre_attn_scalar": 64}, True),
]  # fmt: skip


def tiny_model(config_class, dtype, **overrides):
    torch.manual_seed(0)
    config = config_class(**{**SHAPE, **overrides})
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(DEVICE).train()
    with torch.no_grad():  # sinks and scores large enough for sinks and softcapping to matter
        for layer in model.model.layers:
            attention = layer.self_attn
            if getattr(attention, "sinks", None) is not None:
                attention.sinks.normal_(0.0, 1.0)
            if getattr(attention, "attn_logit_softcapping", None):
                # scores of a few units, where a cap of 5 bends them: sharper attention (x40,
                # scores of ~30 under Gemma 2's own cap of 50) made even SDPA's bf16 gradients
                # differ from float32 by their whole scale, a check of nothing
                attention.q_proj.weight.mul_(4.0)
    return model


def loss_and_grads(model, backend, batch, autocast):
    use_padding_free_attention(model, backend)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        loss = minibatch_loss(model, **batch)
    loss.backward()
    grads = [p.grad.float().clone() for p in model.parameters() if p.grad is not None]
    return loss.item(), grads


def grad_error(grads, truth) -> float:
    scale = max(t.abs().max().item() for t in truth)
    return max((g - t).abs().max().item() for g, t in zip(grads, truth, strict=True)) / scale


def model_checks(backends: list[str], only: str | None = None) -> list[str]:
    rows = []
    cu, max_len, positions = documents(seed=2)
    g = torch.Generator(device=DEVICE).manual_seed(3)
    input_ids = torch.randint(0, 32000, (1, TOKENS), device=DEVICE, generator=g)
    targets = torch.randint(0, 32000, (1, TOKENS), device=DEVICE, generator=g)
    targets[:, cu[1:].long() - 1] = -100  # no target at the last token of a document
    targets[torch.rand(1, TOKENS, device=DEVICE, generator=g) < 0.3] = -100
    count = int((targets != -100).sum())
    batch = dict(
        input_ids=input_ids, position_ids=positions, targets=targets, cu_seqlens=cu,
        max_seqlen=max_len, global_num_loss_tokens=count,
    )  # fmt: skip
    leak = {**batch, "cu_seqlens": torch.tensor([0, TOKENS], dtype=torch.int32, device=DEVICE)}
    leak["max_seqlen"] = TOKENS
    empty = {
        **batch,
        **{key: batch[key][:, :0] for key in ("input_ids", "position_ids", "targets")},
        "cu_seqlens": cu[:1], "max_seqlen": 0,
    }  # fmt: skip
    for label, config_class, overrides, extras in MODELS:
        if only and not label.startswith(only):
            continue
        started = time.perf_counter()
        try:
            new = one_model(backends, label, config_class, overrides, extras, batch, leak, empty)
        except Exception as error:  # one broken model is a failure row, not the end of the check
            new = [f"model  | {label} | ERROR {type(error).__name__}: {str(error)[:300]} | "
                   f"{verdict(False, label, 'error')}"]  # fmt: skip
        torch.cuda.empty_cache()
        # each model's rows as soon as they are known: a call's time limit keeps what was done
        print("\n".join(new), f"\n# {label}: {time.perf_counter() - started:.0f} s", flush=True)
        rows += new
    return rows


def one_model(backends, label, config_class, overrides, extras, batch, leak, empty) -> list[str]:
    rows = []
    # the backends that must compute this model; the others must refuse it
    able = [b for b in backends if not extras or b in EXTRAS]
    reference = tiny_model(config_class, torch.float32, **overrides)
    truth_loss, truth = loss_and_grads(reference, "sdpa", batch, autocast=False)
    state = reference.state_dict()
    del reference
    for mode in ("bf16", "autocast"):
        model = tiny_model(
            config_class, torch.bfloat16 if mode == "bf16" else torch.float32, **overrides
        )
        model.load_state_dict(state)
        runs = [("sdpa", batch), *[(b, batch) for b in able], ("leak", leak)]
        sdpa_loss_diff = sdpa_grad_err = None
        results = {}
        for backend, data in runs:
            loss, grads = loss_and_grads(
                model, "sdpa" if backend == "leak" else backend, data, mode == "autocast"
            )
            results[backend] = (loss, grads)
            loss_diff, grad_err = abs(loss - truth_loss), grad_error(grads, truth)
            sdpa_loss_diff = sdpa_loss_diff or loss_diff
            sdpa_grad_err = sdpa_grad_err or grad_err
            if backend == "leak":
                ok = grad_err > 10 * sdpa_grad_err
            else:
                ok = grad_err <= 2 * sdpa_grad_err and loss_diff <= max(2 * sdpa_loss_diff, 1e-3)
            rows.append(
                f"model  | {label} {mode:8s} | {backend:12s} | loss {loss:.5f} "
                f"(fp32 {truth_loss:.5f}, diff {loss_diff:.2e}) | "
                f"grad err {grad_err:.2e} of max | {verdict(ok, label, mode, backend)}"
            )
        for backend in [b for b in able if b != "torch_varlen" and "torch_varlen" in able]:
            # informative: two bf16 backends differ by about the sum of their errors
            loss, grads = results[backend]
            other_loss, other = results["torch_varlen"]
            rows.append(
                f"pair   | {label} {mode:8s} | {backend} vs torch_varlen | loss diff "
                f"{abs(loss - other_loss):.2e} | grad diff {grad_error(grads, other):.2e} "
                f"of max (each vs fp32: {sdpa_grad_err:.2e} for sdpa bf16)"
            )
        for backend in [b for b in backends if b not in able]:
            try:
                loss_and_grads(model, backend, batch, mode == "autocast")
                refused = False
            except ValueError:
                refused = True
            rows.append(f"model  | {label} {mode:8s} | {backend:12s} | refused | "
                        f"{verdict(refused, label, mode, backend, 'refused')}")  # fmt: skip
        for backend in ["sdpa", *able]:
            loss, grads = loss_and_grads(model, backend, empty, mode == "autocast")
            exact = loss == 0.0 and all(torch.count_nonzero(g) == 0 for g in grads)
            rows.append(
                f"empty  | {label} {mode:8s} | {backend:12s} | loss and grads exactly 0 | "
                f"{verdict(exact, label, mode, backend, 'empty')}"
            )
        del model
    return rows


def timing(backends: list[str]) -> list[str]:
    cu, max_len, _ = documents(seed=0)
    q = torch.randn(1, 32, TOKENS, 128, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, 8, TOKENS, 128, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, 8, TOKENS, 128, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    rows = []
    for backend in ["sdpa", *backends]:
        for _ in range(3):
            attend(backend, q, k, v, cu, max_len, None).sum().backward()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            attend(backend, q, k, v, cu, max_len, None).sum().backward()
        end.record()
        torch.cuda.synchronize()
        rows.append(
            f"time   | gqa 32/8 d128 fwd+bwd | {backend:12s} | {start.elapsed_time(end) / 20:.2f} ms"
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description="mt's CUDA attention backends against SDPA")
    parser.add_argument("--levels", default="kernel,model,timing",
                        help="comma-separated: which of kernel, model, timing to run")  # fmt: skip
    parser.add_argument("--model", help="only the model rows whose label starts so, e.g. gemma2")
    options = parser.parse_args()
    levels = set(options.levels.split(","))
    if levels - {"kernel", "model", "timing"}:
        parser.error(f"--levels: unknown {sorted(levels - {'kernel', 'model', 'timing'})}")
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 1
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__}", end=" ")
    import transformers

    print(f"transformers {transformers.__version__}")
    backends = available_backends()
    if "kernel" in levels:
        started = time.perf_counter()
        rows = kernel_checks(backends)
        print(
            "\n".join(rows), f"\n# kernel checks: {time.perf_counter() - started:.0f} s", flush=True
        )
    if "model" in levels:
        model_checks(backends, options.model)  # prints its rows model by model
    if "timing" in levels:
        print("\n".join(timing(backends)))
    print(f"FAILED: {'; '.join(FAILURES)}" if FAILURES else "all checks passed")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
