"""The text ``mt check`` prints: the model, the data, memory per GPU, steps and time, a verdict,
and when the run does not fit, what to change (each change with its own estimate)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from mt.check_levers import lever_lines
from mt.check_plan import Plan, fitted
from mt_core.optim.quant_blocks import QUANT_BLOCK
from mt_core.plan.memory import (
    GIB,
    RESERVED_GIB,
    Settings,
    compiled_share,
    estimate,
    float8_kept_saving,
    largest_fitting_tokens,
    worst_minibatch,
)
from mt_core.plan.step_time import osft_step_seconds

__all__ = ["render", "suggestions"]

TIGHT = 0.85  # of the usable memory: fits, but little room for a longer sample mix or a new kernel


def _n(value: float) -> str:
    return f"{value:,.0f}"


def _count(value: int) -> str:
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return str(value)


def _gib(value: float) -> str:
    return f"{value / GIB:.2f}" if value < 10 * GIB else f"{value / GIB:.1f}"


def _duration(seconds: float) -> str:
    if seconds < 1:  # (310 ms, not 3.1e+02 ms)
        return f"{seconds * 1000:.0f} ms" if seconds >= 0.01 else f"{seconds * 1000:.2g} ms"
    if seconds < 120:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.2g} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def render(plan: Plan) -> str:
    lines = [f"mt check {plan.run_file}", ""]
    lines += _model_lines(plan) + [""] + _data_lines(plan) + [""]
    # the words the run's first line will say (mt_core.plan.resolve.resolve_this_process)
    lines += [f"settings {plan.resolved.describe()}", ""]
    lines += _memory_lines(plan) + [""] + _step_lines(plan) + [""]
    levers = lever_lines(plan)
    lines += levers + [""] * bool(levers) + _verdict_lines(plan)
    return "\n".join(lines) + "\n"


def _model_lines(plan: Plan) -> list[str]:
    s = plan.shape
    if s.trainable == s.params:
        trainable = "all trainable"
    else:
        trainable = f"{_count(s.trainable)} trainable under OSFT ({s.trainable / s.params:.1%})"
    return [
        f"model   {s.architecture} from {plan.model_config}",
        f"        {_count(s.params)} parameters ({_n(s.params)}), {trainable}",
        f"        {s.layers} layers, hidden {s.hidden}, {s.heads} heads ({s.kv_heads} key/value, "
        f"dim {s.head_dim}), MLP {s.intermediate}, vocabulary {_n(s.vocab)}",
    ]


def _data_lines(plan: Plan) -> list[str]:
    a = plan.args
    loss = ""
    if plan.file_loss_tokens is not None and plan.file_tokens:
        loss = f", {plan.file_loss_tokens / plan.file_tokens:.0%} of them loss-counted"
    lines = [
        f"data    {a.data_path}: {_n(plan.file_samples)} samples, {_n(plan.file_tokens)} tokens{loss}; "
        f"longest {_n(plan.longest)}"
    ]
    if plan.items == "blocks":
        lines.append(
            f"        pretraining: {_n(plan.train_items + plan.validation_items)} blocks of "
            f"{a.pretraining.block_size} tokens"
        )
    else:
        verb = "refused" if a.too_long_samples == "error" else "dropped"
        limit = f"max_tokens_per_gpu = {_n(a.max_tokens_per_gpu)}"
        if a.sequence_parallel_size > 1:
            limit = (
                f"a row of {_n(a.max_tokens_per_gpu * a.sequence_parallel_size)} tokens "
                f"({limit} x sequence_parallel_size = {a.sequence_parallel_size})"
            )
        lines.append(
            f"        {verb}: {_n(plan.dropped_long)} longer than {limit}, "
            f"{_n(plan.dropped_silent)} without a loss-counted token"
        )
    if plan.validation_items:
        lines.append(
            f"        validation: {_n(plan.validation_items)} {plan.items} held out "
            f"(validation_split = {a.validation_split})"
        )
    lines.append(f"        {_n(plan.train_items)} {plan.items} to train on; {plan.cache_note}")
    return lines + [f"        note: {note}" for note in plan.notes]


def _moments(run: Settings) -> str:
    """How AdamW's moments are stored (optimizer_state_dtype; not set: as the master weights)."""
    if run.state == "8bit":
        return f"8-bit, a float32 scale per {QUANT_BLOCK}"
    return run.state or run.master


def _memory_lines(plan: Plan) -> list[str]:
    m, s, run = plan.memory, plan.shape, plan.settings
    w = plan.world_size
    shard = f"1/{w} shard" if w > 1 else "one shard"
    master = plan.args.train_dtype
    where = " (in host memory: cpu_offload)" if run.cpu_offload else ""
    ac_on, ac_off = plan.memory_ac, plan.memory_no_ac
    this = "this run: " + ("on" if run.checkpointing else "off")
    loss = (
        "Liger fused linear cross-entropy: no logits"
        if run.liger
        else f"logits {_n(run.max_tokens)} x {_n(s.vocab)} (fp32, log-softmax, gradient)"
    )
    rows = [
        ("weights", f"{master} master, {shard}{where}", m.weights, None),
        ("gradients", f"{master}, {shard}{where}", m.gradients, None),
        ("optimizer state", f"AdamW: 2 x {_moments(run)}, {shard}{where}", m.optimizer, None),
    ]
    if m.osft:
        if run.cpu_offload:
            what = f"frozen weights and bases{where}"
        elif run.osft_reference_on_host:
            what = "singular bases (frozen weights in host memory)"
        else:
            what = "frozen weights and singular bases"
        rows.append(("OSFT", what, m.osft, None))
    rows += [
        (
            "compute copies",
            f"bf16: root + {'all' if run.gathered else '2'} blocks gathered, in-flight grads",
            m.copies,
            None,
        ),
        (
            "activations",
            f"{_n(run.max_tokens)} tokens x {s.layers} layers, Liger {'on' if run.liger else 'off'}"
            + (f", budget {run.activation_budget:.2f}" if run.activation_budget < 1 else "")
            + (f", {min(s.layers, 2)} of them on the GPU" if run.activation_offload else ""),
            ac_off.activations,
            ac_on.activations,
        ),
        ("loss", loss, m.loss, None),
        ("peak", f"at the {m.peak_at}", ac_off.peak, ac_on.peak),
    ]
    lines = [
        f"memory per GPU (GiB) at max_tokens_per_gpu = {_n(run.max_tokens)}, "
        f"activation checkpointing off | on ({this})"
    ]
    for name, what, off, on in rows:
        if on is None:
            lines.append(f"  {name:<16}{what:<58}{_gib(off):>7}")
        else:
            lines.append(f"  {name:<16}{what:<58}{_gib(off):>7} | {_gib(on)}")
    if run.activation_budget < 1 and not run.checkpointing:
        lines.append(
            f"  (activation_memory_budget {run.activation_budget:.2f}: so that the row fits, the "
            f"compiled blocks keep about {compiled_share(s, run.activation_budget):.2f}\n   of "
            "their activations beyond each block's input and recompute the rest)"
        )
    saving = float8_kept_saving(s, run.float8)
    if saving and run.compiled and not run.checkpointing:
        if run.activation_budget >= 1:
            said = (
                f"counted above: the compiled blocks keep {saving:,} B less per token and "
                f"layer,\n   {_gib(saving * s.layers * run.max_tokens)} GiB at this row"
            )
        else:
            said = (
                "below budget 1 the compiled blocks are counted as bfloat16's, an upper "
                "bound:\n   FP8 keeps no more"
            )
        lines.append(f"  (float8 = {run.float8!r}: {said})")
    # the sampled steps' own peak, where well under the plan's (rows that never fill up): what
    # a short run of them would measure (the trainer's last line on a GPU says the same)
    first = max(step.first for step in plan.steps)
    worst = worst_minibatch(s, run, first, max(step.later for step in plan.steps))
    seen = estimate(s, worst).peak
    if seen < 0.97 * m.peak:
        which = "first" if worst.minibatches == 1 else "later"
        lines.append(
            f"  (the sampled steps peak {_gib(seen)} GiB, at a {which} minibatch of "
            f"{_n(worst.max_tokens)} tokens on one GPU; the verdict\n   assumes a full "
            f"{_n(run.max_tokens)}{' after a first' if run.minibatches > 1 else ''}, as a longer "
            "run of this data may bring)"
        )
    if run.activation_offload and plan.args.activation_offload is None:
        lines.append(
            "  (activation_offload on: so that the row fits, the blocks' saved activations wait in "
            "host memory\n   between their forward and backward passes)"
        )
    osft = "OSFT's frozen weights and bases" if s.osft_reference_values else ""
    if run.cpu_offload and plan.args.cpu_offload is None:
        also = f" (and {osft})" if osft else ""
        lines.append(
            f"  (cpu_offload on: nothing else fits, so the weights, gradients and optimizer state"
            f"{also}\n   wait in host memory and the optimizer step runs on the CPU, much slower; "
            "it needs the host memory below)"
        )
    held = ["weights", "gradients", "optimizer state"] if run.cpu_offload else []
    if osft and run.cpu_offload:
        held.append(osft)
    elif osft and run.osft_reference_on_host:
        held.append("OSFT's frozen weights")
    held += ["offloaded activations"] if run.activation_offload else []
    if held:
        what = held[0] if len(held) == 1 else f"{', '.join(held[:-1])} and {held[-1]}"
        lines.append(
            f"  host memory     {what}: {_gib(m.host)} GiB per GPU, "
            f"{_gib(m.host * plan.nproc_per_node)} GiB per node"
        )
    return lines


def _step_lines(plan: Plan) -> list[str]:
    a = plan.args
    steps = plan.steps
    tokens = np.array([step.tokens for step in steps])
    loss = np.array([step.loss_tokens for step in steps])
    minibatches = np.array([step.minibatches for step in steps])
    times = np.array([step.time_s for step in steps])
    w = plan.world_size
    node = "node" if plan.nnodes == 1 else "nodes"
    gpus = "GPU" if plan.nproc_per_node == 1 else "GPUs"
    lines = [
        f"steps   {plan.nnodes} {node} x {plan.nproc_per_node} {gpus} = {w} rank{'s' * (w > 1)}; "
        f"{len(steps)} global batches of {a.batch_size} drawn by the run's sampler and packed",
        f"        tokens per step {_n(tokens.mean())} (from {_n(tokens.min())} to "
        f"{_n(tokens.max())}), {_n(loss.mean())} loss-counted",
        f"        minibatches per GPU per step {minibatches.mean():.2g} (from {minibatches.min()} to "
        f"{minibatches.max()}), at most {_n(a.max_tokens_per_gpu)} tokens each",
    ]
    if a.sequence_parallel_size > 1:
        lines.append(
            f"        sequence parallelism: groups of {a.sequence_parallel_size} GPUs compute rows "
            f"of up to {_n(a.max_tokens_per_gpu * a.sequence_parallel_size)} tokens, each GPU "
            "an equal part (attention heads exchanged for tokens: 4 all-to-alls per layer)"
        )
    if plan.total_steps is None:
        total = f"{a.training_mode} mode: no end"
    elif a.training_mode == "epoch":
        total = f"{_n(plan.total_steps)} in all ({a.max_epochs} epoch{'s' * (a.max_epochs > 1)})"
    else:
        total = f"{_n(plan.total_steps)} in all (training_mode = {a.training_mode!r})"
    lines.append(f"        steps per epoch {_n(plan.steps_per_epoch)}; {total}")
    rate = f"{plan.mfu:.0%} MFU of {plan.gpu.peak_flops / 1e12:,.0f} TFLOP/s ({plan.gpu.name} bf16 peak)"
    extra = (
        ", with the recomputation of activation checkpointing" if a.activation_checkpointing else ""
    )
    if a.float8 is not None:
        extra += (
            f", the FP8 layers ({plan.shape.float8_params / plan.shape.matmul_params:.0%} of the "
            "matmul weights) at twice bfloat16's rate: a lower bound of the step time, their "
            "casts not counted"
        )
    osft = osft_step_seconds(plan.shape, a.train_dtype, w, plan.gpu.peak_flops)
    if osft:
        extra += (
            f", OSFT's projections of gradients and weights included ({_duration(osft)} at the "
            "rates measured on an H200)"
        )
    time = f"time    {_duration(times.mean())} per step at {rate}{extra}"
    if plan.total_steps:
        time += f"; {_duration(times.mean() * plan.total_steps)} for the run"
    lines.append(time)
    if plan.settings.cpu_offload:  # no model of it yet: what it cost where it was measured
        lines.append(
            "        (cpu_offload not counted: each minibatch copies the weights to the GPU and "
            "AdamW runs on the CPU;\n        measured at the 1B shape on one H100: 2.2 s a step "
            "instead of 0.33 with the gradients\n        summed on the GPU, 6.3 s where each "
            "minibatch's go to host memory (5.4 with OSFT);\n        57 s a step of 38k tokens "
            "at 8B on one H200, gradients to the host every minibatch;\n        "
            "tools/bench/RESULTS.md)"
        )
    return lines


def _verdict_lines(plan: Plan) -> list[str]:
    usable = plan.gpu.usable_gib * GIB
    peak = plan.memory.peak
    capacity = (
        f"{plan.gpu.label}: {plan.gpu.memory_gib:.1f} GiB, usable {plan.gpu.usable_gib:.1f} after "
        f"{RESERVED_GIB} for CUDA and NCCL and room for fragmentation"
    )
    share = peak / usable
    if plan.fits:
        word = "fits, with little room to spare" if share > TIGHT else "fits"
        return [
            f"verdict {word}: peak {_gib(peak)} GiB per GPU = {share:.0%} of usable ({capacity})"
        ]
    lines = [
        f"verdict DOES NOT FIT: peak {_gib(peak)} GiB per GPU, {share:.0%} of usable ({capacity})",
        "        change one of these (each estimated alone):",
    ]
    return lines + [f"          - {line}" for line in suggestions(plan)]


def suggestions(plan: Plan) -> list[str]:
    """Changes that would make the run fit, each with its estimated peak: one change at a time,
    and where none is enough alone, each together with activation checkpointing."""
    found = _changes(plan, plan.settings, "")
    if plan.settings.checkpointing or any(line.endswith(", fits") for line in found):
        return found
    with_ac = replace(plan.settings, checkpointing=True)
    combined = [line for line in _changes(plan, with_ac, "activation_checkpointing = true and ")
                if line.endswith(", fits")]  # fmt: skip
    return (
        found + combined
        if combined
        else found + ["a GPU with more memory (--gpu=H200), or more GPUs with cpu_offload"]
    )


def _changes(plan: Plan, run, prefix: str) -> list[str]:
    shape, usable = plan.shape, plan.gpu.usable_gib * GIB
    found = []

    def peak_of(**changes) -> str:
        # the changed run with its own fit, as the trainer would choose it
        changed = replace(run, **changes)
        trained = fitted(plan.args, shape, changed, plan.gpu)
        memory = estimate(shape, trained)
        word = "fits" if memory.peak <= usable else "still too much"
        # (the trainer turns activation offload on where only that makes the changed run fit)
        chosen = trained.activation_offload and not changed.activation_offload
        offload = " with activation_offload on" if chosen else ""
        return f"peak {_gib(memory.peak)} GiB{offload}, {word}"

    if not prefix and not run.checkpointing:
        found.append(f"activation_checkpointing = true: {peak_of(checkpointing=True)}")
    if not prefix and not run.liger:
        found.append(f"use_liger_kernels = true (no logits in memory): {peak_of(liger=True)}")
    tokens = largest_fitting_tokens(shape, run, usable)
    if 0 < tokens < run.max_tokens:
        drop = ""
        if tokens < plan.longest and plan.items == "samples":
            drop = f"; samples longer than that (up to {_n(plan.longest)} tokens) are dropped"
        found.append(
            f"{prefix}max_tokens_per_gpu = {_n(tokens)}{drop}: {peak_of(max_tokens=tokens)}"
        )
    if not run.activation_offload:
        offloaded = fitted(plan.args, shape, replace(run, activation_offload=True), plan.gpu)
        host = estimate(shape, offloaded).host * plan.nproc_per_node
        found.append(
            f"{prefix}activation_offload = true (PCIe traffic; {_gib(host)} GiB of host memory "
            f"per node): {peak_of(activation_offload=True)}"
        )
    if not run.cpu_offload:
        host = estimate(shape, replace(run, cpu_offload=True)).host * plan.nproc_per_node
        found.append(
            f"{prefix}cpu_offload = true (slower; {_gib(host)} GiB of host memory per node): "
            f"{peak_of(cpu_offload=True)}"
        )
    for nodes in range(plan.nnodes + 1, 4 * plan.nnodes + 65):
        world = nodes * plan.nproc_per_node
        if estimate(shape, replace(run, world_size=world)).peak <= usable:
            found.append(f"{prefix}--nnodes={nodes} ({world} GPUs): {peak_of(world_size=world)}")
            break
    return found
