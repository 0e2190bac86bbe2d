"""Fitting a run to its GPU: the activation memory budget of the compiled blocks.

A compiled block may keep fewer of its activations for the backward pass and recompute the rest
(PyTorch's partitioner picks the cheapest to recompute first: pointwise ops before matmuls). Left
unset, mt chooses the largest share with which ``max_tokens_per_gpu`` fits the GPU by the memory
estimate of ``mt check`` (measured within 4% of the real peak, tools/bench/RESULTS.md), so a model
whose float32 weights, gradients and AdamW state fill most of the GPU still trains on long rows:
on one H100 the 3B shape runs 16k-token rows instead of 8k.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
from transformers import PretrainedConfig

from mt_core.config import TrainingArgs
from mt_core.memory import GIB, Settings, estimate, fitting_activation_budget, usable_bytes
from mt_core.model_shape import model_shape, osft_settings

__all__ = ["activation_budget", "activation_budget_scope"]

logger = logging.getLogger(__name__)


def activation_budget(
    args: TrainingArgs,
    config: PretrainedConfig,
    *,
    capacity_bytes: float | None,
    world_size: int,
    compiled: bool,
    liger: bool,
    sync_each: bool,
    lengths: np.ndarray,
) -> float:
    """The activation memory budget the compiled blocks train with (1: keep all they would),
    chosen for a GPU of ``capacity_bytes`` (None: not a GPU, nothing to fit)."""
    if not compiled or args.activation_checkpointing:
        return 1.0
    if args.activation_memory_budget is not None:
        return args.activation_memory_budget
    if capacity_bytes is None:  # host memory is not the limit the estimate is made for
        return 1.0
    shape = model_shape(
        config, osft=osft_settings(args), master=args.train_dtype,
        trust_remote_code=args.trust_remote_code,
    )  # fmt: skip
    # A step runs one minibatch per GPU only if its largest possible batch fits one row.
    largest_batch = int(np.sort(lengths)[-args.batch_size :].sum())
    run = Settings(
        max_tokens=args.max_tokens_per_gpu,
        world_size=world_size,
        master=args.train_dtype,
        liger=liger,
        cpu_offload=args.cpu_offload,
        deferred_sync=not sync_each,
        minibatches=1 if largest_batch <= args.max_tokens_per_gpu else 2,
    )
    usable = usable_bytes(capacity_bytes)
    budget = fitting_activation_budget(shape, run, usable)
    if budget is None:
        low = estimate(shape, replace(run, activation_budget=0.0)).peak
        logger.warning(
            "max_tokens_per_gpu = %d needs about %.1f GiB per GPU even with the activations "
            "recomputed (%.1f GiB usable): lower it or set activation_checkpointing = true",
            args.max_tokens_per_gpu, low / GIB, usable / GIB,
        )  # fmt: skip
        return 0.0
    if budget < 1:
        logger.info(
            "activation_memory_budget %.2f: the compiled blocks recompute the rest of their "
            "activations so that %d tokens per GPU fit (estimated peak %.1f of %.1f GiB usable)",
            budget, args.max_tokens_per_gpu,
            estimate(shape, replace(run, activation_budget=budget)).peak / GIB,
            usable / GIB,
        )  # fmt: skip
    return budget


@contextlib.contextmanager
def activation_budget_scope(budget: float) -> Iterator[None]:
    """Compile (and recompile) the blocks with ``budget`` while training: the partitioner reads
    it when a block is first run, not when ``compile`` is called."""
    if budget >= 1:
        yield
        return
    import torch._functorch.config as functorch_config

    with functorch_config.patch(activation_memory_budget=budget):
        yield
