"""The memory levers of ``mt check``: the peak per GPU with each setting that lowers it, and the
cheapest combination of them that fits when the run as asked does not.

"Cheapest" orders the levers by what they cost a run, as measured (tools/bench/RESULTS.md,
issue #18): lower-precision optimizer state costs no speed on a GPU and stays within 0.01 of the
float32 loss curve (bfloat16 or 8-bit moments; bfloat16 weights with stochastic rounding within
0.02 on average); activation checkpointing recomputes the forward pass (about a third more
compute); CPU offload moves the optimizer step to the CPU and every weight across PCIe, by far
the slowest. A combination is cheaper when it needs fewer of the expensive levers, then the
milder precision change.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import product

from mt.check_plan import Plan, fitted
from mt_core.plan.memory import GIB, MASTER_BYTES, Settings, estimate, moment_bytes

__all__ = ["Lever", "cheapest_fit", "float8_lever", "lever_lines", "levers"]


@dataclass(frozen=True)
class Lever:
    """One setting of the run file that lowers memory."""

    keys: str  # as the user writes them in the run file
    changes: dict  # the change to the estimate's Settings
    cost: str  # what it costs the run, in a few words


def _precision_levers(run: Settings) -> list[Lever]:
    """Lower-precision optimizer settings that would shrink ``run``'s state, mildest first."""
    found = []
    if moment_bytes(run) > 2:
        found.append(
            Lever(
                "optimizer_state_dtype = 'bfloat16'",
                dict(state="bfloat16"),
                "no slower; 1B loss curve within 0.01 of float32's",
            )
        )
    if run.state != "8bit":
        found.append(
            Lever(
                "optimizer_state_dtype = '8bit'",
                dict(state="8bit"),
                "no slower on a GPU; within 0.01 of float32's",
            )
        )
    if MASTER_BYTES[run.master] > 2:
        found.append(
            Lever(
                "train_dtype = 'bfloat16', stochastic_rounding = true",
                dict(master="bfloat16"),
                "within 0.02 of float32's on average",
            )
        )
        if run.state != "8bit":
            found.append(
                Lever(
                    "train_dtype = 'bfloat16', stochastic_rounding = true, "
                    "optimizer_state_dtype = '8bit'",
                    dict(master="bfloat16", state="8bit"),
                    "within 0.02 of float32's on average",
                )
            )
    return found


def levers(run: Settings, osft: bool = False) -> list[Lever]:
    """Every lever that would change ``run``, cheapest first; ``osft``: the run keeps OSFT's
    frozen copies W0 (mt_core.plan.memory.osft_reference_bytes)."""
    found = _precision_levers(run)
    if osft and not run.osft_reference_on_host:
        found.append(
            Lever(
                "osft_reference_on_host = true",
                dict(osft_reference_on_host=True),
                "OSFT's frozen copies to the GPU each step, overlapped with the projections",
            )
        )
    if not run.checkpointing:
        found.append(
            Lever(
                "activation_checkpointing = true",
                dict(checkpointing=True),
                "recomputes the forward pass: about a third more compute",
            )
        )
    if not run.activation_offload:
        found.append(
            Lever(
                "activation_offload = true",
                dict(activation_offload=True),
                "saved activations to host memory and back each step, on a side stream",
            )
        )
    if not run.cpu_offload:
        found.append(
            Lever(
                "cpu_offload = true",
                dict(cpu_offload=True),
                "optimizer step on the CPU, weights over PCIe: much slower",
            )
        )
    return found


def float8_lever(plan: Plan) -> Lever | None:
    """FP8 compute (the key ``float8``), a lever of speed more than memory: offered where the
    planned GPU has FP8 tensor cores, the run does not use it and the model has layers it
    converts. Its peak is the fit's: at activation budget 1 the blocks keep less
    (mt_core.plan.memory.float8_kept_saving), which the fit may spend on a higher budget."""
    from mt_core.model.float8 import FP8_CAPABILITY

    capability, shape = plan.gpu_capability, plan.shape
    if plan.args.float8 is not None or capability is None or capability < FP8_CAPABILITY:
        return None
    if not shape.float8_params:
        return None
    return Lever(
        "float8 = 'tensorwise'",
        dict(float8="tensorwise"),
        f"speed: {shape.float8_params / shape.matmul_params:.0%} of the matmul weights compute "
        "in FP8, their products up to twice as fast; measured: tools/bench/RESULTS.md",
    )


def _fitted(plan: Plan, run: Settings) -> tuple[float, float]:
    """The peak of ``run`` as the trainer would fit it, and the activation budget it needs."""
    run = fitted(plan.args, plan.shape, run, plan.gpu)
    return estimate(plan.shape, run).peak, run.activation_budget


def _as_asked(plan: Plan) -> tuple[Settings, bool]:
    """The run the levers change, and whether the fit turned cpu_offload on for it. The levers
    and the cheapest settings are shown for the run without that choice: they say how it fits
    without the slowest lever."""
    chosen = plan.settings.cpu_offload and plan.args.cpu_offload is None
    return (replace(plan.settings, cpu_offload=False) if chosen else plan.settings), chosen


def _extra_compute(run: Settings, budget: float) -> float:
    """At most how much more the GPU computes for the activations it does not keep: checkpointing
    runs the forward pass again, a third of a step's FLOPs (2 of 6N a token, 4 of 12 per
    attended position: mt_core.plan.step_time.recompute_factor); compiled blocks with a budget b < 1
    recompute at most the share 1 - b of it (the cheapest first)."""
    return 1 / 3 if run.checkpointing else (1 - budget) / 3


def cheapest_fit(plan: Plan) -> tuple[list[Lever], float] | None:
    """The cheapest combination of levers with which the run fits (with its peak), or None when
    none does. Combinations: at most one precision change, with or without activation
    checkpointing, with or without CPU offload (activation offload is listed, not combined:
    its cost is PCIe traffic, not yet measured against recomputation). Cheapest: no CPU offload
    if any fits without, then the mildest change among those within a hundredth of a step of
    the least recomputation (a precision change that saves less is not worth its accuracy)."""
    (run, _), usable = _as_asked(plan), plan.gpu.usable_gib * GIB
    precision = [[]] + [[lever] for lever in _precision_levers(run)]
    checkpointing = [[]] + [[lever] for lever in levers(run) if "checkpointing" in lever.changes]
    offload = [[]] + [[lever] for lever in levers(run) if "cpu_offload" in lever.changes]
    fitting = []  # (offloaded, recomputed share of a step, mildness rank, levers, peak)
    for rank, (one, two, three) in enumerate(product(precision, checkpointing, offload)):
        chosen = one + two + three
        if not chosen:
            continue
        changed = replace(run, **{k: v for lever in chosen for k, v in lever.changes.items()})
        peak, budget = _fitted(plan, changed)
        if peak <= usable:
            recomputed = _extra_compute(changed, budget)
            fitting.append((changed.cpu_offload, recomputed, rank, chosen, peak))
    if not fitting:
        return None
    offloaded = min(found[0] for found in fitting)
    fitting = [found for found in fitting if found[0] == offloaded]
    least = min(found[1] for found in fitting)
    *_, chosen, peak = min((found for found in fitting if found[1] <= least + 0.01),
                           key=lambda found: found[2])  # fmt: skip
    return chosen, peak


def lever_lines(plan: Plan) -> list[str]:
    """The ``levers`` section: each lever alone with its peak, and, when the run does not fit
    (or fits only by the cpu_offload the fit chose), the cheapest combination that does."""
    (run, offload_chosen), usable = _as_asked(plan), plan.gpu.usable_gib * GIB
    speed = float8_lever(plan)
    found = levers(run, osft=plan.shape.osft_reference_values > 0) + ([speed] if speed else [])
    if not found:
        return []
    lines = ["levers  each alone, as the trainer would fit it (its cost in brackets):"]
    for lever in found:
        peak, budget = _fitted(plan, replace(run, **lever.changes))
        word = "fits" if peak <= usable else "still too much"
        if budget < 1:
            word += f", activation budget {budget:.2f}"
        lines.append(f"          - {lever.keys}: peak {peak / GIB:.1f} GiB, {word} ({lever.cost})")
    if not plan.fits or offload_chosen:
        best = cheapest_fit(plan)
        if best is None:
            lines.append("        no combination of these fits: more GPUs (see below)")
        else:
            chosen, peak = best
            keys = " and ".join(lever.keys for lever in chosen)
            lines.append(f"        cheapest settings that fit: {keys} (peak {peak / GIB:.1f} GiB)")
    return lines
