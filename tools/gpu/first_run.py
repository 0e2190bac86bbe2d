"""mt's first GPU figures: the real train path on one GPU, every attention backend, Liger on/off.

On the GPU machine (see shared/GPU.md), from the repository root:

    python3 tools/gpu/first_run.py --out $OUT            # Llama-3.2-1B shape, random init
    python3 tools/gpu/first_run.py --shape tiny --device cpu --out /tmp/fr   # a CPU dry run

For one random-init model folder and one realistic SFT mix (log-normal lengths, mean ~600, max
8,192, a prompt share masked), each contestant runs ``mt_core.train`` (the same function `mt run`
calls) for a few steps. Step 1's loss is computed before any update, so it must equal the plain
HF model's loss on the same global batch, run sample by sample with SDPA in bf16: that is the
correctness check (bf16 tolerance stated below). The table gives tokens/s per GPU, MFU and peak
memory as the trainer's own metrics.jsonl reports them (median of the steps after the first).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from mt_core import args_from_dict, train
from mt_data import InfiniteSampler, SampleDataset, open_token_store

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/: the shared model maker
from random_model import SHAPES, make_model, make_sft_data  # noqa: E402

LOSS_RTOL = 2e-2  # bf16 compute: step-1 loss within 2% of the per-sample bf16 SDPA reference


def reference_loss(folder: Path, data: Path, batch_size: int, seed: int, device: str) -> float:
    """The plain HF model (SDPA, bf16 weights) on step 1's global batch, one sample at a time."""
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.bfloat16, attn_implementation="sdpa"
    )
    model.to(device).eval()
    dataset = SampleDataset(open_token_store(data, cache_dir=data.parent / "ref_cache"))
    batch = next(InfiniteSampler(len(dataset), batch_size, seed=seed))
    total, count = 0.0, 0
    with torch.no_grad():
        for i in batch:
            index = int(dataset.kept[i])
            ids = torch.from_numpy(dataset.store.tokens(index).astype(np.int64))[None].to(device)
            labels = torch.from_numpy(dataset.store.sample_labels(index).astype(np.int64))[None].to(
                device
            )
            logits = model(ids).logits[0, :-1].float()
            target = labels[0, 1:]
            total += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
            count += int((target != -100).sum())
    del model
    return total / count


def liger_empty_minibatch_is_exact(device: str) -> str:
    """With Liger's fused loss, an empty slot's dummy token must add exactly nothing."""
    from mt_core.model.attention import use_padding_free_attention
    from mt_core.model.build import liger_available
    from mt_core.trainer.loss import minibatch_loss

    if not liger_available() or device != "cuda":
        return "needs CUDA and liger-kernel"
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **SHAPES["tiny"][1])).to(
        device
    )
    _apply_liger_kernel_to_instance(model=model)
    use_padding_free_attention(model, "torch_varlen" if device == "cuda" else "sdpa")
    empty = torch.zeros((1, 0), dtype=torch.long, device=device)
    cu = torch.zeros(1, dtype=torch.int32, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = minibatch_loss(model, empty, empty, empty, cu, 0, 100)
    loss.backward()
    worst = max(p.grad.abs().max().item() for p in model.parameters() if p.grad is not None)
    return f"loss {loss.item()}, largest gradient {worst}: {'exact' if loss.item() == 0 and worst == 0 else 'NOT EXACT'}"


def run(name: str, keys: dict, out: Path) -> dict:
    output_dir = out / name
    args = args_from_dict({**keys, "output_dir": str(output_dir)})
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    train(args)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    lines = [json.loads(x) for x in (output_dir / "metrics.jsonl").read_text().splitlines()]
    later = lines[1:] or lines

    def median(key: str) -> float | None:
        values = [x[key] for x in later if x[key] is not None]
        return statistics.median(values) if values else None

    return {
        "name": name,
        "loss1": lines[0]["loss"],
        "losses": [x["loss"] for x in lines],
        "tokens_per_s_per_gpu": median("tokens_per_s_per_gpu"),
        "mfu": median("mfu"),
        "peak_mem_gib": max(x["peak_mem_gib"] for x in lines),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--backends", default="torch_varlen,sdpa")
    parser.add_argument("--liger", default="off,on")
    parser.add_argument(
        "--sync-every-minibatch",
        action="store_true",
        help="also run torch_varlen + Liger with gradients reduced after every minibatch",
    )
    options = parser.parse_args()
    out = options.out
    out.mkdir(parents=True, exist_ok=True)
    folder, data = out / "model", out / "data.jsonl"
    make_model(folder, options.shape, options.device)
    make_sft_data(data, 1024, SHAPES[options.shape][1]["vocab_size"], min(8192, options.max_tokens))
    reference = reference_loss(folder, data, options.batch_size, 1, options.device)

    keys = dict(
        model_name_or_path=str(folder), data_path=str(data), batch_size=options.batch_size,
        max_tokens_per_gpu=options.max_tokens, learning_rate=1e-5, lr_scheduler="constant",
        training_mode="step", max_steps=options.steps, seed=1, save_final_checkpoint=False,
    )  # fmt: skip
    results = []
    for backend in options.backends.split(","):
        for liger in options.liger.split(","):
            name = f"{backend}-liger_{liger}"
            print(f"== {name}", flush=True)
            try:
                results.append(
                    run(
                        name, dict(keys, attn_backend=backend, use_liger_kernels=liger == "on"), out
                    )
                )
            except Exception as error:  # report and go on with the other contestants
                print(f"{name} failed: {error!r}", flush=True)
                results.append({"name": name, "error": repr(error)})

    if options.sync_every_minibatch:
        # mt reduces gradients once, after a step's last minibatch; this contestant turns that
        # off (FSDP2 then reduce-scatters after every minibatch) to measure what it saves.
        from torch.distributed.fsdp import FSDPModule

        original = FSDPModule.set_requires_gradient_sync
        FSDPModule.set_requires_gradient_sync = lambda self, *a, **k: None
        name = "torch_varlen-liger_on-sync_every_minibatch"
        print(f"== {name}", flush=True)
        results.append(
            run(name, dict(keys, attn_backend="torch_varlen", use_liger_kernels=True), out)
        )
        FSDPModule.set_requires_gradient_sync = original
    print("liger empty minibatch:", liger_empty_minibatch_is_exact(options.device))

    print(f"\nshape {options.shape}, batch {options.batch_size} samples, max_tokens_per_gpu "
          f"{options.max_tokens}, {options.steps} steps; reference step-1 loss {reference:.5f}")  # fmt: skip
    print("contestant | step-1 loss | rel. diff | tokens/s/GPU | MFU (989) | MFU (795) | peak GiB")
    failures = 0
    for r in results:
        if "error" in r:
            print(f"{r['name']} | FAILED: {r['error'][:120]}")
            failures += 1
            continue
        diff = abs(r["loss1"] - reference) / reference
        ok = diff <= LOSS_RTOL
        failures += not ok
        mfu = r["mfu"]
        print(
            f"{r['name']} | {r['loss1']:.5f} | {diff:.2e} {'ok' if ok else 'FAIL'} | "
            f"{r['tokens_per_s_per_gpu']:,.0f} | "
            f"{'-' if mfu is None else f'{mfu:.1%}'} | {'-' if mfu is None else f'{mfu * 989 / 795:.1%}'} | "
            f"{r['peak_mem_gib']:.1f}"
        )
    (out / "results.json").write_text(
        json.dumps({"reference": reference, "results": results}, indent=1)
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
