"""The numba core is cached on disk: a second process loads it instead of compiling it again.

Two fresh interpreters share one empty ``NUMBA_CACHE_DIR``. The first must compile (a cache
miss) and leave index/data files behind; the second must load every compiled function from them
(a cache hit, no miss). A packer whose ``@njit`` lost ``cache=True``, or whose cached code cannot
be reused (e.g. a function numba refuses to cache), fails here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# Packs a batch (so the core compiles or loads), then reports, for every numba dispatcher of
# mt_packing.lpt that was used, the signatures it loaded from the cache and those it compiled.
CHILD = r"""
import json
import numba.core.registry
import numpy as np
import mt_packing.lpt as lpt
from mt_packing import pack_minibatches

plan = pack_minibatches(np.array([5, 3, 8, 1, 2, 7]), 10, 2)
assert sorted(np.concatenate([mb for rank in plan for mb in rank]).tolist()) == list(range(6))
stats = {}
for name, obj in vars(lpt).items():
    if isinstance(obj, numba.core.registry.CPUDispatcher) and obj.signatures:
        s = obj.stats
        stats[name] = {
            "hits": sum(s.cache_hits.values()),
            "misses": sum(s.cache_misses.values()),
            "signatures": len(obj.signatures),
        }
print("STATS " + json.dumps(stats))
"""


def run_child(cache_dir: Path) -> dict[str, dict[str, int]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    env["NUMBA_CACHE_DIR"] = str(cache_dir)
    done = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("STATS ")]
    assert len(lines) == 1, done.stdout
    return json.loads(lines[0][len("STATS ") :])


def test_second_process_loads_the_packer_from_the_disk_cache(tmp_path):
    cache = tmp_path / "numba_cache"

    first = run_child(cache)
    assert "_lpt_plan" in first, first
    for name, s in first.items():
        assert s["misses"] >= 1 and s["hits"] == 0, (name, s)  # an empty cache: compiled
    index_files = sorted(p.name for p in cache.rglob("*.nbi"))
    data_files = sorted(p.name for p in cache.rglob("*.nbc"))
    assert any("_lpt_plan" in name for name in index_files), index_files
    assert data_files, "the cache holds no compiled code"

    second = run_child(cache)
    # The entry point comes from the cache with its callees linked in, so they are not even
    # looked up; any dispatcher that is must be a hit too.
    assert "_lpt_plan" in second and second.keys() <= first.keys(), (first, second)
    for name, s in second.items():
        # every signature came from the cache; nothing was compiled again
        assert s["hits"] == s["signatures"] >= 1 and s["misses"] == 0, (name, s)
