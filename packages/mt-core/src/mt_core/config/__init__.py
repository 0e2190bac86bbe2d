"""The run configuration: attrs classes, the TOML run-file reader and writer, the key reference.

Keys are named like mini_trainer's ``TrainingArgs`` fields, so its users move their flags over one
to one. Each field carries its type and value checks (its attrs validator) and its help text and
help group (its metadata): validation, ``mt run --help`` and the docs all come from here.

Errors a user can make are :class:`ConfigError` with one line per problem, each naming the key
and, for run files, ``path:line``. Every problem of a file is reported at once where the checks
can run independently (unknown keys, types, values); checks across keys run once those pass.

Modules: ``fields`` (how a field is declared and checked, ConfigError), ``args`` (the classes),
``schedulers`` (checks of the learning-rate schedule), ``runfile`` (reading and writing run
files), ``reference`` (the ``--help`` text), ``toml_text`` (TOML spelling of values).

May import: attrs, tomllib/tomli and the standard library; no torch (a run file's mistakes are
reported before the model stack loads), nothing else of mt_core.
"""

from mt_core.config.args import (
    ATTN_BACKENDS,
    DTYPES,
    FLOAT8_RECIPES,
    OPTIMIZER_STATE_DTYPES,
    TRAINING_MODES,
    PretrainingConfig,
    TrainingArgs,
)
from mt_core.config.fields import ConfigError
from mt_core.config.reference import render_help
from mt_core.config.runfile import (
    args_from_dict,
    args_to_dict,
    load_run_file,
    place_problems,
    render_run_file,
    write_run_file,
)

__all__ = [
    "ATTN_BACKENDS",
    "DTYPES",
    "FLOAT8_RECIPES",
    "OPTIMIZER_STATE_DTYPES",
    "TRAINING_MODES",
    "ConfigError",
    "PretrainingConfig",
    "TrainingArgs",
    "args_from_dict",
    "args_to_dict",
    "load_run_file",
    "place_problems",
    "render_help",
    "render_run_file",
    "write_run_file",
]
