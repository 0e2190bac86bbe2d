"""The shape of the code base: arrows point down only, no import circles, modules stay small.

Read from the sources (every import statement, also those inside functions, which only delay
an import and still make an arrow; ``TYPE_CHECKING`` blocks are left out: they never run).
The rules are shared/DESIGN.md's and docs/architecture.md's:

- packages: mt_packing <- mt_data <- mt_core <- mt; mt_osft and mt_fsdp stand alone below mt_core;
- inside mt_core, rooms in layers: ``errors`` and ``config`` at the bottom, ``model`` and
  ``optim`` above them (neither imports the other), ``plan`` above those, ``trainer`` above
  all, and the package's top level (``launch``, ``__init__``, ``__main__``) over everything;
- inside the app, no module imports one that imports it back;
- no module of the workspace over ~400 lines, except those listed in :data:`LONG` with why;
- every module in docs/architecture.md's index, with the first paragraph of its docstring
  (tools/module_map.py writes the index).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*ROOT.glob("packages/*/src/*"), *ROOT.glob("apps/*/src/*")])

# what each package may import of the workspace (shared/DESIGN.md, "Dependency rule")
PACKAGE_ARROWS = {
    "mt_packing": set(),
    "mt_data": {"mt_packing"},
    "mt_osft": set(),
    "mt_fsdp": set(),
    "mt_core": {"mt_data", "mt_fsdp", "mt_osft", "mt_packing"},
    "mt": {"mt_core", "mt_data", "mt_fsdp", "mt_osft", "mt_packing"},
}
# mt_core's rooms, lowest first; a module may import its own room and the rooms of lower layers.
# "top": the package's own modules (``__init__``, ``__main__``, ``launch``) over everything.
ROOM_LAYERS = {"errors": 0, "config": 0, "model": 1, "optim": 1, "plan": 2, "trainer": 3, "top": 4}
# modules allowed past MAX_LINES, and why
MAX_LINES = 420
LONG = {
    # one attrs class whose fields are the run file's keys, each with its help text: splitting
    # it would scatter the reference that `mt run --help` and docs/run-file.md print from it
    "mt_core/config/args.py",
}


def _module_name(path: Path, source: Path) -> str:
    parts = [source.name, *path.relative_to(source).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path, source): path for source in SOURCES for path in source.rglob("*.py")}


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, module: str, known: set[str]) -> set[str]:
    """The workspace modules ``module`` imports: ``from package import submodule`` is an arrow to
    the submodule only (Python runs the package's ``__init__`` first, as for any import of it,
    but the importer does not depend on what the ``__init__`` defines)."""
    found: set[str] = set()
    is_package = path.name == "__init__.py"

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join([*package, base] if base else package)
            submodules = {f"{base}.{alias.name}" for alias in node.names} & known
            found.update(submodules)
            if len(submodules) < len(node.names):  # names defined in ``base`` itself
                found.add(base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return {name for name in found if name in known and name != module}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(path, name, known) for name, path in modules.items()}


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ROOM_LAYERS else "top"


def test_packages_import_only_those_below_them(graph):
    wrong = [
        f"{module} imports {target}"
        for module, targets in graph.items()
        for target in targets
        if (top := target.split(".")[0]) != module.split(".")[0]
        and top not in PACKAGE_ARROWS[module.split(".")[0]]
    ]
    assert not wrong, wrong


def test_mt_core_rooms_import_only_their_own_layer_and_below(graph):
    wrong = []
    for module, targets in graph.items():
        if not module.startswith("mt_core"):
            continue
        room = _room(module)
        for target in targets:
            if not target.startswith("mt_core.") and target != "mt_core":
                continue
            other = _room(target)
            if other == room:
                continue
            if ROOM_LAYERS[other] >= ROOM_LAYERS[room]:
                wrong.append(f"{module} ({room}) imports {target} ({other})")
    assert not wrong, wrong


def test_no_import_circles(graph):
    """No module reaches itself through the imports of others (Tarjan's strongly connected
    components; a package's ``__init__`` importing its own submodules counts like any module)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    assert not circles, circles


def test_the_structure_checks_can_fail():
    """The circle and layer checks find what they are for, on a made-up graph."""
    made_up = {"mt.a": {"mt.b"}, "mt.b": {"mt.a"}, "mt_core.model.x": {"mt_core.plan.y"}}
    made_up["mt_core.plan.y"] = set()
    with pytest.raises(AssertionError, match=r"\['mt.a', 'mt.b'\]"):
        test_no_import_circles(made_up)
    with pytest.raises(AssertionError, match="mt_core.model.x \\(model\\) imports"):
        test_mt_core_rooms_import_only_their_own_layer_and_below(made_up)


def test_modules_stay_small():
    long = {
        f"{path.relative_to(source.parent)}": lines
        for source in SOURCES
        for path in source.rglob("*.py")
        if (lines := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert set(long) <= LONG, {name: n for name, n in long.items() if name not in LONG}


def test_every_room_of_mt_core_says_what_lives_there_and_what_it_may_import():
    core = ROOT / "packages/mt-core/src/mt_core"
    for room in (p for p in core.iterdir() if (p / "__init__.py").is_file()):
        doc = ast.get_docstring(ast.parse((room / "__init__.py").read_text())) or ""
        assert "May import" in doc, room.name
        assert room.name in ROOM_LAYERS, f"{room.name}: give the new room its layer here"


def test_the_module_index_of_the_architecture_page_is_current(load_tool):
    module_map = load_tool("tools/module_map.py")
    every = {name for name, path in _modules().items() if path.name != "__init__.py"}
    assert set(module_map.modules()) == every
    page = module_map.PAGE.read_text()
    assert page == module_map.with_index(page), (
        "docs/architecture.md's module index is out of date: uv run python tools/module_map.py"
    )


def test_a_new_module_needs_a_docstring_and_a_row(tmp_path, load_tool):
    """On a made-up workspace: a module gets its row from its docstring's first paragraph, in
    Markdown; one without a docstring is refused by name."""
    module_map = load_tool("tools/module_map.py")
    room = tmp_path / "packages/mt-x/src/mt_x/room"
    room.mkdir(parents=True)
    (room / "__init__.py").write_text('"""A room."""\n')
    (room / "job.py").write_text('"""Does ``one`` thing (:func:`f`) | well.\n\nMore."""\n')
    assert module_map.render(tmp_path).splitlines()[2:] == [
        "| `mt_x.room.job` | Does `one` thing (`f`) \\| well. |"
    ]
    (room / "silent.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="silent.py: no docstring"):
        module_map.render(tmp_path)
