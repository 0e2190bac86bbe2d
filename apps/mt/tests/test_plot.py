"""mt plot: real PNGs of the stated size; a clear line without
matplotlib; bad run folders are one clear error."""

import importlib.util
import json
import math
import struct
import sys

import pytest

from mt import cli
from mt.errors import CommandError
from mt.plot import DPI, FIGURE_SIZE, plot, read_metrics

needs_matplotlib = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None,
    reason="matplotlib is the plot extra; the workspace's dev environment should install it",
)


def png_size(path) -> tuple[int, int]:
    """Width and height from a PNG's header, after checking it is one."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG"
    return struct.unpack(">II", data[16:24])


def metrics(folder, steps: int, scale: float, with_val: bool = True, cut_last: bool = False):
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(1, steps + 1):
        record = {
            "step": step, "loss": scale * (3 + math.exp(-step / 10)), "lr": 1e-4 * min(1, step / 5),
            "grad_norm": 1 / step, "tokens_per_s_per_gpu": 40000 + step, "mfu": 0.33,
            "peak_mem_gib": 30.0, "tokens_per_s": 80000,
        }  # fmt: skip
        if with_val and step % 10 == 0:
            record["val_loss"] = record["loss"] + 0.1
        lines.append(json.dumps(record))
    text = "\n".join(lines) + "\n"
    if cut_last:
        text += '{"step": 99, "loss'
    (folder / "metrics.jsonl").write_text(text)
    return folder


@needs_matplotlib
def test_two_runs_overlaid_in_one_png_of_the_stated_size(tmp_path, capsys):
    a = metrics(tmp_path / "a" / "run", 40, 1.0)
    b = metrics(tmp_path / "b" / "run", 25, 1.1, cut_last=True)
    out = tmp_path / "plot.png"
    plot(str(a), str(b), out=str(out))
    assert png_size(out) == (FIGURE_SIZE[0] * DPI, FIGURE_SIZE[1] * DPI)
    printed = capsys.readouterr().out
    assert "a/run: 40 steps, b/run: 25 steps" in printed
    assert "(1 unreadable line(s) skipped)" in printed
    assert not list(tmp_path.glob(".plot.png.tmp*"))


@needs_matplotlib
def test_cpu_runs_without_mfu_still_plot(tmp_path):
    run = tmp_path / "cpu"
    run.mkdir()
    line = {"step": 1, "loss": 2.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s_per_gpu": 10,
            "mfu": None, "peak_mem_gib": 1.0}  # fmt: skip
    (run / "metrics.jsonl").write_text(
        json.dumps(line) + "\n" + json.dumps({**line, "step": 2}) + "\n"
    )
    plot(str(run), out=str(tmp_path / "p.png"))
    assert png_size(tmp_path / "p.png") == (1500, 800)


def test_mistakes(tmp_path, capsys):
    with pytest.raises(CommandError, match="no metrics.jsonl"):
        plot(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    with pytest.raises(CommandError, match="has no step yet"):
        plot(str(tmp_path / "empty"))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["plot"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("mt: error: plot needs at least one run directory")


def test_without_matplotlib_the_error_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    run = metrics(tmp_path / "run", 3, 1.0)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    with pytest.raises(SystemExit) as exit_:
        cli.main(["plot", str(run), f"--out={tmp_path / 'x.png'}"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (
        "mt: error: plots need matplotlib, which is not installed: pip install 'mt[plot]' "
        "(or pip install matplotlib)\n"
    )
    assert not (tmp_path / "x.png").exists()


def test_read_metrics_takes_the_file_too(tmp_path):
    run = metrics(tmp_path / "run", 3, 1.0)
    records, unreadable = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3] and unreadable == 0
