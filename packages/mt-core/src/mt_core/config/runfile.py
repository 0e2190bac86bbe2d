"""Run files: TOML text <-> :class:`TrainingArgs`.

Reading checks every key of a file at once (unknown keys with the nearest valid one, types,
values) and places each problem at ``path:line`` or on the command line; checks across keys run
once those pass. Writing gives the resolved run file: every key that is set, in ``--help`` order,
written atomically.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs

from mt_core.config.args import PretrainingConfig, TrainingArgs
from mt_core.config.fields import ConfigError, KeyedConfigError, shown
from mt_core.config.toml_text import toml_value

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


# ---------------------------------------------------------------------------------------------
# Dicts and run files -> TrainingArgs


def _fields(cls: type) -> dict[str, attrs.Attribute]:
    return {field.name: field for field in attrs.fields(cls)}


def _first_sentence(text: str) -> str:
    # a help text's first sentence, to follow "missing required key ...: "; a leading acronym
    # such as "HF" keeps its case
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
    # a dict through the Python API may hold the PretrainingConfig itself, not its table
    if isinstance(value, PretrainingConfig):
        value = attrs.asdict(value)
    if not isinstance(value, dict):
        problems.add("pretraining", f"pretraining: expected a table, got {shown(value)}")
        return None
    found = len(problems.lines)
    values = _check_table(PretrainingConfig, value, "pretraining.", problems)
    return PretrainingConfig(**values) if len(problems.lines) == found else None


def _build(
    data: Mapping[str, Any], where: Callable[[str], str], overridden: frozenset[str] = frozenset()
) -> TrainingArgs:
    problems = _Problems(where)
    values = _check_table(TrainingArgs, data, "", problems)
    if problems.lines:
        raise ConfigError(problems.lines)
    try:
        return TrainingArgs(**values)
    except KeyedConfigError as error:
        for key, message in error.keyed:
            causes = error.inapplicable.get(key, ())
            if key not in overridden and any(cause in overridden for cause in causes):
                # an override made the file's key inapplicable: it can be unset there too
                message += f"; to clear the file's {key} from the command line: --{key}=None"
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
    problems = []
    for name, value in (overrides or {}).items():
        dotted = _override_key(name)
        problem = _set_dotted(data, dotted.split("."), value)
        if problem:
            problems.append(f"command line: {dotted}: {problem}")
    where = _locator(path, text, overrides)
    try:
        args = _build(data, where, _overridden(overrides))
    except ConfigError as error:
        raise ConfigError(problems + error.problems) from None
    if problems:
        raise ConfigError(problems)
    return args


def _override_key(name: str) -> str:
    dotted = name.replace("-", "_")
    # mini_trainer's flag: a flag set moves over unchanged
    return "pretraining.block_size" if dotted == "block_size" else dotted


def _overridden(overrides: Mapping[str, Any] | None) -> frozenset[str]:
    """The dotted keys ``overrides`` set or unset."""
    return frozenset(_override_key(name) for name in overrides or {})


def _locator(path: Path, text: str, overrides: Mapping[str, Any] | None) -> Callable[[str], str]:
    """``where(dotted_key)``: "command line" for an overridden key, else ``path:line``."""
    lines = _key_lines(text)
    overridden = _overridden(overrides)

    def where(key: str) -> str:
        parts = key.split(".")
        prefixes = [".".join(parts[:n]) for n in range(len(parts), 0, -1)]
        if any(prefix in overridden for prefix in prefixes):
            return "command line"
        line = next((lines[prefix] for prefix in prefixes if prefix in lines), None)
        return str(path) if line is None else f"{path}:{line}"

    return where


_KEY_PROBLEM = re.compile(r"^([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)?): ")


def place_problems(
    error: ConfigError, path: str | os.PathLike, overrides: Mapping[str, Any] | None = None
) -> ConfigError:
    """``error``, raised after the run file was read (by checks that need the model or the
    data, e.g. OSFT patterns that match no module), with each problem that starts with a key of
    the run file placed at ``path:line`` or on the command line, as reading places its own."""
    path = Path(path)
    where = _locator(path, path.read_text(encoding="utf-8"), overrides)
    known = set(_fields(TrainingArgs)) | {f"pretraining.{n}" for n in _fields(PretrainingConfig)}
    placed = []
    for problem in error.problems:
        key = _KEY_PROBLEM.match(problem)
        placed.append(f"{where(key[1])}: {problem}" if key and key[1] in known else problem)
    return ConfigError(placed)


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
            lines.append(f"{field.name} = {toml_value(value)}")
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
