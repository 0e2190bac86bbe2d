"""The run-file key reference as Markdown, built from the config classes' fields (type, default,
help, choices), like ``mt run --help``: docs/run-file.md is this text, and a test fails when it
drifts.

Regenerate it with ``uv run python -m mt.reference_md docs/run-file.md``.

A README (or any Markdown file) can hold the same table between the lines ``<!-- run-file keys:
begin -->`` and ``<!-- run-file keys: end -->``: :func:`with_reference` puts the current table
there, and a test can compare a file with it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import attrs

from mt_core.config import PretrainingConfig, TrainingArgs
from mt_core.config.args import PRETRAINING_GROUP
from mt_core.config.toml_text import toml_value

__all__ = ["BEGIN", "END", "render_markdown", "with_reference"]

BEGIN = "<!-- run-file keys: begin -->"
END = "<!-- run-file keys: end -->"
HEADER = """\
# Run-file keys

Every key of a run file, generated from the config classes (`mt_core.config`): the same text as
`mt run --help`. Required keys have no default; `not set` means the key may be left out. Any key
can be overridden on the command line by the same name (`--key=value`,
`--pretraining.block_size=512`).
"""


def _default(field: attrs.Attribute) -> str:
    if field.default is attrs.NOTHING:
        return "**required**"
    if field.default is None:
        return "not set"
    value = field.default.factory() if isinstance(field.default, attrs.Factory) else field.default
    return f"`{toml_value(value)}`"


def _row(field: attrs.Attribute, name: str) -> str:
    rule = field.validator
    meaning = field.metadata["help"]
    if rule.choices is not None:
        meaning += " Choices: " + ", ".join(f"`{choice}`" for choice in rule.choices()) + "."
    meaning = meaning.replace("|", "\\|")
    return f"| `{name}` | {rule.kind} | {_default(field)} | {meaning} |"


def render_markdown() -> str:
    """The key tables, one per group, in the order of the resolved run file."""
    lines: list[str] = []
    group = None
    fields = [(f, f.name) for f in attrs.fields(TrainingArgs) if f.name != "pretraining"]
    fields += [(f, f"pretraining.{f.name}") for f in attrs.fields(PretrainingConfig)]
    for field, name in fields:
        section = PRETRAINING_GROUP if name.startswith("pretraining.") else field.metadata["group"]
        if section != group:
            group = section
            lines += [
                "",
                f"### {group}",
                "",
                "| key | type | default | meaning |",
                "|---|---|---|---|",
            ]
        lines.append(_row(field, name))
    return "\n".join(lines).lstrip("\n") + "\n"


def with_reference(text: str) -> str:
    """``text`` with the current tables between :data:`BEGIN` and :data:`END`."""
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return f"{text[:start]}\n{render_markdown()}{text[end:]}"


def page() -> str:
    """The whole of docs/run-file.md."""
    return f"{HEADER}\n{render_markdown()}"


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/run-file.md")
    if target.name == "run-file.md":
        target.write_text(page())
    else:
        target.write_text(with_reference(target.read_text()))
    print(f"wrote {target}")
