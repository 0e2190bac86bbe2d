"""Optimizer, learning-rate schedule and gradient clipping over sharded parameters."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import get_scheduler

__all__ = ["build_optimizer", "build_scheduler", "clip_gradients"]


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; the fused CUDA kernel when the weights are on a GPU."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = all(p.device.type == "cuda" for p in params)
    return torch.optim.AdamW(
        params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused or None
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str,
    *,
    warmup_steps: int,
    total_steps: int | None,
    kwargs: dict | None = None,
) -> torch.optim.lr_scheduler.LRScheduler:
    """transformers' scheduler factory; ``total_steps`` None only for schedules without an end."""
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=warmup_steps,
        num_training_steps=total_steps,
        scheduler_specific_kwargs=kwargs or None,
    )


def clip_gradients(model: nn.Module, max_norm: float) -> torch.Tensor:
    """The gradients' global L2 norm over all shards of all ranks (a 0-d tensor on their
    device: reading it waits for the GPU); clipped to ``max_norm`` unless it is 0. Every rank
    gets the same value."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    if isinstance(norm, DTensor):  # sharded gradients: the norm of the local shards, reduced
        norm = norm.full_tensor()
    if max_norm > 0:
        params = [p for p in model.parameters() if p.grad is not None]
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
    return norm
