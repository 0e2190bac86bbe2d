"""A run's set-up: everything the loop needs, built once into one :class:`Run`.

The order is the data flow of shared/DESIGN.md: the data is validated before any GPU work, the
unset settings are resolved (:mod:`mt_core.plan.resolve`, the function ``mt check`` plans
with), the model is built, sharded and loaded, OSFT splits its targets, the optimizer and the
schedule follow, then a resume restores them all. The run file lands in output_dir only once
model, data and OSFT targets are good, so a run refused for bad input leaves it as it was.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel

from mt_core.config import ConfigError, TrainingArgs, write_run_file
from mt_core.model.activation_offload import ActivationOffload
from mt_core.model.build import (
    TORCH_DTYPES,
    build_model,
    load_config,
    locate_model,
    matmul_parameter_count,
)
from mt_core.model.sequence_parallel import sequence_parallel_problem
from mt_core.optim.build import build_optimizer, build_scheduler, check_optimizer
from mt_core.plan.fit import activation_budget_scope
from mt_core.plan.flops import peak_flops_per_gpu
from mt_core.plan.resolve import Resolved, resolve_this_process
from mt_core.trainer.callbacks import CallbackRunner, load_callbacks
from mt_core.trainer.counters import RunCounters, planned_steps
from mt_core.trainer.data import RunData, build_data, data_cache_dir
from mt_core.trainer.lifecycle import StopRequest, resume_folder, truncate_metrics
from mt_core.trainer.metrics import MetricsLog, ProgressBar
from mt_core.trainer.osft import setup_osft
from mt_core.trainer.tracking import open_trackers
from mt_fsdp import DistContext, load_checkpoint, save_checkpoint
from mt_osft import OSFTState

__all__ = ["Run", "setup_run"]


@dataclass
class Run:
    """One run: its configuration, what was built for it, and where it stands."""

    args: TrainingArgs
    ctx: DistContext
    output_dir: Path
    model_folder: Path
    config: PretrainedConfig
    data: RunData
    resolved: Resolved  # every speed and memory setting, as mt check plans them
    model: PreTrainedModel
    osft: OSFTState | None
    optimizer: torch.optim.Optimizer
    scheduler: Any  # transformers' LambdaLR
    offload: ActivationOffload | None
    counters: RunCounters
    total_steps: int | None
    matmul_params: int  # N of the 6N FLOPs rule
    peak_flops: float | None  # the GPU's datasheet bf16 peak (None: no MFU)
    metrics: MetricsLog | None  # rank 0 only
    progress: ProgressBar
    stop: StopRequest
    fire: CallbackRunner
    exports: list[Path] = field(default_factory=list)
    last_loss: float = float("nan")

    @property
    def checkpoints(self) -> Path:
        return self.output_dir / "checkpoints"

    def checkpoint(self) -> Path:
        """The full training state to ``checkpoints/step_<N>`` (every rank takes part)."""
        trainer_state = {
            "run": self.counters.to_json(),
            "sampler": self.data.sampler.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "osft_ratios": self.osft.ratios if self.osft is not None else None,
        }
        folder = save_checkpoint(
            self.checkpoints,
            self.counters.step,
            self.model,
            self.optimizer,
            trainer_state,
            self.args.keep_last_checkpoints,
            self.osft.state_dict() if self.osft is not None else None,
        )
        self.fire("on_save", step=self.counters.step, epoch=self.counters.epochs_done,
                  path=str(folder))  # fmt: skip
        return folder


@contextlib.contextmanager
def setup_run(args: TrainingArgs, ctx: DistContext, output_dir: Path):
    """The :class:`Run` of ``args`` in this process; on leaving, its reporting is closed (the
    callbacks' queues drained, the signal handlers and the compiler's budget put back)."""
    resume_from = resume_folder(args, output_dir / "checkpoints")
    torch.manual_seed(args.seed)

    # 1. Data: validated once into a memory-mapped store, before any GPU work.
    model_folder = locate_model(args.model_name_or_path)
    config = load_config(model_folder, args.trust_remote_code)
    problem = sequence_parallel_problem(config, args.sequence_parallel_size)
    if problem is not None:
        raise ConfigError([f"sequence_parallel_size: {problem}"])
    data = build_data(args, ctx, config.get_text_config().vocab_size, data_cache_dir(args))

    # 2. Every unset speed and memory setting, then the model: sharded, master weights in
    # train_dtype, compute in the resolved dtype (bf16 on a GPU).
    resolved = resolve_this_process(args, config, ctx, data.train.lengths)
    on_gpu = ctx.device.type == "cuda"
    master_dtype = TORCH_DTYPES[args.train_dtype]
    fit = resolved.fit
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
        compute_dtype=TORCH_DTYPES[resolved.compute_dtype],
        attn_backend=resolved.attn_backend,
        use_liger=resolved.liger,
        activation_checkpointing=args.activation_checkpointing,
        compile_blocks=resolved.compile_blocks,
        activation_offload=offload,
        cpu_offload=fit.cpu_offload,
        keep_gathered=fit.keep_gathered,
        trust_remote_code=args.trust_remote_code,
        float8=resolved.float8,
        deferred_sync=not resolved.sync_each_minibatch,
    )

    # 3. OSFT (after sharding, before the optimizer), then the optimizer and schedule.
    saved = _read_trainer_state(resume_from)
    osft = setup_osft(
        args, model, config.model_type, data.train, ctx, saved.get("osft_ratios") if saved else None,
        reference_on_host=fit.osft_reference_on_host,
    )  # fmt: skip
    # Model, data and OSFT targets are good: only now may this run's resolved run file replace
    # an earlier run's.
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
    total_steps = planned_steps(args, data.train.lengths, data.sampler.batches_per_epoch())
    scheduler = build_scheduler(
        optimizer,
        args.lr_scheduler,
        warmup_steps=args.num_warmup_steps,
        total_steps=total_steps,
        kwargs=args.lr_scheduler_kwargs,
    )

    # 4. Resume: weights, optimizer, schedule, data position, RNG and counters.
    counters = RunCounters(epochs_done=data.sampler.epoch)
    if resume_from is not None:
        saved = load_checkpoint(
            resume_from, model, optimizer, osft.state_dict() if osft is not None else None
        )
        scheduler.load_state_dict(saved["scheduler"])
        data.sampler.load_state_dict(saved["sampler"])
        counters = RunCounters.from_json(saved["run"])
        if ctx.is_main:
            truncate_metrics(output_dir / "metrics.jsonl", counters.step)
            print(f"resumed from {resume_from} (step {counters.step})", flush=True)

    # 5. Reporting (rank 0 only), closed in reverse order however the run ends.
    with contextlib.ExitStack() as closing:
        fire = CallbackRunner(load_callbacks(args.callbacks), ctx.rank, ctx.world_size)
        closing.callback(fire.close)
        stop = StopRequest(on_demand=args.on_demand_checkpointing)
        closing.callback(stop.restore)
        progress = ProgressBar(total_steps, enabled=ctx.is_main, done=counters.step)
        closing.callback(progress.close)
        metrics = None
        if ctx.is_main:
            metrics = MetricsLog(output_dir / "metrics.jsonl", open_trackers(args))
            closing.callback(metrics.close)
        closing.enter_context(activation_budget_scope(fit.activation_budget))
        yield Run(
            args=args,
            ctx=ctx,
            output_dir=output_dir,
            model_folder=model_folder,
            config=config,
            data=data,
            resolved=resolved,
            model=model,
            osft=osft,
            optimizer=optimizer,
            scheduler=scheduler,
            offload=offload,
            counters=counters,
            total_steps=total_steps,
            matmul_params=matmul_parameter_count(model),
            peak_flops=peak_flops_per_gpu(ctx.device),
            metrics=metrics,
            progress=progress,
            stop=stop,
            fire=fire,
        )


def _read_trainer_state(folder: Path | None) -> dict | None:
    """The JSON state of the checkpoint being resumed (read before the model state, because
    OSFT's shapes depend on it)."""
    if folder is None:
        return None
    return json.loads((folder / "trainer_state.json").read_text())
