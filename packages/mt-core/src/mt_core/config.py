"""The run configuration: attrs classes, the TOML run-file reader and writer, the key reference.

Keys are named like mini_trainer's ``TrainingArgs`` fields, so its users move their flags over one
to one. Each field carries its type and value checks (its attrs validator) and its help text and
help group (its metadata): validation, ``mt run --help`` and the docs all come from here.

Errors a user can make are :class:`ConfigError` with one line per problem, each naming the key
and, for run files, ``path:line``. Every problem of a file is reported at once where the checks
can run independently (unknown keys, types, values); checks across keys run once those pass.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import json
import math
import os
import re
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

__all__ = [
    "ConfigError",
    "PretrainingConfig",
    "TrainingArgs",
    "args_from_dict",
    "args_to_dict",
    "load_run_file",
    "render_help",
    "render_run_file",
    "write_run_file",
]


class ConfigError(Exception):
    """A run configuration the user has to fix. ``problems`` holds one line per problem."""

    def __init__(self, problems: str | Iterable[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class _KeyedConfigError(ConfigError):
    """Problems raised while building a config object, kept with the key each is about, so
    :func:`args_from_dict` can point them at ``path:line``."""

    def __init__(self, keyed: list[tuple[str, str]]) -> None:
        self.keyed = keyed
        super().__init__(f"{key}: {message}" for key, message in keyed)


# ---------------------------------------------------------------------------------------------
# Field rules: one object per field is both its attrs validator and the per-key check of a file.

_KINDS: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    # bool is an int subclass in Python but never a number in a run file
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "table": lambda v: isinstance(v, dict),
}


@attrs.frozen
class _Rule:
    """A field's TOML type and value checks; each check returns what is wrong, or None."""

    kind: str
    checks: tuple[Callable[[Any], str | None], ...] = ()
    optional: bool = False
    choices: Callable[[], tuple[str, ...]] | None = None  # a function: some lists load lazily

    def problem(self, value: Any) -> str | None:
        if value is None:
            return None if self.optional else f"expected {_article(self.kind)}, got nothing"
        if not _KINDS[self.kind](value):
            return (
                f"expected {_article(self.kind)}, got {_shown(value)}{_type_hint(self.kind, value)}"
            )
        for check in self.checks:
            problem = check(value)
            if problem:
                return problem
        if self.choices is not None and value not in self.choices():
            return _not_a_choice(value, self.choices())
        return None

    def __call__(self, instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        problem = self.problem(value)
        if problem:
            raise _KeyedConfigError([(attribute.name, problem)])


def _article(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def _toml_type(value: Any) -> str:
    for kind, test in _KINDS.items():
        if kind != "float" and test(value):
            return kind
    if isinstance(value, float):
        return "float"
    return "array" if isinstance(value, (list, tuple)) else type(value).__name__


def _shown(value: Any) -> str:
    try:
        text = _toml_value(value)
    except TypeError:
        text = repr(value)
    return f"{text} ({_article(_toml_type(value))})"


def _type_hint(kind: str, value: Any) -> str:
    if kind == "integer" and isinstance(value, float) and value.is_integer():
        return f"; write it as an integer, e.g. {int(value):_}"
    if kind in ("integer", "float") and isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return ""
        return "; drop the quotes"
    if kind == "string" and _KINDS["float"](value):
        return "; quote it"
    return ""


def _not_a_choice(value: Any, choices: tuple[str, ...]) -> str:
    near = difflib.get_close_matches(str(value), choices, n=1)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    return f"{value!r} is not one of {', '.join(choices)}{hint}"


def _greater_than(bound: float) -> Callable[[Any], str | None]:
    return lambda v: None if v > bound else f"must be > {bound}, got {v}"


def _at_least(bound: float) -> Callable[[Any], str | None]:
    return lambda v: None if v >= bound else f"must be >= {bound}, got {v}"


def _below_one(v: float) -> str | None:
    return None if v < 1 else f"must be < 1, got {v}"


def _finite(v: float) -> str | None:
    return None if math.isfinite(v) else f"must be a finite number, got {v}"


def _not_empty(v: str) -> str | None:
    return None if v.strip() else "must not be empty"


def _string_keys(v: dict) -> str | None:
    bad = [key for key in v if not isinstance(key, str)]
    return f"keys must be strings, got {bad[0]!r}" if bad else None


def _int_to_float(value: Any) -> Any:
    # TOML and fire read `learning_rate = 1` as an int; the field holds a float either way, so
    # a file, its resolved copy and the Python API all compare equal.
    return float(value) if _KINDS["integer"](value) else value


def _field(
    help: str,
    group: str,
    kind: str,
    *checks: Callable[[Any], str | None],
    default: Any = attrs.NOTHING,
    optional: bool = False,
    choices: Callable[[], tuple[str, ...]] | None = None,
) -> Any:
    return attrs.field(
        default=default,
        validator=_Rule(kind, checks, optional, choices),
        converter=_int_to_float if kind == "float" else None,
        metadata={"help": help, "group": group},
    )


def _fixed(*names: str) -> Callable[[], tuple[str, ...]]:
    return lambda: names


DTYPES = ("float32", "bfloat16", "float16")
TRAINING_MODES = ("epoch", "step", "token", "infinite")
ATTN_BACKENDS = ("auto", "flash_attn", "torch_varlen", "sdpa")

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


@functools.cache
def _scheduler_names() -> tuple[str, ...]:
    from transformers import SchedulerType  # imports torch: only once a scheduler is checked

    return tuple(s.value for s in SchedulerType if s.value not in _METRIC_SCHEDULERS)


def _scheduler_parameters(name: str) -> Mapping[str, inspect.Parameter]:
    from transformers import SchedulerType
    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION

    return inspect.signature(TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)]).parameters


def _usable_scheduler(name: str) -> str | None:
    if name in _METRIC_SCHEDULERS:
        return f"{name!r} steps on a metric, which the train loop does not pass to the scheduler"
    return None


# ---------------------------------------------------------------------------------------------
# The config classes. Field order is the order of `--help` and of the resolved run file.

_PRETRAINING = "[pretraining] table: present = continued pretraining on documents cut into blocks"


@attrs.define(kw_only=True)
class PretrainingConfig:
    """Continued pretraining: the corpus is read as one token stream cut into blocks."""

    block_size: int = _field(
        "Tokens per block (input positions per training item). Must fit in max_tokens_per_gpu.",
        _PRETRAINING,
        "integer",
        _greater_than(1),
    )
    segment_documents: bool = _field(
        "Attention stays inside each document of a block (position ids restart at every "
        "document). false = classic contiguous blocks that attend across document boundaries.",
        _PRETRAINING,
        "boolean",
        default=True,
    )


_MODEL = "Model and data"
_BATCH = "Batch"
_OPTIMIZER = "Optimizer"
_SCHEDULE = "Learning-rate schedule"
_LENGTH = "Length of training"
_CHECKPOINTS = "Checkpoints"
_SPEED = "Precision, memory and speed"
_LOGGING = "Logging (Weights & Biases)"


@attrs.define(kw_only=True)
class TrainingArgs:
    """Everything one training run needs; a run file's keys, one to one."""

    model_name_or_path: str = _field(
        "The model to train: a local Hugging Face model folder, or a hub name where the network "
        "allows.",
        _MODEL,
        "string",
        _not_empty,
    )
    data_path: str = _field(
        "Training data: a JSONL file of pre-tokenized samples (input_ids, labels), or of "
        "documents (input_ids) with [pretraining].",
        _MODEL,
        "string",
        _not_empty,
    )
    output_dir: str = _field(
        "Directory for the resolved run file, metrics.jsonl, checkpoints and HF exports.",
        _MODEL,
        "string",
        _not_empty,
    )
    trust_remote_code: bool = _field(
        "Run custom modeling code shipped with the model (Hugging Face trust_remote_code). "
        "Only for models you trust.",
        _MODEL,
        "boolean",
        default=False,
    )
    too_long_samples: str = _field(
        "Samples longer than max_tokens_per_gpu fit in no minibatch: 'drop' them with a "
        "warning that gives their count, or refuse the data with an 'error' naming each one.",
        _MODEL,
        "string",
        default="drop",
        choices=_fixed("drop", "error"),
    )

    batch_size: int = _field(
        "Samples per optimizer step, over all GPUs together (the global batch).",
        _BATCH,
        "integer",
        _greater_than(0),
    )
    max_tokens_per_gpu: int = _field(
        "Most tokens one GPU computes at once. Each step's batch is split into as many "
        "minibatches per GPU as needed (gradients are accumulated), balanced across GPUs.",
        _BATCH,
        "integer",
        _greater_than(0),
    )

    learning_rate: float = _field(
        "Peak learning rate of AdamW.", _OPTIMIZER, "float", _finite, _greater_than(0)
    )
    beta1: float = _field(
        "AdamW beta1 (decay of the gradient's running mean).",
        _OPTIMIZER,
        "float",
        _at_least(0),
        _below_one,
        default=0.9,
    )
    beta2: float = _field(
        "AdamW beta2 (decay of the squared gradient's running mean).",
        _OPTIMIZER,
        "float",
        _at_least(0),
        _below_one,
        default=0.95,
    )
    eps: float = _field(
        "AdamW epsilon (added to the denominator for numerical stability).",
        _OPTIMIZER,
        "float",
        _finite,
        _greater_than(0),
        default=1e-8,
    )
    weight_decay: float = _field(
        "AdamW decoupled weight decay.", _OPTIMIZER, "float", _finite, _at_least(0), default=0.0
    )
    max_grad_norm: float = _field(
        "Clip the global gradient norm (over all GPUs) to this value; 0 disables clipping.",
        _OPTIMIZER,
        "float",
        _finite,
        _at_least(0),
        default=1.0,
    )

    lr_scheduler: str = _field(
        "A schedule of transformers.get_scheduler. With training_mode = 'infinite' only those "
        "that need no total step count: constant, constant_with_warmup, inverse_sqrt, or "
        "warmup_stable_decay with lr_scheduler_kwargs.num_stable_steps.",
        _SCHEDULE,
        "string",
        _usable_scheduler,
        default="cosine",
        choices=_scheduler_names,
    )
    lr_scheduler_kwargs: dict = _field(
        "Extra arguments of the schedule, e.g. num_cycles = 1 for cosine_with_restarts or "
        "min_lr_rate = 0.1 for cosine_with_min_lr, as an inline table: { min_lr_rate = 0.1 }.",
        _SCHEDULE,
        "table",
        _string_keys,
        default=attrs.Factory(dict),
    )
    num_warmup_steps: int = _field(
        "Optimizer steps of learning-rate warmup.", _SCHEDULE, "integer", _at_least(0), default=0
    )

    training_mode: str = _field(
        "When training stops: 'epoch' after max_epochs passes over the data, 'step' after "
        "max_steps optimizer steps, 'token' after max_tokens loss-counted tokens, 'infinite' "
        "never (stop it yourself; checkpoints are written on SIGTERM).",
        _LENGTH,
        "string",
        default="epoch",
        choices=_fixed(*TRAINING_MODES),
    )
    max_epochs: int = _field(
        "Passes over the data (training_mode = 'epoch').",
        _LENGTH,
        "integer",
        _greater_than(0),
        default=1,
    )
    max_steps: int = _field(
        "Optimizer steps (training_mode = 'step'); 0 = not set.",
        _LENGTH,
        "integer",
        _at_least(0),
        default=0,
    )
    max_tokens: int = _field(
        "Loss-counted tokens (training_mode = 'token'); 0 = not set.",
        _LENGTH,
        "integer",
        _at_least(0),
        default=0,
    )
    seed: int = _field(
        "Seed of the data order and of every random number generator.",
        _LENGTH,
        "integer",
        _at_least(0),
        default=42,
    )

    min_samples_per_checkpoint: int | None = _field(
        "Export the model to output_dir/hf_format/samples_<N>/ each time at least this many "
        "more samples have been trained on. Not set = no periodic exports.",
        _CHECKPOINTS,
        "integer",
        _greater_than(0),
        default=None,
        optional=True,
    )
    checkpoint_at_epoch: bool = _field(
        "Export the model at the end of every epoch.", _CHECKPOINTS, "boolean", default=False
    )
    save_final_checkpoint: bool = _field(
        "Export the model when training ends.", _CHECKPOINTS, "boolean", default=True
    )
    save_dtype: str | None = _field(
        "Dtype of exported weights. Not set = the model's own dtype (torch_dtype of its config).",
        _CHECKPOINTS,
        "string",
        default=None,
        optional=True,
        choices=_fixed(*DTYPES),
    )

    train_dtype: str = _field(
        "Dtype of the trained (master) weights, their gradients and the optimizer state. "
        "On a GPU the forward and backward passes compute in bfloat16 (FSDP mixed precision).",
        _SPEED,
        "string",
        default="float32",
        choices=_fixed(*DTYPES),
    )
    use_liger_kernels: bool | None = _field(
        "Liger kernels: fused linear cross-entropy (logits are never materialised), RMSNorm, "
        "RoPE, SwiGLU where the architecture has them. Not set = on when CUDA and liger-kernel "
        "are available.",
        _SPEED,
        "boolean",
        default=None,
        optional=True,
    )
    attn_backend: str = _field(
        "Padding-free attention. 'auto' = flash_attn when installed, else torch_varlen "
        "(PyTorch's varlen attention) on CUDA, else sdpa applied per document.",
        _SPEED,
        "string",
        default="auto",
        choices=_fixed(*ATTN_BACKENDS),
    )
    activation_checkpointing: bool = _field(
        "Recompute each decoder block's activations during backward: much less memory, about "
        "a third more compute.",
        _SPEED,
        "boolean",
        default=False,
    )
    cpu_offload: bool = _field(
        "Keep the sharded weights, gradients and optimizer state in CPU memory (FSDP2 CPU "
        "offload): fits larger models, runs slower.",
        _SPEED,
        "boolean",
        default=False,
    )

    wandb_project: str | None = _field(
        "Weights & Biases project. Set = log every step to wandb too (needs the wandb extra).",
        _LOGGING,
        "string",
        _not_empty,
        default=None,
        optional=True,
    )
    wandb_run_name: str | None = _field(
        "Weights & Biases run name.", _LOGGING, "string", default=None, optional=True
    )
    wandb_entity: str | None = _field(
        "Weights & Biases entity (user or team).", _LOGGING, "string", default=None, optional=True
    )

    pretraining: PretrainingConfig | None = attrs.field(
        default=None,
        validator=lambda instance, attribute, value: _check_pretraining(value),
        metadata={"help": "Continued pretraining; see [pretraining] below.", "group": _PRETRAINING},
    )

    def __attrs_post_init__(self) -> None:
        problems = _cross_field_problems(self)
        if problems:
            raise _KeyedConfigError(problems)


def _check_pretraining(value: Any) -> None:
    if value is not None and not isinstance(value, PretrainingConfig):
        problem = f"expected a PretrainingConfig ([pretraining] table), got {_shown(value)}"
        raise _KeyedConfigError([("pretraining", problem)])


def _cross_field_problems(args: TrainingArgs) -> list[tuple[str, str]]:
    """Problems of key combinations, each with the key to point at."""
    problems = []
    limits = {"step": "max_steps", "token": "max_tokens"}
    for mode, key in limits.items():
        if args.training_mode == mode and getattr(args, key) == 0:
            problems.append(("training_mode", f"{mode!r} needs {key} > 0"))
        if args.training_mode != mode and getattr(args, key) != 0:
            problems.append(
                (key, f"applies only with training_mode = {mode!r} (it is {args.training_mode!r})")
            )
    if args.training_mode != "epoch" and args.max_epochs != 1:
        problems.append(
            (
                "max_epochs",
                f"applies only with training_mode = 'epoch' (it is {args.training_mode!r})",
            )
        )
    problems += _scheduler_problems(args)
    if args.pretraining is not None and args.pretraining.block_size > args.max_tokens_per_gpu:
        problems.append(
            (
                "pretraining.block_size",
                f"{args.pretraining.block_size} is more than max_tokens_per_gpu = "
                f"{args.max_tokens_per_gpu}: a block would fit in no minibatch",
            )
        )
    for key in ("wandb_run_name", "wandb_entity"):
        if getattr(args, key) is not None and args.wandb_project is None:
            problems.append((key, "has no effect without wandb_project"))
    return problems


def _scheduler_problems(args: TrainingArgs) -> list[tuple[str, str]]:
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


# ---------------------------------------------------------------------------------------------
# Dicts and run files -> TrainingArgs


def _fields(cls: type) -> dict[str, attrs.Attribute]:
    return {field.name: field for field in attrs.fields(cls)}


def _first_sentence(text: str) -> str:
    sentence = text.split(". ")[0].rstrip(".")
    return sentence if sentence[:2].isupper() else sentence[0].lower() + sentence[1:]


def _unknown_key(key: str, prefix: str, known: Iterable[str]) -> str:
    if not prefix and key in _fields(PretrainingConfig):
        return f"unknown key {key!r}: it belongs in the [pretraining] table (pretraining.{key})"
    near = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    hint = f"; did you mean {prefix + near[0]!r}?" if near else "; `mt run --help` lists every key"
    return f"unknown key {prefix + key!r}{hint}"


class _Problems:
    """Problems found so far, each placed by ``where(dotted_key)`` (``path:line`` or a name)."""

    def __init__(self, where: Callable[[str], str]) -> None:
        self.where = where
        self.lines: list[str] = []

    def add(self, key: str, message: str) -> None:
        self.lines.append(f"{self.where(key)}: {message}")


def _check_table(
    cls: type, data: Mapping[str, Any], prefix: str, problems: _Problems
) -> dict[str, Any]:
    """Per-key checks of one table: unknown, missing, wrongly typed or out-of-range keys.
    Returns the values to build ``cls`` from; a key set to None is left out (not set)."""
    fields = _fields(cls)
    values = {}
    for key, value in data.items():
        dotted = prefix + str(key)
        field = fields.get(key)
        if field is None:
            problems.add(dotted, _unknown_key(str(key), prefix, fields))
        elif value is None:
            continue
        elif field.name == "pretraining":
            values[key] = _pretraining(value, problems)
        else:
            problem = field.validator.problem(value)
            if problem:
                problems.add(dotted, f"{dotted}: {problem}")
            else:
                values[key] = value
    for name, field in fields.items():
        if field.default is attrs.NOTHING and data.get(name) is None:
            what = _first_sentence(field.metadata["help"])
            problems.add(prefix + name, f"missing required key {prefix + name!r}: {what}")
    return values


def _pretraining(value: Any, problems: _Problems) -> PretrainingConfig | None:
    if isinstance(value, PretrainingConfig):
        value = attrs.asdict(value)
    if not isinstance(value, dict):
        problems.add("pretraining", f"pretraining: expected a table, got {_shown(value)}")
        return None
    found = len(problems.lines)
    values = _check_table(PretrainingConfig, value, "pretraining.", problems)
    return PretrainingConfig(**values) if len(problems.lines) == found else None


def _build(data: Mapping[str, Any], where: Callable[[str], str]) -> TrainingArgs:
    problems = _Problems(where)
    values = _check_table(TrainingArgs, data, "", problems)
    if problems.lines:
        raise ConfigError(problems.lines)
    try:
        return TrainingArgs(**values)
    except _KeyedConfigError as error:
        for key, message in error.keyed:
            problems.add(key, f"{key}: {message}")
        raise ConfigError(problems.lines) from None


def args_from_dict(data: Mapping[str, Any], source: str = "<dict>") -> TrainingArgs:
    """TrainingArgs from a run file's keys as a dict (``[pretraining]`` as a nested dict), with
    every check of :func:`load_run_file`; ``source`` names the dict in messages. A key set to
    None is not set (its default applies), as when it is left out."""
    return _build(data, lambda key: source)


def load_run_file(
    path: str | os.PathLike, overrides: Mapping[str, Any] | None = None
) -> TrainingArgs:
    """Read a TOML run file, apply ``overrides`` and validate.

    Overrides use the file's key names (dashes may stand for underscores); a dotted name such as
    ``pretraining.block_size`` sets a key of a table, and None unsets a key. Every problem is
    raised as one :class:`ConfigError`, pointing at ``path:line`` or at the command line."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such run file") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text (byte {error.start})") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the run file ({error.strerror})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(_toml_syntax_error(path, text, error)) from None
    lines = _key_lines(text)
    overridden: set[str] = set()
    problems = []
    for name, value in (overrides or {}).items():
        dotted = name.replace("-", "_")
        problem = _set_dotted(data, dotted.split("."), value)
        if problem:
            problems.append(f"command line: {dotted}: {problem}")
        overridden.add(dotted)

    def where(key: str) -> str:
        parts = key.split(".")
        prefixes = [".".join(parts[:n]) for n in range(len(parts), 0, -1)]
        if any(prefix in overridden for prefix in prefixes):
            return "command line"
        line = next((lines[prefix] for prefix in prefixes if prefix in lines), None)
        return str(path) if line is None else f"{path}:{line}"

    try:
        args = _build(data, where)
    except ConfigError as error:
        raise ConfigError(problems + error.problems) from None
    if problems:
        raise ConfigError(problems)
    return args


def _set_dotted(data: dict, parts: list[str], value: Any) -> str | None:
    table = data
    for depth, part in enumerate(parts[:-1]):
        table = table.setdefault(part, {})
        if not isinstance(table, dict):
            return f"{'.'.join(parts[: depth + 1])} is not a table"
    if value is None:
        table.pop(parts[-1], None)
    else:
        table[parts[-1]] = value
    return None


def _toml_syntax_error(path: Path, text: str, error: Exception) -> str:
    message = str(error)
    at = re.search(r"\s*\(at line (\d+), column (\d+)\)$", message)
    if at:
        return f"{path}:{at[1]}: invalid TOML: {message[: at.start()]} (column {at[2]})"
    end = re.search(r"\s*\(at end of document\)$", message)
    if end:
        last_line = max(1, len(text.splitlines()))
        return (
            f"{path}:{last_line}: invalid TOML: {message[: end.start()]} (at the end of the file)"
        )
    return f"{path}: invalid TOML: {message}"


_PART = r"""(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')"""
_KEY_LINE = re.compile(rf"^\s*({_PART}(?:\s*\.\s*{_PART})*)\s*=")
_TABLE_LINE = re.compile(rf"^\s*\[\[?\s*({_PART}(?:\s*\.\s*{_PART})*)\s*\]")


def _split_key(key: str) -> tuple[str, ...]:
    return tuple(part.strip("\"'") for part in re.findall(_PART, key))


def _key_lines(text: str) -> dict[str, int]:
    """Line of each dotted key and table header of a TOML text (first occurrence), for
    messages; tomllib keeps no positions."""
    lines: dict[str, int] = {}
    table: tuple[str, ...] = ()
    in_multiline = False
    for number, line in enumerate(text.splitlines(), 1):
        # a line inside a multi-line string may look like `key = value` and is no key
        starts_inside = in_multiline
        in_multiline ^= (line.count('"""') + line.count("'''")) % 2 == 1
        if starts_inside:
            continue
        header = _TABLE_LINE.match(line)
        if header:
            table = _split_key(header[1])
            lines.setdefault(".".join(table), number)
            continue
        key = _KEY_LINE.match(line)
        if key:
            lines.setdefault(".".join(table + _split_key(key[1])), number)
    return lines


# ---------------------------------------------------------------------------------------------
# TrainingArgs -> dicts and run files


def args_to_dict(args: TrainingArgs) -> dict[str, Any]:
    """Every key of ``args`` (None where not set), ``pretraining`` as a nested dict or None."""
    return attrs.asdict(args, recurse=True)


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    """TOML text of a value: scalars, arrays and inline tables (what a run file holds)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        # repr is the shortest text that reads back to the same float; TOML spells the same
        # inf and nan, and needs a '.' or exponent to see a float
        text = repr(value)
        return text if any(c in text for c in ".enai") else text + ".0"
    if isinstance(value, str):
        # JSON's string escapes are TOML's too; TOML also wants DEL escaped, which JSON keeps raw
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = (f"{_toml_key(str(k))} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + ", ".join(items) + " }"
    raise TypeError(f"{value!r} ({type(value).__name__}) has no TOML form")


def _toml_table(cls: type, values: Mapping[str, Any]) -> list[str]:
    lines = []
    group = None
    for field in attrs.fields(cls):
        value = values[field.name]
        if value is None or field.name == "pretraining":
            continue
        if field.metadata["group"] != group and cls is TrainingArgs:
            group = field.metadata["group"]
            lines += ["", f"# {group}"]
        try:
            lines.append(f"{field.name} = {_toml_value(value)}")
        except TypeError as error:
            raise ConfigError(f"{field.name}: cannot be written to a run file: {error}") from None
    return lines


def render_run_file(args: TrainingArgs) -> str:
    """The resolved run file of ``args``: every key that is set, in ``--help`` order."""
    values = args_to_dict(args)
    lines = [
        "# Resolved run file written by mt: every key of the run, defaults filled in.",
        "# Keys that are not set are left out (TOML has no null). `mt run` reads it as it is.",
    ]
    lines += _toml_table(TrainingArgs, values)
    if values["pretraining"] is not None:
        lines += ["", "[pretraining]"] + _toml_table(PretrainingConfig, values["pretraining"])
    return "\n".join(lines) + "\n"


def write_run_file(args: TrainingArgs, path: str | os.PathLike) -> None:
    """Write the resolved run file atomically: a reader sees the old file or the whole new one."""
    path = Path(path)
    text = render_run_file(args)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


# ---------------------------------------------------------------------------------------------
# The key reference (`mt run --help`)


def _describe(field: attrs.Attribute, name: str) -> list[str]:
    rule: _Rule = field.validator
    if field.default is attrs.NOTHING:
        default = "required"
    elif field.default is None:
        default = "default: not set"
    elif isinstance(field.default, attrs.Factory):
        default = f"default {_toml_value(field.default.factory())}"
    else:
        default = f"default {_toml_value(field.default)}"
    lines = [f"  {name}  ({rule.kind}, {default})"]
    body = field.metadata["help"]
    if rule.choices is not None:
        body += " Choices: " + ", ".join(rule.choices()) + "."
    lines += textwrap.wrap(body, width=96, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return lines


def render_help() -> str:
    """Every run-file key with its type, default and help, grouped as in the resolved file."""
    lines = [
        "Run file keys (TOML). The command line overrides any of them by the same name:",
        "--key=value, or --pretraining.block_size=512 for a key of a table; --key=None unsets.",
    ]
    group = None
    for field in attrs.fields(TrainingArgs):
        if field.name == "pretraining":
            continue
        if field.metadata["group"] != group:
            group = field.metadata["group"]
            lines += ["", group]
        lines += _describe(field, field.name)
    lines += ["", _PRETRAINING]
    for field in attrs.fields(PretrainingConfig):
        lines += _describe(field, f"pretraining.{field.name}")
    return "\n".join(lines) + "\n"
