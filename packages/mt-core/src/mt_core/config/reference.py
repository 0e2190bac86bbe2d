"""The key reference that ``mt run --help`` prints, built from the fields of the config classes
(their types, defaults, help and choices), so it cannot drift from what the reader accepts."""

from __future__ import annotations

import textwrap

import attrs

from mt_core.config.args import PRETRAINING_GROUP, PretrainingConfig, TrainingArgs
from mt_core.config.fields import Rule
from mt_core.config.toml_text import toml_value


def _describe(field: attrs.Attribute, name: str) -> list[str]:
    rule: Rule = field.validator
    if field.default is attrs.NOTHING:
        default = "required"
    elif field.default is None:
        default = "default: not set"
    elif isinstance(field.default, attrs.Factory):
        default = f"default {toml_value(field.default.factory())}"
    else:
        default = f"default {toml_value(field.default)}"
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
    lines += ["", PRETRAINING_GROUP]
    for field in attrs.fields(PretrainingConfig):
        lines += _describe(field, f"pretraining.{field.name}")
    return "\n".join(lines) + "\n"
