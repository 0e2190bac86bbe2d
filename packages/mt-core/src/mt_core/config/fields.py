"""How a config field is declared and checked: its TOML type, value checks and help metadata.

One :class:`Rule` per field is both its attrs validator (the Python API) and the per-key check of
a run file, so both give the same message. The errors a user can cause are :class:`ConfigError`.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs

from mt_core.config.toml_text import toml_value


class ConfigError(Exception):
    """A run configuration the user has to fix. ``problems`` holds one line per problem."""

    def __init__(self, problems: str | Iterable[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class KeyedConfigError(ConfigError):
    """Problems raised while building a config object, kept with the key each is about, so the
    run-file reader can point them at ``path:line``.

    ``inapplicable`` names the keys among them that are set where they do not apply, each with
    the keys that make it so: unsetting such a key solves its problem."""

    def __init__(
        self,
        keyed: list[tuple[str, str]],
        inapplicable: Mapping[str, tuple[str, ...]] | None = None,
    ) -> None:
        self.keyed = keyed
        self.inapplicable = dict(inapplicable or {})
        super().__init__(f"{key}: {message}" for key, message in keyed)


_KINDS: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    # bool is an int subclass in Python but never a number in a run file
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "table": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
}


@attrs.frozen
class Rule:
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
                f"expected {_article(self.kind)}, got {shown(value)}{_type_hint(self.kind, value)}"
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
            raise KeyedConfigError([(attribute.name, problem)])


def field(
    help: str,
    group: str,
    kind: str,
    *checks: Callable[[Any], str | None],
    default: Any = attrs.NOTHING,
    optional: bool = False,
    choices: Callable[[], tuple[str, ...]] | None = None,
) -> Any:
    """An attrs field checked by a :class:`Rule`; ``help`` and ``group`` feed ``mt run --help``
    and the sections of the resolved run file."""
    return attrs.field(
        default=default,
        validator=Rule(kind, checks, optional, choices),
        converter=_int_to_float if kind == "float" else None,
        metadata={"help": help, "group": group},
    )


def _int_to_float(value: Any) -> Any:
    # TOML and fire read `learning_rate = 1` as an int; the field holds a float either way, so
    # a file, its resolved copy and the Python API all compare equal.
    return float(value) if _KINDS["integer"](value) else value


def shown(value: Any) -> str:
    """A value as a message shows it: its TOML spelling and TOML type."""
    try:
        text = toml_value(value)
    except TypeError:
        text = repr(value)
    return f"{text} ({_article(_toml_type(value))})"


def _article(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def _toml_type(value: Any) -> str:
    for kind, test in _KINDS.items():
        if kind != "float" and test(value):
            return kind
    if isinstance(value, float):
        return "float"
    return "array" if isinstance(value, (list, tuple)) else type(value).__name__


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


# Value checks for `field(...)`: each returns what is wrong with a value of the right type, or None.


def greater_than(bound: float) -> Callable[[Any], str | None]:
    return lambda v: None if v > bound else f"must be > {bound}, got {v}"


def at_least(bound: float) -> Callable[[Any], str | None]:
    return lambda v: None if v >= bound else f"must be >= {bound}, got {v}"


def at_most(bound: float) -> Callable[[Any], str | None]:
    return lambda v: None if v <= bound else f"must be <= {bound}, got {v}"


def below_one(v: float) -> str | None:
    return None if v < 1 else f"must be < 1, got {v}"


def finite(v: float) -> str | None:
    return None if math.isfinite(v) else f"must be a finite number, got {v}"


def not_empty(v: str) -> str | None:
    return None if v.strip() else "must not be empty"


def import_paths(v: list) -> str | None:
    """Entries of the form "package.module:Name" (importable in every process)."""
    for item in v:
        if not isinstance(item, str) or item.count(":") != 1 or not all(item.split(":")):
            return f'entries must be import paths like "my_pkg.my_module:MyCallback", got {item!r}'
    return None


def string_keys(v: dict) -> str | None:
    bad = [key for key in v if not isinstance(key, str)]
    return f"keys must be strings, got {bad[0]!r}" if bad else None


def fixed(*names: str) -> Callable[[], tuple[str, ...]]:
    """The ``choices`` of a field whose choices are known up front."""
    return lambda: names
