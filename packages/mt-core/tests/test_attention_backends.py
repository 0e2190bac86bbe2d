"""Which attention backend ``resolve_attn_backend`` picks for the kernels installed (issue #17).

A backend is available only when the function it calls imports: flash-attn-4 installs
``flash_attn`` as a namespace package holding only ``flash_attn.cute``, and flash-attn 2 loads
CUDA libraries on import. Fake packages in a temporary folder stand in for both, and a CUDA
device is only named, never touched, so all of this runs on a CPU-only machine.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Iterator
from importlib.machinery import ModuleSpec
from pathlib import Path

import pytest
import torch

from mt_core.attention import resolve_attn_backend

CPU = torch.device("cpu")
CUDA = torch.device("cuda")

FUNCTION = "def flash_attn_varlen_func(*args, **kwargs):\n    raise AssertionError('not called')\n"


def _flash_attn_modules() -> list[str]:
    return [name for name in sys.modules if name.split(".")[0] == "flash_attn"]


@pytest.fixture(autouse=True)
def cuda_untouched(monkeypatch: pytest.MonkeyPatch) -> None:
    """Resolution reads only ``device.type``: the CUDA device of these tests is just a name on a
    CPU-only machine, and resolving must have no side effects, so any CUDA call fails a test."""

    def touched(*args: object, **kwargs: object) -> None:
        raise AssertionError("resolve_attn_backend touched CUDA")

    for name in ("is_available", "init", "_lazy_init", "current_device", "device_count"):
        monkeypatch.setattr(torch.cuda, name, touched)


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty folder first on ``sys.path`` for fake packages. A real ``flash_attn`` is hidden:
    its folder is dropped from ``sys.path`` (torch's submodules import through ``torch.__path__``,
    not ``sys.path``), and its modules leave ``sys.modules`` until the test ends."""
    for name in _flash_attn_modules():
        monkeypatch.delitem(sys.modules, name)
    others = [p for p in sys.path if not (Path(p) / "flash_attn").exists()]
    monkeypatch.setattr(sys, "path", [str(tmp_path), *others])
    importlib.invalidate_caches()  # the import system caches folder listings
    yield tmp_path
    # the fakes imported during the test; monkeypatch puts back any real ones after this
    for name in _flash_attn_modules():
        del sys.modules[name]
    importlib.invalidate_caches()


def _write(site: Path, files: dict[str, str]) -> None:
    for relative, text in files.items():
        path = site / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.fixture
def flash_attn_4(site: Path) -> None:
    """flash-attn-4's layout: ``flash_attn`` has no ``__init__.py``, its function is in ``cute``."""
    _write(site, {"flash_attn/cute/__init__.py": FUNCTION})


@pytest.fixture
def flash_attn_2(site: Path) -> None:
    _write(site, {"flash_attn/__init__.py": FUNCTION})


def test_auto_passes_over_flash_attn_4(flash_attn_4: None) -> None:
    assert resolve_attn_backend("auto", CUDA) == "torch_varlen"  # this torch has varlen_attn
    assert resolve_attn_backend("auto", CPU) == "sdpa"


def test_explicit_flash_attn_with_only_flash_attn_4(flash_attn_4: None) -> None:
    with pytest.raises(ValueError, match="flash_attn_varlen_func") as caught:
        resolve_attn_backend("flash_attn", CUDA)
    message = str(caught.value)
    assert "flash-attn 2" in message and "flash-attn-4" in message and "flash_attn.cute" in message
    assert "pip install flash-attn" in message and "torch_varlen" in message


def test_flash_attn_2_is_picked(flash_attn_2: None) -> None:
    assert resolve_attn_backend("auto", CUDA) == "flash_attn"
    assert resolve_attn_backend("flash_attn", CUDA) == "flash_attn"
    assert resolve_attn_backend("auto", CPU) == "sdpa"
    with pytest.raises(ValueError, match="CUDA"):
        resolve_attn_backend("flash_attn", CPU)


def test_no_flash_attn(site: Path) -> None:
    assert resolve_attn_backend("auto", CUDA) == "torch_varlen"
    with pytest.raises(ValueError, match="needs the flash-attn package.*pip install flash-attn"):
        resolve_attn_backend("flash_attn", CUDA)


@pytest.mark.parametrize(
    ("kind", "cause"),
    [
        ("ImportError", "flash_attn_2_cuda.so: undefined symbol: _ZN3c10"),
        ("OSError", "libcudart.so.12: cannot open shared object file"),
    ],
)
def test_flash_attn_2_that_fails_to_import(site: Path, kind: str, cause: str) -> None:
    """flash-attn 2 built for another torch or CUDA fails in its own ``__init__``: refused when
    resolved, with the cause, not at the first forward."""
    _write(site, {"flash_attn/__init__.py": f"raise {kind}({cause!r})\n"})
    assert resolve_attn_backend("auto", CUDA) == "torch_varlen"
    with pytest.raises(ValueError, match="failed to import") as caught:
        resolve_attn_backend("flash_attn", CUDA)
    assert f"{kind}: {cause}" in str(caught.value)


def test_torch_without_varlen_attn(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``torch.nn.attention.varlen`` without ``varlen_attn`` does not count as torch_varlen."""
    name = "torch.nn.attention.varlen"
    stub = types.ModuleType(name)
    stub.__spec__ = ModuleSpec(name, None)
    monkeypatch.setitem(sys.modules, name, stub)
    assert resolve_attn_backend("auto", CUDA) == "sdpa"
    with pytest.raises(ValueError, match="torch.nn.attention.varlen"):
        resolve_attn_backend("torch_varlen", CUDA)
