"""How the suite is spread over pytest-xdist's workers (``--dist loadgroup``, pyproject.toml).

Two rules, both read from the tests' marks:

- ``@pytest.mark.xdist_group(name)``: the tests that read one expensive module-scoped artefact (a
  2-rank training made once) run on one worker, so it is made once. xdist's own loadgroup finds
  the group through a suffix it writes into each test's node id, which pytest 9.2's structured
  node ids silently drop (pytest-dev/pytest-xdist#1386): every group was spread over the workers
  and its runs made on each. Here the workers tell the scheduler the groups instead.
- ``@pytest.mark.slow(seconds)``: about how long a test takes with both cores of a 2-core machine
  busy (rough: only the order matters; a test of a group counts what it makes first). A group
  weighs the sum of its tests. Work starts heaviest first (longest processing time first): the
  long end-to-end runs overlap each other and the quick tests fill the workers' last minutes,
  instead of one long test starting last while the other worker idles.

Without xdist (``-p no:xdist``, ``-n 0``) nothing here changes the order.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

GROUPS_KEY = "mt_xdist_groups"  # workerinput: the file where the workers write the groups


def _group(item: pytest.Item) -> str | None:
    """The item's xdist group, named as xdist names it (several marks: their names joined)."""
    names = {str(m.args[0] if m.args else m.kwargs.get("name", "default"))
             for m in item.iter_markers("xdist_group")}  # fmt: skip
    return "_".join(sorted(names)) or None


def _seconds(item: pytest.Item) -> float:
    mark = item.get_closest_marker("slow")
    if mark is None:
        return 0.0
    seconds = mark.args[0] if mark.args else mark.kwargs.get("seconds")
    if seconds is None:
        raise pytest.UsageError(f"{item.nodeid}: the slow mark takes its seconds: slow(30)")
    return float(seconds)


@pytest.hookimpl(trylast=True)  # after xdist's own hook: the node ids are final
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    workerinput = getattr(config, "workerinput", None)
    if workerinput is None:  # the controller, or a run without xdist: the collection order
        return
    units = {item.nodeid: _group(item) or item.nodeid for item in items}
    weight: dict[str, float] = {}
    for item in items:
        weight[units[item.nodeid]] = weight.get(units[item.nodeid], 0.0) + _seconds(item)
    # stable: equal weights (the unmarked tests) keep the collection order; each worker sorts
    # the same collection the same way, as xdist requires
    items.sort(key=lambda item: -weight[units[item.nodeid]])
    if GROUPS_KEY in workerinput:
        path = Path(workerinput[GROUPS_KEY])
        grouped = {nodeid: unit for nodeid, unit in units.items() if unit != nodeid}
        mine = path.with_name(f"{path.name}.{workerinput['workerid']}")
        mine.write_text(json.dumps(grouped))
        os.replace(mine, path)  # every worker writes the same text: any one will do


def _groups_file(config: pytest.Config) -> Path:
    """Where the controller's workers write the groups (a folder of its own, made at first use)."""
    if not hasattr(config, "_mt_groups_dir"):
        config._mt_groups_dir = tempfile.mkdtemp(prefix="mt-xdist-groups-")
    return Path(config._mt_groups_dir, "groups.json")


def pytest_unconfigure(config: pytest.Config) -> None:
    folder = getattr(config, "_mt_groups_dir", None)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:
    node.workerinput[GROUPS_KEY] = str(_groups_file(node.config))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        """loadgroup with the groups the workers wrote, in the workers' (sorted) order."""

        groups: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.groups is None:  # all workers have collected: the file is written
                self.groups = json.loads(_groups_file(config).read_text())
            return self.groups.get(nodeid, nodeid)

    config.option.loadscopereorder = False  # keep the heaviest-first order of the collection
    return GroupScheduling(config, log)
