"""The train loop: read it top to bottom.

One optimizer step: the sampler draws the global batch, the packer splits it over ranks and into
minibatches, each rank runs forward and backward on its minibatches (the loss of each divided by
the global batch's target count, so the summed gradients are those of one unpadded batch), then
clipping, AdamW and the schedule; rank 0 writes the metrics line and any due HF export.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.profiler import record_function

from mt_core.activation_offload import ActivationOffload
from mt_core.callbacks import CallbackRunner, load_callbacks
from mt_core.config import ConfigError, TrainingArgs, write_run_file
from mt_core.data import build_data
from mt_core.errors import NonFiniteError, RunError
from mt_core.families import export_model
from mt_core.fit import activation_budget_scope, fit_this_process, syncs_every_minibatch
from mt_core.lifecycle import OutputDir, StopRequest, resume_folder, truncate_metrics
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
    export_dtype,
    liger_available,
    load_config,
    locate_model,
    matmul_parameter_count,
)
from mt_core.optim import build_optimizer, build_scheduler, check_optimizer, clip_gradients
from mt_core.osft_setup import setup_osft
from mt_core.progress_state import (
    RunState,
    export_due,
    finished,
    planned_steps,
    validation_due,
)
from mt_core.sequence_parallel import sequence_parallel_problem
from mt_core.tracking import open_trackers
from mt_core.validation import validation_loss
from mt_data import StepBatch
from mt_fsdp import (
    CheckpointError,
    DistContext,
    init_distributed,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    shutdown_distributed,
)

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
    try:
        ctx = init_distributed(sequence_parallel_size=args.sequence_parallel_size)
    except ValueError as error:  # the size does not divide the processes started
        raise ConfigError([f"sequence_parallel_size: {error}"]) from error
    if not ctx.is_main:
        _quiet()  # rank 0 speaks for the run; the others only raise errors
    try:
        return _train(args, ctx)
    except CheckpointError as error:  # disk full, quota: the message says what is intact
        raise RunError(str(error)) from error
    finally:
        shutdown_distributed()


def _train(args: TrainingArgs, ctx: DistContext) -> TrainResult:
    output = OutputDir(args, ctx)  # writable, and ours alone for the run
    try:
        return _run(args, ctx, output.path)
    finally:
        output.release()


def _run(args: TrainingArgs, ctx: DistContext, output_dir: Path) -> TrainResult:
    checkpoints = output_dir / "checkpoints"
    resume_from = resume_folder(args, checkpoints)
    torch.manual_seed(args.seed)

    # 1. Data: validated once into a memory-mapped store, before any GPU work.
    model_folder = locate_model(args.model_name_or_path)
    config = load_config(model_folder, args.trust_remote_code)
    problem = sequence_parallel_problem(config, args.sequence_parallel_size)
    if problem is not None:
        raise ConfigError([f"sequence_parallel_size: {problem}"])
    data = build_data(args, ctx, config.get_text_config().vocab_size, output_dir)
    sampler = data.sampler

    # 2. Model: sharded, master weights in train_dtype, compute in bf16 on GPU.
    # speed settings left unset take the fastest measured on a GPU (tools/bench/RESULTS.md)
    on_gpu = ctx.device.type == "cuda"
    use_liger = args.use_liger_kernels
    if use_liger is None:
        use_liger = on_gpu and liger_available()
    compile_blocks = on_gpu if args.torch_compile is None else args.torch_compile
    # how the run fits its GPU (mt_core.fit): the share of activations compiled blocks keep, on
    # one GPU whether blocks stay gathered from forward to backward, whether activations, or the
    # weights, gradients and optimizer state, wait in host memory
    fit = fit_this_process(
        args, config, ctx, compiled=compile_blocks, liger=use_liger, lengths=data.train.lengths
    )
    sync_each = syncs_every_minibatch(args, ctx.world_size, fit.cpu_offload)
    master_dtype = TORCH_DTYPES[args.train_dtype]
    offload = ActivationOffload(ctx.device) if fit.activation_offload else None
    # torchao's optimizers (low-precision moments, stochastic rounding) must be able to run here
    step_device = torch.device("cpu") if fit.cpu_offload else ctx.device
    check_optimizer(
        args.optimizer_state_dtype, args.stochastic_rounding, master_dtype, step_device,
        offloaded=fit.cpu_offload and on_gpu,
    )  # fmt: skip
    model, _ = build_model(
        model_folder,
        config,
        ctx,
        master_dtype=master_dtype,
        compute_dtype=torch.bfloat16 if on_gpu else master_dtype,
        attn_backend=args.attn_backend,
        use_liger=use_liger,
        activation_checkpointing=args.activation_checkpointing,
        compile_blocks=compile_blocks,
        activation_offload=offload,
        cpu_offload=fit.cpu_offload,
        keep_gathered=fit.keep_gathered,
        trust_remote_code=args.trust_remote_code,
    )

    # 3. OSFT (after sharding, before the optimizer), then the optimizer and schedule.
    saved = _read_trainer_state(resume_from)
    osft = setup_osft(
        args, model, config.model_type, data.train, ctx, saved.get("osft_ratios") if saved else None
    )
    # Model, data and OSFT targets are good: only now may this run's resolved run file replace
    # an earlier run's (a run refused for bad input leaves output_dir as it was).
    if ctx.is_main:
        write_run_file(args, output_dir / "run.toml")
    optimizer = build_optimizer(
        model,
        lr=args.learning_rate,
        betas=(args.beta1, args.beta2),
        eps=args.eps,
        weight_decay=args.weight_decay,
        state_dtype=args.optimizer_state_dtype,
        stochastic_rounding=args.stochastic_rounding,
    )
    total_steps = planned_steps(args, data.train.lengths, sampler.batches_per_epoch())
    scheduler = build_scheduler(
        optimizer,
        args.lr_scheduler,
        warmup_steps=args.num_warmup_steps,
        total_steps=total_steps,
        kwargs=args.lr_scheduler_kwargs,
    )

    # 4. Resume: weights, optimizer, schedule, data position, RNG and counters.
    state = RunState(epochs_done=sampler.epoch)
    if resume_from is not None:
        saved = load_checkpoint(
            resume_from, model, optimizer, osft.state_dict() if osft is not None else None
        )
        scheduler.load_state_dict(saved["scheduler"])
        sampler.load_state_dict(saved["sampler"])
        state = RunState.from_json(saved["run"])
        if ctx.is_main:
            truncate_metrics(output_dir / "metrics.jsonl", state.step)
            print(f"resumed from {resume_from} (step {state.step})", flush=True)

    # 5. Reporting (rank 0 only).
    text_config = config.get_text_config()
    matmul_params = matmul_parameter_count(model)
    peak = peak_flops_per_gpu(ctx.device)
    metrics = MetricsLog(output_dir / "metrics.jsonl", open_trackers(args)) if ctx.is_main else None
    progress = Progress(total_steps, enabled=ctx.is_main, done=state.step)
    stop = StopRequest(on_demand=args.on_demand_checkpointing)
    fire = CallbackRunner(load_callbacks(args.callbacks), ctx.rank, ctx.world_size)
    exports: list[Path] = []
    last_loss = math.nan

    def checkpoint() -> Path:
        trainer_state = {
            "run": state.to_json(),
            "sampler": sampler.state_dict(),
            "scheduler": scheduler.state_dict(),
            "osft_ratios": osft.ratios if osft is not None else None,
        }
        folder = save_checkpoint(
            checkpoints,
            state.step,
            model,
            optimizer,
            trainer_state,
            args.keep_last_checkpoints,
            osft.state_dict() if osft is not None else None,
        )
        fire("on_save", step=state.step, epoch=state.epochs_done, path=str(folder))
        return folder

    scope = contextlib.ExitStack()
    try:
        scope.enter_context(activation_budget_scope(fit.activation_budget))
        done = finished(args, state)
        fire("on_train_begin", step=state.step, epoch=state.epochs_done)
        clock = time.perf_counter()
        epoch_open = False
        while not done:
            if not epoch_open:
                fire("on_epoch_begin", step=state.step, epoch=state.epochs_done)
                epoch_open = True
            fire("on_step_begin", step=state.step, epoch=state.epochs_done)
            # (the named ranges label a profiler trace: docs/performance.md)
            with record_function("mt.data"):
                # an epoch sampler's new iterator starts with the next epoch once one has ended
                batch = data.loader.step_batch(next(iter(sampler)))

            hook = functools.partial(fire, step=state.step, epoch=state.epochs_done)
            with record_function("mt.forward_backward"):
                totals = _forward_backward(model, batch, ctx, hook, sync_each, stop.requested)
            with record_function("mt.clip"):
                if osft is not None:
                    osft.project_gradients_()  # Adam's moments then see only trainable directions
                norm = clip_gradients(model, args.max_grad_norm)
            # The step's one host synchronisation: the optimizer must know whether the loss and
            # gradients are finite. Its kernels then run while the host does the bookkeeping and
            # prepares the next batch, so a step's time runs from one such point to the next.
            loss, context_sum, stop_votes, grad_norm = torch.cat(
                [totals, norm.reshape(1).to(totals.dtype)]
            ).tolist()
            now = time.perf_counter()
            step_time, clock = now - clock, now
            lr = scheduler.get_last_lr()[0]
            state.step += 1
            if math.isfinite(loss) and math.isfinite(grad_norm):
                fire("on_before_optimizer_step", step=state.step - 1, epoch=state.epochs_done)
                with record_function("mt.optimizer"):
                    optimizer.step()
                    if osft is not None:
                        osft.project_()  # the total change stays orthogonal to the frozen subspace
                fire("on_after_optimizer_step", step=state.step, epoch=state.epochs_done)
            elif args.skip_nonfinite_steps:
                state.skipped_steps += 1  # no update; the data of this step is passed over
            else:
                raise NonFiniteError(_nonfinite_message(state.step, loss, grad_norm, checkpoints))
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            state.samples_seen += batch.num_samples
            state.tokens_seen += batch.num_tokens
            last_loss = loss
            tokens_per_s = batch.num_tokens / step_time
            flops = flops_per_token(
                matmul_params,
                text_config.num_hidden_layers,
                text_config.hidden_size,
                context_sum / batch.num_tokens,
            )
            # the sampler moves to the next epoch as it hands out an epoch's last sample
            epoch_ended = sampler.epoch > state.epochs_done
            state.epochs_done = sampler.epoch
            done = finished(args, state)
            record = {
                "step": state.step,
                "epoch": sampler.epoch + sampler.position / sampler.num_samples,
                "samples_seen": state.samples_seen,
                "tokens": batch.num_tokens,
                "tokens_seen": state.tokens_seen,
                "loss": loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "num_minibatches": len(batch.minibatches),
                "step_time_s": step_time,
                "tokens_per_s": tokens_per_s,
                "tokens_per_s_per_gpu": tokens_per_s / ctx.world_size,
                "mfu": (tokens_per_s / ctx.world_size) * flops / peak if peak else None,
                "peak_mem_gib": _peak_memory_gib(ctx.device),
                "skipped_steps": state.skipped_steps,
            }
            if offload is not None:  # what the last minibatch sent to host memory and fetched back
                record["offloaded_gib"] = offload.pass_bytes / 2**30
            # From here on: validation, logging, callbacks, exports and checkpoints, which are
            # not step time. The optimizer step above is, and counts in the next step's time:
            # its host side can be long (torchao's per-parameter launches; under cpu_offload the
            # whole step runs on the CPU).
            paused = time.perf_counter()
            improved = False
            if validation_due(args, state, epoch_ended, done):
                state.validated_at = state.samples_seen
                record["val_loss"] = validation_loss(
                    model, data.validation, args.batch_size, args.max_tokens_per_gpu, ctx
                )
                best = state.best_val_loss
                improved = (
                    best is None or record["val_loss"] < best - args.val_loss_improvement_threshold
                )
                if improved:
                    state.best_val_loss = record["val_loss"]
                fire(
                    "on_evaluate", step=state.step, epoch=sampler.epoch, val_loss=record["val_loss"]
                )
            if metrics is not None:
                metrics.write(record)
            progress.update(record)
            fire("on_log", step=state.step, epoch=sampler.epoch, record=dict(record))

            if export_due(args, state, epoch_ended, done) or (improved and args.save_best_val_loss):
                exports.append(_export(model, args, model_folder, output_dir, state.samples_seen))
                state.exported_at = state.samples_seen
                fire("on_save", step=state.step, epoch=sampler.epoch, path=str(exports[-1]))
            fire("on_step_end", step=state.step, epoch=sampler.epoch)
            if epoch_ended or done:
                fire("on_epoch_end", step=state.step, epoch=state.epochs_done)
                epoch_open = False
            every = args.checkpoint_every_steps
            if every and state.step % every == 0 and not done:
                checkpoint()
            clock += time.perf_counter() - paused
            if not done and stop_votes > 0:
                folder = checkpoint()
                if ctx.is_main:
                    print(
                        f"stopped by signal at step {state.step}; the training state is in "
                        f'{folder}: run the same command again to resume (resume = "auto")',
                        flush=True,
                    )
                break
        fire("on_train_end", step=state.step, epoch=state.epochs_done)
    finally:
        scope.close()
        fire.close()
        stop.restore()
        progress.close()
        if metrics is not None:
            metrics.close()
    return TrainResult(
        output_dir, state.step, state.samples_seen, state.tokens_seen, last_loss, exports
    )


def _forward_backward(
    model: torch.nn.Module,
    batch: StepBatch,
    ctx: DistContext,
    fire: Callable[..., None],
    sync_each: bool,
    stop_requested: bool,
) -> torch.Tensor:
    """Forward and backward over this rank's minibatches. Returns, summed over all ranks and
    without waiting for the GPU: the global batch's loss, the sum over its tokens of their
    attended context (for the FLOP count), and the number of ranks asked to stop."""
    local_loss = torch.zeros((), dtype=torch.float64, device=ctx.device)
    context_sum = 0.0
    count = len(batch.minibatches)
    for index, minibatch in enumerate(batch.minibatches):
        # Gradients are reduced across ranks after each minibatch or once, after the last.
        model.set_requires_gradient_sync(sync_each or index == count - 1)
        fire("on_before_forward", minibatch=index)
        loss = minibatch_loss(model, **minibatch_tensors(minibatch, ctx.device))
        loss.backward()
        fire("on_after_backward", minibatch=index)
        local_loss += loss.detach()
        if not minibatch.is_empty:
            segments = np.diff(minibatch.cu_seqlens)
            context_sum += attended_context(segments) * minibatch.num_tokens
    host = torch.tensor([context_sum, float(stop_requested)], dtype=torch.float64)
    totals = torch.cat([local_loss.reshape(1), host.to(ctx.device, non_blocking=True)])
    dist.all_reduce(totals)
    return totals


def _read_trainer_state(folder: Path | None) -> dict | None:
    """The JSON state of the checkpoint being resumed (read before the model state, because
    OSFT's shapes depend on it)."""
    if folder is None:
        return None
    return json.loads((folder / "trainer_state.json").read_text())


def _quiet() -> None:
    """Silence warnings and library progress on this rank (every rank would repeat them)."""
    import warnings

    from transformers.utils import logging as hf_logging

    warnings.simplefilter("ignore")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logger.setLevel(logging.ERROR)


def _nonfinite_message(step: int, loss: float, grad_norm: float, checkpoints: Path) -> str:
    last = latest_checkpoint(checkpoints)
    where = f"the last good checkpoint is {last}" if last else "there is no checkpoint yet"
    return (
        f"step {step}: the loss is {loss} and the gradient norm {grad_norm}; training stopped "
        f"and {where}. Lower learning_rate or max_grad_norm, check the data, or set "
        "skip_nonfinite_steps = true to pass over such steps"
    )


def _export(
    model, args: TrainingArgs, model_folder: Path, output_dir: Path, samples_seen: int
) -> Path:
    """``hf_format/samples_<N>`` as mini_trainer names it, in save_dtype or else the dtype the
    model was published in."""
    target = output_dir / "hf_format" / f"samples_{samples_seen}"
    save_dtype = export_dtype(args, model.config)
    export_model(model, target, save_dtype=save_dtype, source_folder=model_folder)
    logger.info("exported %s", target)
    return target


def _peak_memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated by torch; on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux
