"""The module index of docs/architecture.md, made from the modules' own docstrings.

Every module of the workspace's packages and app gets one row: its import name and the first
paragraph of its docstring, which is where each module says what its one job is. The index sits
between two markers in docs/architecture.md; ``tests/test_structure.py`` fails when it differs
from what this script makes, so a new, renamed or removed module shows up in the map the day it
lands, and a module without a docstring fails the suite until it says what it is for.

    uv run python tools/module_map.py          # rewrite the index in docs/architecture.md
    uv run python tools/module_map.py --check  # exit 1 and say so where it is out of date
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "architecture.md"
BEGIN = "<!-- module index: begin (tools/module_map.py writes it) -->"
END = "<!-- module index: end -->"

# reStructuredText roles and literals of the docstrings, in Markdown
_ROLE = re.compile(r":(?:mod|func|class|data|meth|attr|exc):`~?([^`]+)`")
_LITERAL = re.compile(r"``([^`]+)``")


def package_sources(root: Path = ROOT) -> list[Path]:
    """The import roots: each package's and the app's ``src/<name>`` folder."""
    return sorted([*root.glob("packages/*/src/*"), *root.glob("apps/*/src/*")])


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module by import name, packages' ``__init__`` files left out (a room's says what
    lives there, and architecture.md's rooms table says it again)."""
    found = {}
    for source in package_sources(root):
        for path in source.rglob("*.py"):
            if path.name != "__init__.py":
                parts = [source.name, *path.relative_to(source).with_suffix("").parts]
                found[".".join(parts)] = path
    return dict(sorted(found.items()))


def summary(path: Path, root: Path = ROOT) -> str:
    """The first paragraph of the module's docstring, on one line, in Markdown."""
    doc = ast.get_docstring(ast.parse(path.read_text()))
    if not doc:
        raise ValueError(f"{path.relative_to(root)}: no docstring; its first paragraph is the "
                         "module's line in docs/architecture.md: say what the module is for")  # fmt: skip
    first = " ".join(doc.split("\n\n")[0].split())
    return _LITERAL.sub(r"`\1`", _ROLE.sub(r"`\1`", first)).replace("|", "\\|")


def render(root: Path = ROOT) -> str:
    """The index: one table, a row per module, in import-name order."""
    rows = [f"| `{name}` | {summary(path, root)} |" for name, path in modules(root).items()]
    return "\n".join(["| module | what it is for |", "|---|---|", *rows]) + "\n"


def with_index(text: str, root: Path = ROOT) -> str:
    """``text`` with the current index between :data:`BEGIN` and :data:`END`."""
    if BEGIN not in text or END not in text:
        raise ValueError(f"{PAGE.relative_to(ROOT)} lost its module index markers {BEGIN!r} "
                         f"and {END!r}")  # fmt: skip
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[:start] + "\n" + render(root) + text[end:]


def main(argv: list[str]) -> int:
    text = PAGE.read_text()
    current = with_index(text)
    if "--check" in argv:
        if current != text:
            print(f"{PAGE.relative_to(ROOT)}: the module index is out of date: "
                  "uv run python tools/module_map.py")  # fmt: skip
            return 1
        return 0
    if current != text:
        PAGE.write_text(current)
        print(f"{PAGE.relative_to(ROOT)}: module index rewritten ({len(modules())} modules)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
