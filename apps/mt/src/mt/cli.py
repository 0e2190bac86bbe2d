"""The ``mt`` command: ``mt run RUN.toml [--key=value ...]``, alone or under torchrun, and the
tools around a run: ``mt check``, ``mt data prepare|inspect``, ``mt plot``, ``mt export``.

fire dispatches the commands and parses option values. Help is printed from our own texts
(``mt run --help`` from the run-file reference of :mod:`mt_core.config`, so it lists every key
with its type, default and meaning) instead of fire's. Mistakes a user can make (run file,
overrides, data, options) end as ``mt: error: ...`` lines on stderr and exit status 2, without a
traceback; a run that started and then stopped for a stated reason, such as a NaN loss, exits 1,
and so does ``mt check`` when the run does not fit. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import fire

from mt.check import check
from mt.data_inspect import inspect
from mt.errors import CommandError, Verdict
from mt.export import export
from mt.help_text import COMMAND_HELP, COMMANDS_HELP, OTHER_USAGE, USAGE, usage_of
from mt.plot import plot
from mt.prepare import prepare
from mt_core.config import ConfigError, load_run_file, place_problems, render_help
from mt_core.errors import PeerLostError, RunError, report_error
from mt_data import DataError

__all__ = ["COMMANDS", "USAGE", "main"]

USER_ERRORS = (ConfigError, DataError, CommandError)


def run(run_file: str, **overrides: Any) -> None:
    """Train as RUN_FILE says; --key=value overrides its keys by the same names."""
    overrides = {key: _toml_literal(value) for key, value in overrides.items()}
    args = load_run_file(str(run_file), overrides)  # fire reads `mt run 2024` as a number
    from mt_core import train  # torch and the model stack load only once the config is good

    try:
        train(args)
    except ConfigError as error:  # found with the model or data: placed in the run file
        raise place_problems(error, run_file, overrides) from None
    from mt_fsdp import exit_rank

    exit_rank(0)  # a finished gloo rank leaves before teardown can abort it


def _check(run_file: str, *extra: Any, **options: Any) -> None:
    _no_extra("check", extra)
    own = {"nproc_per_node", "nnodes", "gpu", "mfu", "batches"}
    options = {key.replace("-", "_"): value for key, value in options.items()}
    for key in options:  # a near miss of check's own options, before the run-file keys' check
        near = difflib.get_close_matches(key, own, n=1, cutoff=0.75)
        if key not in own and near:
            raise CommandError(f"check: unknown option --{key}; did you mean --{near[0]}?")
    overrides = {k: _toml_literal(v) for k, v in options.items() if k not in own}
    try:
        check(str(run_file), **{k: v for k, v in options.items() if k in own}, **overrides)
    except ConfigError as error:  # found with the model, data or GPU: placed as mt run does
        if not Path(run_file).is_file():  # (reading it failed: nothing to place them in)
            raise
        raise place_problems(error, run_file, overrides) from None


def _no_extra(command: str, extra: tuple) -> None:
    if extra:
        shown = " ".join(str(item) for item in extra)
        raise CommandError(f"{command}: unexpected argument(s) {shown}; see mt {command} --help")


COMMANDS: dict[str, Any] = {
    "run": run,
    "check": _check,
    "data": {"prepare": prepare, "inspect": inspect},
    "plot": plot,
    "export": export,
}
# positional arguments each command needs at least (what the usage error names)
NEEDS = {
    "run": "a run file",
    "check": "a run file",
    "data prepare": "an input JSONL file",
    "data inspect": "a JSONL file",
    "plot": "at least one run directory",
    "export": "a checkpoint folder",
}


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
        return f"{USAGE}{OTHER_USAGE}\n{COMMANDS_HELP}\n{render_help()}"
    if command == "run":
        return f"{USAGE}\n{render_help()}"
    return COMMAND_HELP[command]


def _fail(message: str, usage: str | None = None, status: int = 2) -> NoReturn:
    if report_error(message) and usage:  # under torchrun: once for all ranks
        print(usage, end="", file=sys.stderr)
    sys.exit(status)


def _command_of(ours: list[str]) -> str | None:
    """The command named by the arguments: 'run', 'data prepare', ... (None: no command)."""
    words = [word for word in ours if not word.startswith("-")][:2]
    if not words:
        return None
    if words[0] == "data":
        if len(words) == 2 and words[1] in COMMANDS["data"]:
            return f"data {words[1]}"
        return "data"
    return words[0]


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``mt`` script and of ``python -m mt``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # fire's own flags (--trace, --verbose, ...) come after a lone `--`; ours before it
    ours = argv[: argv.index("--")] if "--" in argv else argv
    command = _command_of(ours) if ours and not ours[0].startswith("-") else None
    if not ours or "-h" in ours or "--help" in ours:
        print(_help_text(command if command in COMMAND_HELP or command == "run" else None), end="")
        return
    if command is None or command.split()[0] not in COMMANDS:
        near = difflib.get_close_matches(ours[0], COMMANDS, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        _fail(f"unknown command {ours[0]!r}{hint}", usage=USAGE + OTHER_USAGE)
    if command == "data":
        words = [word for word in ours[1:] if not word.startswith("-")]
        if not words:
            _fail("data needs a subcommand: prepare or inspect", usage=usage_of("data"))
        near = difflib.get_close_matches(words[0], COMMANDS["data"], n=1)
        hint = f"; did you mean 'data {near[0]}'?" if near else ""
        _fail(f"unknown data subcommand {words[0]!r}{hint}", usage=usage_of("data"))
    positionals = [word for word in ours if not word.startswith("-")]
    if len(positionals) <= len(command.split()):
        _fail(f"{command} needs {NEEDS[command]}", usage=usage_of(command))
    try:
        fire.Fire(COMMANDS, command=argv, name="mt")
    except USER_ERRORS as error:
        _fail(str(error))
    except PeerLostError:  # other ranks ended: one rank has said so for the whole run
        from mt_fsdp import exit_rank

        exit_rank(1)  # at once: the teardown of a broken process group can take seconds
        sys.exit(1)
    except RunError as error:  # the run started and stopped for a stated reason
        _fail(str(error), status=1)
    except Verdict as verdict:  # the command's answer is its status; it printed its report
        sys.exit(verdict.status)
