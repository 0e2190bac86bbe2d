"""Validation loss: the training loss's padding-free path and global-token normalisation, over
the whole held-out share, without gradients."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from mt_core.trainer.loss import minibatch_loss, minibatch_tensors
from mt_data import TokenSource, rank_minibatches
from mt_fsdp import DistContext, reshard_all

__all__ = ["validation_loss"]


@torch.no_grad()
def validation_loss(
    model: nn.Module, source: TokenSource, batch_size: int, max_tokens: int, ctx: DistContext
) -> float:
    """Sum of the token losses of every held-out item / their target count (every rank gets
    the same value; the same for any number of ranks, up to summation order)."""
    total_targets = int(source.loss_counts.sum())
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
    try:
        for start in range(0, len(source), batch_size):
            ids = np.arange(start, min(start + batch_size, len(source)), dtype=np.int64)
            minibatches = rank_minibatches(
                source, ids, total_targets, max_tokens, ctx.world_size, ctx.rank,
                ctx.sequence_parallel_size,
            )  # fmt: skip
            for minibatch in minibatches:  # the same count on every rank; empty slots run a dummy
                loss_sum += minibatch_loss(model, **minibatch_tensors(minibatch, ctx.device))
    finally:
        model.train(was_training)
        reshard_all(model)  # no backward pass to put gathered blocks back in their shards
    dist.all_reduce(loss_sum)
    return float(loss_sum)
