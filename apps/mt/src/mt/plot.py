"""``mt plot RUN_DIR... --out=plot.png``: a run's curves from its metrics.jsonl, runs overlaid.

matplotlib is an optional extra (``pip install 'mt[plot]'``); without it the command says so in
one line. The figure is drawn off-screen (the Agg backend) and written atomically.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from mt.errors import CommandError

__all__ = ["FIGURE_SIZE", "pyplot", "plot", "read_metrics", "save_figure"]

FIGURE_SIZE = (15, 8)  # inches, at DPI: a 1500 x 800 PNG
DPI = 100
# (metric key, panel title, log scale)
PANELS = (
    ("loss", "loss (validation dashed)", False),
    ("lr", "learning rate", False),
    ("grad_norm", "gradient norm (before clipping)", True),
    ("tokens_per_s_per_gpu", "tokens/s per GPU", False),
    ("mfu", "MFU (of the bf16 datasheet peak)", False),
    ("peak_mem_gib", "peak memory (GiB)", False),
)


def pyplot():
    """matplotlib.pyplot on the off-screen backend, or one clear error when it is missing."""
    try:
        import matplotlib
    except ImportError:
        raise CommandError(
            "plots need matplotlib, which is not installed: pip install 'mt[plot]' "
            "(or pip install matplotlib)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, target: Path) -> None:
    """Write ``figure`` as a PNG at ``target`` atomically (temporary name, then rename)."""
    plt = pyplot()
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}.png")
    try:
        figure.savefig(temporary, format="png", dpi=DPI)
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
        plt.close(figure)


def read_metrics(run_dir: str | Path) -> tuple[list[dict[str, Any]], int]:
    """The step lines of a run's metrics.jsonl (a folder, or the file itself), and how many
    lines were unreadable (a line cut off by a kill, for one)."""
    path = Path(run_dir)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise CommandError(f"{run_dir}: no metrics.jsonl (give a run's output_dir)")
    records, unreadable = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            unreadable += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        else:
            unreadable += 1
    return records, unreadable


def _labels(run_dirs: list[str]) -> list[str]:
    """Short, distinct names for the runs: the folder name, or more of the path when needed."""
    paths = [Path(d).resolve() for d in run_dirs]
    paths = [p.parent if p.name == "metrics.jsonl" else p for p in paths]
    depth = 1
    while True:
        names = ["/".join(p.parts[-depth:]) for p in paths]
        if len(set(names)) == len(names) or depth >= max(len(p.parts) for p in paths):
            return names
        depth += 1


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            steps.append(record["step"])
            values.append(float(value))
    return steps, values


def plot(*run_dirs: str, out: str = "plot.png", **unknown: Any) -> None:
    """Draw the curves of RUN_DIR(s) into one PNG (--out, default plot.png)."""
    for key in unknown:
        raise CommandError(f"plot: unknown option --{key}; the only option is --out=FILE.png")
    if not run_dirs:
        raise CommandError("plot needs at least one run directory")
    runs = [read_metrics(str(run_dir)) for run_dir in run_dirs]
    for run_dir, (records, _) in zip(run_dirs, runs, strict=True):
        if not records:
            raise CommandError(f"{run_dir}: metrics.jsonl has no step yet")
    plt = pyplot()
    figure, grid = plt.subplots(2, 3, figsize=FIGURE_SIZE, dpi=DPI)
    names = _labels([str(d) for d in run_dirs])
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axes, (key, title, log) in zip(grid.flat, PANELS, strict=True):
        drawn = False
        for index, ((records, _), name) in enumerate(zip(runs, names, strict=True)):
            colour = colours[index % len(colours)]
            steps, values = _series(records, key)
            if steps:
                axes.plot(steps, values, color=colour, label=name, linewidth=1.2)
                drawn = True
            if key == "loss":
                steps, values = _series(records, "val_loss")
                if steps:
                    axes.plot(steps, values, color=colour, linestyle="--", marker="o",
                              markersize=3, label=f"{name} (validation)")  # fmt: skip
        axes.set_title(title)
        axes.set_xlabel("step")
        axes.grid(True, alpha=0.3)
        if log and drawn:
            axes.set_yscale("log")
        if not drawn:
            axes.text(0.5, 0.5, "not recorded (e.g. on CPU)", ha="center", va="center",
                      transform=axes.transAxes, color="gray")  # fmt: skip
    grid.flat[0].legend(fontsize="small")
    figure.tight_layout()
    target = Path(str(out))
    save_figure(figure, target)
    skipped = sum(count for _, count in runs)
    note = f" ({skipped} unreadable line(s) skipped)" if skipped else ""
    steps = ", ".join(
        f"{name}: {len(records)} steps" for (records, _), name in zip(runs, names, strict=True)
    )
    print(f"wrote {target} ({steps}){note}")
