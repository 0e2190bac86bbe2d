"""What follows an optimizer step: the counters, the metrics line, validation, the callbacks'
hooks, HF exports, checkpoints on schedule and on a stop signal.

None of it is step time (the loop's :class:`~mt_core.trainer.step.StepClock` is paused around
it)."""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig

from mt_core.config import TrainingArgs
from mt_core.model.build import export_dtype
from mt_core.model.families import export_model
from mt_core.plan.flops import flops_per_token
from mt_core.trainer.counters import export_due, finished, validation_due
from mt_core.trainer.setup import Run
from mt_core.trainer.step import StepOutcome
from mt_core.trainer.validation import validation_loss
from mt_data import StepBatch

__all__ = ["StepEnd", "after_step", "export_dtype_of", "step_record"]

logger = logging.getLogger("mt_core")


@dataclass(frozen=True)
class StepEnd:
    """Where the run stands once a step's bookkeeping is done."""

    done: bool  # the run has reached its end (steps, epochs or samples)
    epoch_closed: bool  # an epoch ended with this step (its hooks have fired)
    stopped: bool  # a stop signal was answered with a checkpoint: leave the loop


def after_step(run: Run, batch: StepBatch, outcome: StepOutcome) -> StepEnd:
    """Count the step, write its metrics line and run what is due after it."""
    args, counters, sampler, fire = run.args, run.counters, run.data.sampler, run.fire
    counters.samples_seen += batch.num_samples
    counters.tokens_seen += batch.num_tokens
    run.last_loss = outcome.loss
    # the sampler moves to the next epoch as it hands out an epoch's last sample
    epoch_ended = sampler.epoch > counters.epochs_done
    counters.epochs_done = sampler.epoch
    done = finished(args, counters)
    record = step_record(run, batch, outcome)

    improved = False
    if validation_due(args, counters, epoch_ended, done):
        counters.validated_at = counters.samples_seen
        record["val_loss"] = validation_loss(
            run.model, run.data.validation, args.batch_size, args.max_tokens_per_gpu, run.ctx
        )
        best = counters.best_val_loss
        improved = best is None or record["val_loss"] < best - args.val_loss_improvement_threshold
        if improved:
            counters.best_val_loss = record["val_loss"]
        fire("on_evaluate", step=counters.step, epoch=sampler.epoch, val_loss=record["val_loss"])
    if run.metrics is not None:
        run.metrics.write(record)
    run.progress.update(record)
    fire("on_log", step=counters.step, epoch=sampler.epoch, record=dict(record))

    if export_due(args, counters, epoch_ended, done) or (improved and args.save_best_val_loss):
        run.exports.append(_export(run))
        counters.exported_at = counters.samples_seen
        fire("on_save", step=counters.step, epoch=sampler.epoch, path=str(run.exports[-1]))
    fire("on_step_end", step=counters.step, epoch=sampler.epoch)
    if epoch_ended or done:
        fire("on_epoch_end", step=counters.step, epoch=counters.epochs_done)
    every = args.checkpoint_every_steps
    if every and counters.step % every == 0 and not done:
        run.checkpoint()
    stopped = not done and outcome.stop_votes > 0
    if stopped:
        folder = run.checkpoint()
        if run.ctx.is_main:
            print(
                f"stopped by signal at step {counters.step}; the training state is in "
                f'{folder}: run the same command again to resume (resume = "auto")',
                flush=True,
            )
    return StepEnd(done=done, epoch_closed=epoch_ended or done, stopped=stopped)


def step_record(run: Run, batch: StepBatch, outcome: StepOutcome) -> dict[str, Any]:
    """The step's line of metrics.jsonl (before validation adds val_loss)."""
    counters, sampler, world = run.counters, run.data.sampler, run.ctx.world_size
    text = run.config.get_text_config()
    tokens_per_s = batch.num_tokens / outcome.step_time_s
    flops = flops_per_token(
        run.matmul_params, text.num_hidden_layers, text.hidden_size,
        outcome.context_sum / batch.num_tokens,
    )  # fmt: skip
    record = {
        "step": counters.step,
        "epoch": sampler.epoch + sampler.position / sampler.num_samples,
        "samples_seen": counters.samples_seen,
        "tokens": batch.num_tokens,
        "tokens_seen": counters.tokens_seen,
        "loss": outcome.loss,
        "lr": outcome.lr,
        "grad_norm": outcome.grad_norm,
        "num_minibatches": len(batch.minibatches),
        "step_time_s": outcome.step_time_s,
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_gpu": tokens_per_s / world,
        "mfu": (tokens_per_s / world) * flops / run.peak_flops if run.peak_flops else None,
        "peak_mem_gib": _peak_memory_gib(run.ctx.device),
        "skipped_steps": counters.skipped_steps,
    }
    if run.offload is not None:  # what the last minibatch sent to host memory and fetched back
        record["offloaded_gib"] = run.offload.pass_bytes / 2**30
    return record


def export_dtype_of(args: TrainingArgs, config: PretrainedConfig, override: str | None = None):
    """The dtype of the run's HF exports: ``override`` (a command-line choice), else save_dtype,
    else OSFT's output dtype, else the dtype the model was published in (its config's)."""
    return export_dtype(
        config, override or args.save_dtype or (args.osft and args.osft_output_dtype)
    )


def _export(run: Run) -> Path:
    """``hf_format/samples_<N>`` as mini_trainer names it, in save_dtype or else the dtype the
    model was published in."""
    target = run.output_dir / "hf_format" / f"samples_{run.counters.samples_seen}"
    save_dtype = export_dtype_of(run.args, run.model.config)
    export_model(run.model, target, save_dtype=save_dtype, source_folder=run.model_folder)
    logger.info("exported %s", target)
    return target


def _peak_memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated by torch; on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux
