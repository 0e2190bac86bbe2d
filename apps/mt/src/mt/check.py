"""``mt check RUN.toml``: will this run fit, and how long will it take? On a laptop, before the job.

The run file is read and the data validated exactly as ``mt run`` does (mt_core.trainer.data.build_data:
the same store, the same path:line errors, the same dropping of too-long samples), into the same
cache (``data_cache_dir``, by default ``output_dir/data_cache``), so the run that follows starts
at once. The model is built from its config.json on the meta device (exact parameter counts, no
weights). Then a few global
batches are drawn by the run's own sampler and split by the real packer over the planned ranks,
which gives the tokens and minibatches per step and, at a stated MFU, the step time; and
:mod:`mt_core.plan.memory` estimates each GPU's peak memory. :mod:`mt.check_report` prints it all.

Exit status: 0 when the run fits the GPU, 1 when it does not (the report says what to change),
2 for a mistake in the run file, the data or the options.
"""

from __future__ import annotations

import itertools
import tempfile
import warnings
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from mt.check_plan import Plan, StepSample
from mt.errors import CommandError, Verdict
from mt_core.config import TrainingArgs, load_run_file
from mt_core.plan.memory import (
    Gpu,
    ModelShape,
    estimate,
    gpu,
)
from mt_core.plan.step_time import (
    float8_time_factor,
    osft_step_seconds,
    recompute_factor,
    step_flops,
)
from mt_core.trainer.counters import planned_steps
from mt_data import DataWarning, PretrainingBlocks

__all__ = ["check", "make_plan"]

DEFAULT_MFU = 0.4
DEFAULT_BATCHES = 20


def check(
    run_file: str,
    nproc_per_node: int = 1,
    nnodes: int = 1,
    gpu: str | None = None,
    mfu: float = DEFAULT_MFU,
    batches: int = DEFAULT_BATCHES,
    **overrides: Any,
) -> None:
    """Validate RUN_FILE and its data as a run would, and print the plan; exit 1 if it does not
    fit. Run-file keys may be overridden by name (--max_tokens_per_gpu=8192), as with mt run."""
    from mt.check_report import render  # the model stack loads after the options are checked

    args = load_run_file(str(run_file), overrides)
    plan = make_plan(args, str(run_file), nproc_per_node, nnodes, gpu, mfu, batches)
    print(render(plan), end="", flush=True)
    if not plan.fits:
        raise Verdict(1)


def local_gpu() -> Gpu | None:
    """This machine's first GPU as mt check plans for it (its name, the memory torch sees and
    its datasheet bf16 peak, H100's if mt does not know it), or None without CUDA."""
    import torch

    from mt_core.plan.flops import peak_flops_of

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    memory = props.total_memory / 2**30
    peak = peak_flops_of(props.name)
    label = f"{props.name} {memory:.0f} GiB (this machine's)"
    if peak is None:
        peak = gpu("H100").peak_flops
        label += ", peak FLOP/s taken as an H100's"
    return Gpu(props.name, label, memory, peak)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CommandError(f"--{name}: expected a positive integer, got {value!r}")
    return value


def make_plan(
    args: TrainingArgs,
    run_file: str,
    nproc_per_node: int = 1,
    nnodes: int = 1,
    gpu_name: str | None = None,
    mfu: float = DEFAULT_MFU,
    batches: int = DEFAULT_BATCHES,
) -> Plan:
    """The plan of ``args`` on ``nnodes`` x ``nproc_per_node`` GPUs of type ``gpu_name``; None:
    this machine's GPU where it has one (its memory and datasheet peak), else an H100 80 GB."""
    nproc_per_node = _positive_int("nproc_per_node", nproc_per_node)
    nnodes = _positive_int("nnodes", nnodes)
    batches = _positive_int("batches", batches)
    if isinstance(mfu, bool) or not isinstance(mfu, (int, float)) or not 0 < mfu <= 1:
        raise CommandError(f"--mfu: expected a fraction in (0, 1], e.g. 0.4, got {mfu!r}")
    try:
        device = gpu(gpu_name) if gpu_name is not None else (local_gpu() or gpu("H100"))
    except ValueError as error:
        raise CommandError(str(error)) from error
    world = nproc_per_node * nnodes
    size = args.sequence_parallel_size
    if world % size:
        raise CommandError(
            f"sequence_parallel_size = {size} does not divide the {world} GPUs of this plan "
            "(--nproc_per_node x --nnodes)"
        )

    from mt_core.model.sequence_parallel import sequence_parallel_problem
    from mt_core.plan.resolve import planned_machine, resolve  # torch, ...
    from mt_core.plan.shape import read_config_only, run_shape

    config = read_config_only(args.model_name_or_path, args.trust_remote_code)
    problem = sequence_parallel_problem(config, size)
    if problem is not None:
        raise CommandError(f"sequence_parallel_size: {problem}")
    shape = run_shape(config, args)
    with ExitStack() as stack:
        cache, cache_note = _cache_dir(args, stack)
        train, sampler, caught, counts = _data_plan(
            args, config.get_text_config().vocab_size, world, cache
        )
    # the settings the trainer will resolve on such a GPU: the same function, the same inputs
    machine = planned_machine(device, world)
    resolved = resolve(args, config, machine, train.lengths, shape=shape, warn=False)
    settings = resolved.settings
    steps = _sample_steps(args, train, sampler, world, shape, device, mfu, batches)
    per_epoch = sampler.batches_per_epoch()
    notes = list(resolved.notes)
    notes += [str(w.message) for w in caught if not issubclass(w.category, DataWarning)]
    if args.osft and args.osft_adaptive_ratios:
        notes.append(
            "OSFT adaptive ratios are measured at the start of the run: the trainable count and "
            "OSFT memory are for the midpoint of osft_min_ratio and osft_max_ratio"
        )
    if args.float8 is not None:
        # torchtitan, Llama-3.1-8B on 8 H100: peak 47.3 GiB with tensorwise FP8 against 47.7 in
        # bfloat16 (pytorch/torchtitan commit 7a04053); mt's own: tools/bench/RESULTS.md
        notes.append(
            "float8: weights, gradients and optimizer state are as without it; the compiled "
            "blocks keep FP8's measured saving less at activation budget 1, and below it are "
            "counted as bfloat16's (an upper bound: FP8 keeps no more)"
        )
    if shape.moe:
        notes.append(
            "a mixture-of-experts model: the activation estimate assumes one dense MLP per "
            "layer and is only a guide"
        )
    return Plan(
        run_file=run_file,
        args=args,
        model_config=str(Path(args.model_name_or_path) / "config.json")
        if Path(args.model_name_or_path).is_dir()
        else f"{args.model_name_or_path} (hub config)",
        shape=shape,
        gpu=device,
        nproc_per_node=nproc_per_node,
        nnodes=nnodes,
        mfu=float(mfu),
        settings=settings,
        resolved=resolved,
        gpu_capability=machine.gpu_capability,
        memory=estimate(shape, settings),
        memory_ac=estimate(shape, replace(settings, checkpointing=True)),
        memory_no_ac=estimate(shape, replace(settings, checkpointing=False)),
        steps=steps,
        steps_per_epoch=per_epoch,
        total_steps=planned_steps(args, train.lengths, per_epoch),
        cache_note=cache_note,
        notes=notes,
        **counts,
    )


def _cache_dir(args: TrainingArgs, stack: ExitStack) -> tuple[Path, str]:
    """Where the validated store goes: where ``mt run`` will look for it (data_cache_dir, by
    default beside the run's output); a temporary folder when that cannot be written here
    (another machine's path)."""
    from mt_core.trainer.data import data_cache_dir

    cache = data_cache_dir(args)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        probe = cache / ".mt-check-probe"
        probe.write_text("")
        probe.unlink()
        return cache, f"validated data cached in {cache} for the run"
    except OSError:
        temporary = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mt-check-")))
        return temporary, f"{cache} is not writable here: data checked in a temporary cache"


def _data_plan(args: TrainingArgs, vocab_size: int, world: int, cache: Path):
    """The run's data as ``mt run`` builds it (the same function), with what it dropped."""
    from mt_core.trainer.data import build_data

    ctx = SimpleNamespace(
        world_size=world, rank=0, is_main=True,
        data_parallel_size=world // args.sequence_parallel_size,
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = build_data(args, ctx, vocab_size, cache)
    source = data.train
    base = getattr(source, "source", source)  # under a validation split: the whole source
    store = base.store
    lengths = np.asarray(store.lengths)
    if isinstance(base, PretrainingBlocks):
        items, long, silent = "blocks", 0, 0
    else:
        items = "samples"
        long = int((lengths > args.max_tokens_per_gpu * args.sequence_parallel_size).sum())
        silent = len(store) - len(base) - long
    counts = dict(
        items=items,
        file_samples=len(store),
        file_tokens=int(store.num_tokens),
        file_loss_tokens=None if store.loss_counts is None else int(np.sum(store.loss_counts)),
        dropped_long=long,
        dropped_silent=silent,
        train_items=len(source),
        validation_items=0 if data.validation is None else len(data.validation),
        longest=int(lengths.max()) if lengths.size else 0,
    )
    return source, data.sampler, caught, counts


def _context_sums(source, ids: np.ndarray) -> np.ndarray:
    """Per item, the sum over its tokens of the positions each attends to (documents reset)."""
    base = getattr(source, "source", source)
    if isinstance(base, PretrainingBlocks):
        sums = []
        for i in ids:
            segments = source.item(int(i))[2].astype(np.float64)
            sums.append(float((segments * (segments + 1) / 2).sum()))
        return np.asarray(sums)
    lengths = source.lengths[ids].astype(np.float64)
    return lengths * (lengths + 1) / 2


def _sample_steps(
    args: TrainingArgs, train, sampler, world: int, shape: ModelShape, device: Gpu, mfu: float,
    count: int,
) -> list[StepSample]:  # fmt: skip
    """The first ``count`` global batches of the run, packed over ``world`` ranks (over its
    groups with sequence parallelism: each GPU of a group computes an equal part of a row)."""
    from mt_packing import pack_minibatches

    steps = []
    rate = device.peak_flops * mfu
    osft = osft_step_seconds(shape, args.train_dtype, world, device.peak_flops)
    size = args.sequence_parallel_size
    for batch in itertools.islice(iter(sampler), count):
        batch = np.asarray(batch, dtype=np.int64)
        lengths = train.lengths[batch]
        contexts = _context_sums(train, batch)
        plan = pack_minibatches(lengths, args.max_tokens_per_gpu * size, world // size, rank=None)
        busiest = 0.0
        # tokens on one GPU of each rank's minibatches (a group's GPUs share each row)
        loads = [[-(-int(lengths[ids].sum()) // size) for ids in rows] for rows in plan]
        for minibatch in range(len(plan[0])):
            busiest += (
                max(
                    step_flops(
                        shape, lengths[rows[minibatch]].sum(), contexts[rows[minibatch]].sum()
                    )
                    for rows in plan
                )
                / size
            )
        if args.activation_checkpointing:
            busiest *= recompute_factor(shape, lengths.sum(), contexts.sum())
        if args.float8 is not None:
            busiest *= float8_time_factor(shape, lengths.sum(), contexts.sum())
        steps.append(
            StepSample(
                tokens=int(lengths.sum()),
                loss_tokens=int(train.loss_counts[batch].sum()),
                minibatches=len(plan[0]),
                first=max(rows[0] for rows in loads),
                later=max((load for rows in loads for load in rows[1:]), default=0),
                time_s=busiest / rate + osft,
            )
        )
    return steps
