"""Which learning-rate schedules of ``transformers.get_scheduler`` a run may name, and the checks
of ``lr_scheduler_kwargs`` against the chosen schedule's own signature.

transformers (and with it torch) is imported only once a schedule's arguments are checked, so
importing the config, and printing its reference, stays light.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mt_core.config.args import TrainingArgs

# transformers' GreedyLR and ReduceLROnPlateau step on a metric (`scheduler.step(loss)`); the
# train loop steps every scheduler the same way, without one.
_METRIC_SCHEDULERS = ("reduce_lr_on_plateau", "greedy")
# Arguments of a schedule function that mt passes itself, so lr_scheduler_kwargs may not.
_SET_BY_MT = {
    "optimizer": "mt passes its optimizer",
    "num_warmup_steps": "set the num_warmup_steps key instead",
    "num_training_steps": "mt computes it from the training length",
    "last_epoch": "mt sets the scheduler's position itself",
}


# The schedules the train loop can step (the choices of lr_scheduler): transformers'
# SchedulerType but the metric ones, spelled out so that --help imports no torch; a test keeps
# them equal.
SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "inverse_sqrt", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay",
)  # fmt: skip


def usable_scheduler(name: str) -> str | None:
    # a check of lr_scheduler that runs before its choices, so a schedule transformers has but
    # the train loop cannot step is refused with the reason, not as an unknown name
    if name in _METRIC_SCHEDULERS:
        return f"{name!r} steps on a metric, which the train loop does not pass to the scheduler"
    return None


def _scheduler_parameters(name: str) -> Mapping[str, inspect.Parameter]:
    from transformers import SchedulerType
    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION

    return inspect.signature(TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)]).parameters


def scheduler_problems(args: TrainingArgs) -> list[tuple[str, str]]:
    """Problems of the schedule with its kwargs and the training length, each with its key."""
    name = args.lr_scheduler
    parameters = _scheduler_parameters(name)
    problems = []
    allowed = [p for p in parameters if p not in _SET_BY_MT]
    for key in args.lr_scheduler_kwargs:
        if key in _SET_BY_MT:
            problems.append(("lr_scheduler_kwargs", f"{key}: {_SET_BY_MT[key]}"))
        elif key not in allowed:
            near = difflib.get_close_matches(key, allowed, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            takes = ", ".join(allowed) if allowed else "none"
            problems.append(
                ("lr_scheduler_kwargs", f"{name!r} takes no {key!r} (it takes: {takes}){hint}")
            )
    for key, parameter in parameters.items():
        needed = parameter.default is inspect.Parameter.empty and key not in _SET_BY_MT
        if needed and key not in args.lr_scheduler_kwargs:
            problems.append(("lr_scheduler_kwargs", f"{name!r} needs {key}"))
    # A schedule that needs the total step count cannot run without an end; warmup_stable_decay
    # takes num_stable_steps in its place (transformers' get_wsd_schedule).
    total = parameters.get("num_training_steps")
    if name == "warmup_stable_decay":
        needs_total = "num_stable_steps" not in args.lr_scheduler_kwargs
    else:
        needs_total = total is not None and total.default is inspect.Parameter.empty
    if args.training_mode == "infinite" and needs_total:
        problems.append(
            (
                "lr_scheduler",
                f"{name!r} needs the total number of steps, which training_mode = 'infinite' "
                "does not have; use constant, constant_with_warmup, inverse_sqrt, or "
                "warmup_stable_decay with lr_scheduler_kwargs.num_stable_steps",
            )
        )
    if name == "constant" and args.num_warmup_steps > 0:
        # transformers' get_scheduler drops num_warmup_steps for 'constant' without a word
        problems.append(
            (
                "num_warmup_steps",
                "'constant' has no warmup; use lr_scheduler = 'constant_with_warmup'",
            )
        )
    return problems
