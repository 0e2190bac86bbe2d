"""mt-packing and mt-data stand without torch: they import without it, and mt-packing installs,
builds and passes its own tests on its own.

The venv and build tests need ``uv`` (CI has it; they are skipped, with the reason, without it)
and network access to PyPI for numpy, numba, pytest, hypothesis and hatchling (uv caches them).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKING = ROOT / "packages" / "mt-packing"

# `uv run` names its own executable in $UV (found even when uv is not on PATH, as when .ci/run
# installed it with pip into a folder off PATH); otherwise look on PATH.
UV = os.environ.get("UV") if shutil.which(os.environ.get("UV", "")) else shutil.which("uv")
needs_uv = pytest.mark.skipif(UV is None, reason="uv is not on PATH (nor named by $UV)")

# Forbids torch and transformers for good (a meta-path finder that refuses them and records every
# attempt, so that even an import guarded by try/except is caught), then uses both packages the
# way a trainer does: pack a batch, build a store, sample, collate.
NO_TORCH_CHILD = r"""
import importlib.abc
import json
import sys
import tempfile
from pathlib import Path

FORBIDDEN = ("torch", "transformers")
attempts = []


class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in FORBIDDEN:
            attempts.append(name)
            raise ImportError(f"{name} is made unavailable by this test")
        return None


preloaded = sorted(n for n in sys.modules if n.split(".")[0] in FORBIDDEN)  # by site / .pth
sys.meta_path.insert(0, Refuse())

import numpy as np
import mt_packing
import mt_data

plan = mt_packing.pack_minibatches([5, 3, 8, 1, 2, 7], 10, 2)
with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "d.jsonl"
    rows = [{"input_ids": list(range(1, n)), "labels": list(range(1, n))} for n in range(3, 7)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    store = mt_data.open_token_store(path, cache_dir=Path(tmp) / "cache")
    dataset = mt_data.SampleDataset(store, max_tokens=8)
    loader = mt_data.StepLoader(dataset, mt_data.InfiniteSampler(len(dataset), 3, seed=0), 8, 2, 1)
    step = next(iter(loader))
    assert step.num_samples == 3
    del loader, dataset, store

loaded = sorted({n.split(".")[0] for n in sys.modules if n.split(".")[0] in FORBIDDEN})
print("RESULT " + json.dumps({"preloaded": preloaded, "attempts": attempts, "loaded": loaded}))
"""


def test_packing_and_data_import_and_work_without_torch():
    done = subprocess.run(
        [sys.executable, "-c", NO_TORCH_CHILD],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    result = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(result) == 1, done.stdout
    found = json.loads(result[0][len("RESULT ") :])
    assert found == {"preloaded": [], "attempts": [], "loaded": []}, found


def _clean_env() -> dict[str, str]:
    """The environment without the workspace's virtualenv (uv run sets it) or import paths."""
    drop = {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "UV_PROJECT_ENVIRONMENT", "CONDA_PREFIX"}
    return {k: v for k, v in os.environ.items() if k not in drop}


def _run(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    done = subprocess.run(
        args, cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"{args} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done


@needs_uv
@pytest.mark.slow(50)
def test_mt_packing_installs_alone_and_passes_its_own_tests(tmp_path):
    venv = tmp_path / "venv"
    # The same interpreter as this test run: nothing to download, and the same Python version.
    _run([UV, "venv", "--quiet", "--python", sys.executable, str(venv)], cwd=tmp_path)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    _run(
        [UV, "pip", "install", "--quiet", "--python", str(python), str(PACKING), "pytest",
         "hypothesis"],
        cwd=tmp_path,
        timeout=900,
    )  # fmt: skip

    # Installed into the venv (not found in the source tree), and torch is not there.
    probe = _run(
        [str(python), "-c",
         "import importlib.util, mt_packing; print(mt_packing.__file__); "
         "print(importlib.util.find_spec('torch') is None)"],
        cwd=tmp_path,
    ).stdout.split()  # fmt: skip
    assert Path(probe[0]).resolve().is_relative_to(venv.resolve()), probe[0]
    assert probe[1] == "True", "torch is installed in the mt-packing venv"

    # The package's own tests, copied out of the workspace: no workspace config or conftest.
    tests = tmp_path / "mt_packing_tests"
    shutil.copytree(PACKING / "tests", tests, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    done = _run(
        [str(python), "-m", "pytest", str(tests), "-q", "-p", "no:cacheprovider",
         "--import-mode=importlib", "-c", str(tmp_path / "pytest.ini"), "--rootdir",
         str(tmp_path)],
        cwd=tmp_path,
    )  # fmt: skip
    assert " passed" in done.stdout and "skipped" not in done.stdout, done.stdout


@needs_uv
def test_uv_build_makes_a_mt_packing_wheel(tmp_path):
    out = tmp_path / "dist"
    _run([UV, "build", "--quiet", "--package", "mt-packing", "--wheel", "--out-dir", str(out)],
         cwd=ROOT)  # fmt: skip
    wheels = list(out.glob("mt_packing-*.whl"))
    assert len(wheels) == 1, sorted(p.name for p in out.iterdir())
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "mt_packing/__init__.py" in names and "mt_packing/lpt.py" in names, names
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    requires = [
        line
        for line in zipfile.ZipFile(wheels[0]).read(metadata).decode().splitlines()
        if line.startswith("Requires-Dist:")
    ]
    assert requires and not any("torch" in line for line in requires), requires
