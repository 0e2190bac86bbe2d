"""The ``mt`` command: ``mt run RUN.toml [--key=value ...]``, alone or under torchrun.

fire dispatches the commands and parses override values. Help is printed from the run-file
reference of :mod:`mt_core.config` instead of fire's, so it lists every key with its type, default
and meaning. Mistakes a user can make (run file, overrides, data) end as ``mt: error: ...`` lines
on stderr and exit status 2, without a traceback (a run that started and then stopped for a
stated reason, such as a NaN loss, exits 1); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import fire

from mt_core.config import ConfigError, load_run_file, render_help
from mt_core.errors import RunError
from mt_data import DataError

USAGE = """\
usage: mt run RUN.toml [--key=value ...]
       torchrun --nproc-per-node N --no-python mt run RUN.toml   (N processes, one per GPU)
"""

COMMANDS_HELP = """\
commands:
  run    train as the TOML run file says; --key=value overrides a key of the file
"""

USER_ERRORS = (ConfigError, DataError)


def run(run_file: str, **overrides: Any) -> None:
    """Train as RUN_FILE says; --key=value overrides its keys by the same names."""
    overrides = {key: _toml_literal(value) for key, value in overrides.items()}
    args = load_run_file(str(run_file), overrides)  # fire reads `mt run 2024` as a number
    from mt_core import train  # torch and the model stack load only once the config is good

    train(args)


COMMANDS = {"run": run}


def _toml_literal(value: Any) -> Any:
    # fire reads `--key=True` as a boolean but `--key=true` as a string; a run file spells
    # booleans `true`/`false`, so the command line accepts that spelling too
    if isinstance(value, str) and value in ("true", "false"):
        return value == "true"
    if isinstance(value, dict):
        return {key: _toml_literal(item) for key, item in value.items()}
    return value


def _help_text(command: str | None) -> str:
    if command is None:
        return f"{USAGE}\n{COMMANDS_HELP}\n{render_help()}"
    return f"{USAGE}\n{render_help()}"


def _fail(message: str, usage: bool = False, status: int = 2) -> NoReturn:
    for line in message.splitlines():
        print(f"mt: error: {line}", file=sys.stderr)
    if usage:
        print(USAGE, end="", file=sys.stderr)
    sys.exit(status)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``mt`` script and of ``python -m mt``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # fire's own flags (--trace, --verbose, ...) come after a lone `--`; ours before it
    ours = argv[: argv.index("--")] if "--" in argv else argv
    command = ours[0] if ours and not ours[0].startswith("-") else None
    if not ours or "-h" in ours or "--help" in ours:
        print(_help_text(command), end="")
        return
    if command not in COMMANDS:
        near = difflib.get_close_matches(command or "", COMMANDS, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        _fail(f"unknown command {ours[0]!r}{hint}", usage=True)
    if len(ours) == 1:
        _fail(f"{command} needs a run file", usage=True)
    try:
        fire.Fire(COMMANDS, command=argv, name="mt")
    except USER_ERRORS as error:
        _fail(str(error))
    except RunError as error:  # the run started and stopped for a stated reason
        _fail(str(error), status=1)
