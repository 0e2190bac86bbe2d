"""OSFT in a run: per-layer ratios (fixed or adaptive), the SVD split after sharding, logging.

Order matters (see mt_osft): the model is sharded and loaded first, the ratios are measured on
the unmodified model, OSFT is applied on every rank (the SVDs are spread over the ranks), and
only then is the optimizer built. On resume the split is not recomputed: the same ratios
rebuild the shapes and the checkpoint fills W0 and the bases, so the frozen subspace is exactly
the one of the original run.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from mt_core.config import ConfigError, TrainingArgs
from mt_core.trainer.loss import minibatch_tensors
from mt_data import InfiniteSampler, StepLoader, TokenSource
from mt_fsdp import DistContext, decoder_blocks, reshard_all
from mt_osft import OSFTConfig, OSFTState, adaptive_ratios, apply_osft

__all__ = ["setup_osft"]

logger = logging.getLogger("mt_core")
ADAPTIVE_MINIBATCHES = 4  # "a few batches" of the training data to measure layer importance


def setup_osft(
    args: TrainingArgs,
    model: nn.Module,
    model_type: str,
    train: TokenSource,
    ctx: DistContext,
    saved_ratios: dict[str, float] | None,
    *,
    reference_on_host: bool = False,
) -> OSFTState | None:
    """Apply OSFT to the sharded ``model`` as the run file says (None when OSFT is off).
    ``saved_ratios``: the ratios of the checkpoint being resumed (no SVD then);
    ``reference_on_host``: W0 in host memory, as the fit resolved osft_reference_on_host."""
    if not args.osft:
        return None
    config = OSFTConfig(
        unfreeze_rank_ratio=args.osft_unfreeze_rank_ratio,
        target_patterns=args.osft_target_patterns,
        upcast_dtype=args.osft_upcast_dtype,
        output_dtype=args.osft_output_dtype,
        reference_on_host=reference_on_host,
    )
    ratios = saved_ratios
    if ratios is None and args.osft_adaptive_ratios:
        ratios = _adaptive(args, model, train, ctx)
    try:
        state = apply_osft(
            model, config, model_type=model_type, ratios=ratios, decompose=saved_ratios is None
        )
    except (ValueError, KeyError) as error:  # patterns matching nothing, a non-2-D target
        raise ConfigError([str(error)]) from error
    if ctx.device.type == "cuda":
        # the decompositions' float64 temporaries leave cached blocks of their own sizes: give
        # them back, so that training allocates in a clean pool (8B: 8.4 GiB was held, unused,
        # when a block's 436 MiB gather did not fit)
        torch.cuda.empty_cache()
    frozen = sum(row["n_frozen"] for row in state.summary())
    logger.info(
        "OSFT: %d target matrices, %d frozen singular directions, SVDs %.1f s on this rank",
        len(state.targets), frozen, state.svd_seconds,
    )  # fmt: skip
    return state


def _adaptive(
    args: TrainingArgs, model: nn.Module, train: TokenSource, ctx: DistContext
) -> dict[str, float]:
    """Per-block ratios from layer importance on the first minibatches of the training data."""
    sampler = InfiniteSampler(len(train), args.batch_size, seed=args.seed + 1)
    loader = StepLoader(
        train, sampler, args.max_tokens_per_gpu, ctx.world_size, ctx.rank,
        args.sequence_parallel_size,
    )  # fmt: skip
    batches = []
    for minibatch in loader.step_batch(next(sampler)).minibatches[:ADAPTIVE_MINIBATCHES]:
        tensors = minibatch_tensors(minibatch, ctx.device)
        if minibatch.is_empty:  # the collectives still need this rank: one dummy token
            tensors = {**tensors, **_one_token(ctx.device)}
        batches.append(
            {
                "input_ids": tensors["input_ids"],
                "position_ids": tensors["position_ids"],
                "cu_seq_lens_q": tensors["cu_seqlens"],
                "cu_seq_lens_k": tensors["cu_seqlens"],
                "max_length_q": tensors["max_seqlen"],
                "max_length_k": tensors["max_seqlen"],
                "use_cache": False,
            }
        )
    blocks = {name: m for name, m in model.named_modules() if m in set(decoder_blocks(model))}
    with torch.no_grad():
        chosen = adaptive_ratios(model, blocks, batches, args.osft_min_ratio, args.osft_max_ratio)
    # The last block stays gathered after a forward (it is needed again at once in training);
    # OSFT must see every weight sharded, so put the gathered ones back.
    reshard_all(model)
    if ctx.is_main:
        for name in blocks:
            print(
                f"OSFT adaptive ratio {name}: importance {chosen.importance[name]:.4f} -> "
                f"unfreeze ratio {chosen.ratios[name]:.3f}",
                flush=True,
            )
    return dict(chosen.ratios)


def _one_token(device: torch.device) -> dict:
    zeros = torch.zeros((1, 1), dtype=torch.long, device=device)
    cu = torch.tensor([0, 1], dtype=torch.int32, device=device)
    return {"input_ids": zeros, "position_ids": zeros, "cu_seqlens": cu, "max_seqlen": 1}
