"""The train loop: read it top to bottom.

One optimizer step: the sampler draws the global batch, the packer splits it over ranks and into
minibatches, each rank runs forward and backward on its minibatches (the loss of each divided by
the global batch's target count, so the summed gradients are those of one unpadded batch), then
clipping, AdamW and the schedule; rank 0 writes the metrics line and any due HF export.
"""

from __future__ import annotations

import logging
import math
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from transformers import AutoConfig

from mt_core.config import TrainingArgs, args_to_dict, write_run_file
from mt_core.loss import minibatch_loss, minibatch_tensors
from mt_core.metrics import (
    MetricsLog,
    Progress,
    attended_context,
    flops_per_token,
    peak_flops_per_gpu,
)
from mt_core.model import (
    TORCH_DTYPES,
    build_model,
    liger_available,
    locate_model,
    matmul_parameter_count,
)
from mt_core.optim import build_optimizer, build_scheduler, clip_gradients
from mt_data import (
    EpochSampler,
    InfiniteSampler,
    PretrainingBlocks,
    SampleDataset,
    StepBatch,
    StepLoader,
    open_token_store,
)
from mt_fsdp import DistContext, export_hf, init_distributed, shutdown_distributed

__all__ = ["TrainResult", "train"]

logger = logging.getLogger("mt_core")


@dataclass
class TrainResult:
    """Where a finished run stands."""

    output_dir: Path
    steps: int
    samples_seen: int
    tokens_seen: int
    last_loss: float
    exports: list[Path]


def train(args: TrainingArgs) -> TrainResult:
    """Run ``args`` to its end in this process (one of torchrun's ranks, or alone)."""
    ctx = init_distributed()
    try:
        return _train(args, ctx)
    finally:
        shutdown_distributed()


def _train(args: TrainingArgs, ctx: DistContext) -> TrainResult:
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if ctx.is_main:
        write_run_file(args, output_dir / "run.toml")
    torch.manual_seed(args.seed)

    # 1. Data: validated once into a memory-mapped store, before any GPU work.
    model_folder = locate_model(args.model_name_or_path)
    config = AutoConfig.from_pretrained(model_folder, trust_remote_code=args.trust_remote_code)
    store = open_token_store(
        args.data_path,
        cache_dir=output_dir / "data_cache",
        require_labels=args.pretraining is None,
    )
    store.check_token_range(config.get_text_config().vocab_size)
    if args.pretraining is not None:
        source = PretrainingBlocks(
            store, args.pretraining.block_size, args.pretraining.segment_documents
        )
    else:
        source = SampleDataset(store, args.max_tokens_per_gpu, args.too_long_samples)
    sampler_type = EpochSampler if args.training_mode == "epoch" else InfiniteSampler
    sampler = sampler_type(len(source), args.batch_size, seed=args.seed)
    loader = StepLoader(source, sampler, args.max_tokens_per_gpu, ctx.world_size, ctx.rank)

    # 2. Model: sharded, fp32 master weights, compute in train_dtype.
    use_liger = args.use_liger_kernels
    if use_liger is None:
        use_liger = ctx.device.type == "cuda" and liger_available()
    model, _ = build_model(
        model_folder,
        config,
        ctx,
        master_dtype=TORCH_DTYPES[args.train_dtype],
        compute_dtype=torch.bfloat16
        if ctx.device.type == "cuda"
        else TORCH_DTYPES[args.train_dtype],
        attn_backend=args.attn_backend,
        use_liger=use_liger,
        activation_checkpointing=args.activation_checkpointing,
        cpu_offload=args.cpu_offload,
        trust_remote_code=args.trust_remote_code,
    )

    # 3. Optimizer and schedule.
    optimizer = build_optimizer(
        model,
        lr=args.learning_rate,
        betas=(args.beta1, args.beta2),
        eps=args.eps,
        weight_decay=args.weight_decay,
    )
    total_steps = _planned_steps(args, source, sampler)
    scheduler = build_scheduler(
        optimizer,
        args.lr_scheduler,
        warmup_steps=args.num_warmup_steps,
        total_steps=total_steps,
        kwargs=args.lr_scheduler_kwargs,
    )

    # 4. Reporting (rank 0 only).
    text_config = config.get_text_config()
    matmul_params = matmul_parameter_count(model)
    peak = peak_flops_per_gpu(ctx.device)
    metrics = MetricsLog(output_dir / "metrics.jsonl", _wandb_run(args)) if ctx.is_main else None
    progress = Progress(total_steps, enabled=ctx.is_main)

    step = samples_seen = tokens_seen = 0
    exported_at = -1
    epochs_done = sampler.epoch
    exports: list[Path] = []
    last_loss = math.nan
    try:
        for ids in _batches(sampler):
            started = time.perf_counter()
            batch = loader.step_batch(ids)

            loss, context_sum = _forward_backward(model, batch, ctx)
            grad_norm = clip_gradients(model, args.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ctx.device.type == "cuda":
                torch.cuda.synchronize(ctx.device)
            step_time = time.perf_counter() - started

            step += 1
            samples_seen += batch.num_samples
            tokens_seen += batch.num_tokens
            last_loss = loss
            tokens_per_s = batch.num_tokens / step_time
            flops = flops_per_token(
                matmul_params,
                text_config.num_hidden_layers,
                text_config.hidden_size,
                context_sum / batch.num_tokens,
            )
            record = {
                "step": step,
                "epoch": sampler.epoch + sampler.position / sampler.num_samples,
                "samples_seen": samples_seen,
                "tokens": batch.num_tokens,
                "tokens_seen": tokens_seen,
                "loss": loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "num_minibatches": len(batch.minibatches),
                "step_time_s": step_time,
                "tokens_per_s": tokens_per_s,
                "tokens_per_s_per_gpu": tokens_per_s / ctx.world_size,
                "mfu": (tokens_per_s / ctx.world_size) * flops / peak if peak else None,
                "peak_mem_gib": _peak_memory_gib(ctx.device),
            }
            if metrics is not None:
                metrics.write(record)
            progress.update(record)

            # the sampler moves to the next epoch as it hands out an epoch's last sample
            epoch_ended = sampler.epoch > epochs_done
            epochs_done = sampler.epoch
            done = _finished(args, step, sampler.epoch, tokens_seen)
            if _export_due(args, samples_seen, exported_at, epoch_ended, done):
                exports.append(_export(model, args, model_folder, output_dir, samples_seen))
                exported_at = samples_seen
            if done:
                break
    finally:
        progress.close()
        if metrics is not None:
            metrics.close()
    return TrainResult(output_dir, step, samples_seen, tokens_seen, last_loss, exports)


def _forward_backward(
    model: torch.nn.Module, batch: StepBatch, ctx: DistContext
) -> tuple[float, float]:
    """Forward and backward over this rank's minibatches; returns the global batch's loss and
    the sum over its tokens of their attended context (for the FLOP count)."""
    local_loss = torch.zeros((), dtype=torch.float64, device=ctx.device)
    context_sum = 0.0
    count = len(batch.minibatches)
    for index, minibatch in enumerate(batch.minibatches):
        # Gradients are reduced across ranks once, after the last minibatch.
        model.set_requires_gradient_sync(index == count - 1)
        loss = minibatch_loss(model, **minibatch_tensors(minibatch, ctx.device))
        loss.backward()
        local_loss += loss.detach()
        if not minibatch.is_empty:
            segments = np.diff(minibatch.cu_seqlens)
            context_sum += attended_context(segments) * minibatch.num_tokens
    totals = torch.stack(
        [local_loss, torch.tensor(context_sum, dtype=torch.float64, device=ctx.device)]
    )
    dist.all_reduce(totals)
    return float(totals[0]), float(totals[1])


def _batches(sampler: EpochSampler | InfiniteSampler):
    """Global batches without end: an epoch sampler is iterated again for each epoch."""
    while True:
        yield from sampler


def _planned_steps(args: TrainingArgs, source, sampler) -> int | None:
    """Optimizer steps the run will take (the schedule's length); None for an infinite run."""
    if args.training_mode == "step":
        return args.max_steps
    if args.training_mode == "epoch":
        return sampler.batches_per_epoch() * args.max_epochs
    if args.training_mode == "token":
        # Batches are drawn at random, so the token count per step varies: plan with the mean.
        mean_tokens = float(np.mean(source.lengths)) * args.batch_size
        return max(1, math.ceil(args.max_tokens / mean_tokens))
    return None


def _finished(args: TrainingArgs, step: int, epochs_done: int, tokens_seen: int) -> bool:
    if args.training_mode == "step":
        return step >= args.max_steps
    if args.training_mode == "epoch":
        return epochs_done >= args.max_epochs
    if args.training_mode == "token":
        return tokens_seen >= args.max_tokens
    return False


def _export_due(
    args: TrainingArgs, samples_seen: int, exported_at: int, epoch_ended: bool, done: bool
) -> bool:
    if samples_seen == exported_at:
        return False
    if done and args.save_final_checkpoint:
        return True
    if epoch_ended and args.checkpoint_at_epoch:
        return True
    every = args.min_samples_per_checkpoint
    last = max(exported_at, 0)
    return bool(every) and samples_seen - last >= every


def _export(
    model, args: TrainingArgs, model_folder: Path, output_dir: Path, samples_seen: int
) -> Path:
    """``hf_format/samples_<N>`` as mini_trainer names it, in save_dtype or else the dtype the
    model was published in."""
    target = output_dir / "hf_format" / f"samples_{samples_seen}"
    if args.save_dtype:
        save_dtype = TORCH_DTYPES[args.save_dtype]
    else:
        own = getattr(model.config, "dtype", None) or torch.float32
        save_dtype = getattr(torch, own) if isinstance(own, str) else own
    export_hf(model, target, save_dtype=save_dtype, source_folder=model_folder)
    logger.info("exported %s", target)
    return target


def _peak_memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated by torch; on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def _wandb_run(args: TrainingArgs):
    if not args.wandb_project:
        return None
    import wandb

    return wandb.init(
        project=args.wandb_project,
        name=args.wandb_run_name,
        entity=args.wandb_entity,
        config=args_to_dict(args),
        dir=args.output_dir,
    )
