"""``mt data inspect DATA.jsonl``: what a token file holds, validated as a run would read it."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from mt.errors import CommandError

__all__ = ["inspect", "length_summary"]

PERCENTILES = (50, 90, 99)


def inspect(
    data_path: str, max_tokens_per_gpu: int | None = None, png: str | None = None, **unknown: Any
) -> None:
    """Print samples, tokens, loss share, length percentiles and, with --max_tokens_per_gpu, the
    samples over it; --png writes a length histogram."""
    for key in unknown:
        raise CommandError(
            f"data inspect: unknown option --{key}; the options are --max_tokens_per_gpu and --png"
        )
    path = Path(str(data_path))
    if not path.is_file():
        raise CommandError(f"{path}: no such file")
    limit = max_tokens_per_gpu
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise CommandError(f"--max_tokens_per_gpu: expected a positive integer, got {limit!r}")
    if png is not None:
        from mt.plot import pyplot

        pyplot()  # a missing matplotlib is said before the data is read
    from mt_data import open_token_store

    with tempfile.TemporaryDirectory(prefix="mt-inspect-") as cache:
        store = open_token_store(path, cache_dir=cache, require_labels=_has_labels(path))
        lengths = np.array(store.lengths)
        loss = None if store.loss_counts is None else int(np.sum(store.loss_counts))
    print(length_summary(path, lengths, loss, limit))
    if png is not None:
        _histogram(lengths, limit, Path(str(png)), path.name)
        print(f"length histogram: {png}")


def _has_labels(path: Path) -> bool:
    """Whether the file's first line has labels (fine-tuning samples) or not (documents)."""
    with open(path, "rb") as lines:
        for raw in lines:
            if raw.strip():
                try:
                    record = json.loads(raw)
                except ValueError:
                    return True  # the store's reader reports the line
                return not isinstance(record, dict) or "labels" in record
    return True


def length_summary(
    path: Path, lengths: np.ndarray, loss_tokens: int | None, limit: int | None
) -> str:
    """The text of ``mt data inspect`` for these sample lengths."""
    total = int(lengths.sum())
    kind = "samples" if loss_tokens is not None else "documents (no labels)"
    lines = [f"{path}: {lengths.size:,} {kind}, {total:,} tokens"]
    if loss_tokens is not None:
        lines.append(f"  loss-counted tokens {loss_tokens:,} ({loss_tokens / max(total, 1):.1%})")
    shown = ", ".join(f"p{p} {np.percentile(lengths, p):,.0f}" for p in PERCENTILES)
    lines.append(
        f"  length: min {lengths.min():,}, mean {lengths.mean():,.1f}, {shown}, max {lengths.max():,}"
    )
    if limit is not None:
        over = lengths > limit
        fate = (
            "a run drops them (too_long_samples = 'error' refuses them)"
            if loss_tokens is not None
            else "pretraining cuts documents into blocks: nothing is dropped"
        )
        lines.append(
            f"  over max_tokens_per_gpu = {limit:,}: {int(over.sum()):,} samples "
            f"({over.mean():.2%}), {int(lengths[over].sum()):,} tokens "
            f"({lengths[over].sum() / max(total, 1):.2%}); {fate}"
        )
    return "\n".join(lines)


def _histogram(lengths: np.ndarray, limit: int | None, target: Path, title: str) -> None:
    from mt.plot import pyplot, save_figure

    plt = pyplot()
    figure, axes = plt.subplots(figsize=(8, 4.5), dpi=100)
    top = max(int(lengths.max()), limit or 0)
    low = max(1, int(lengths.min()))
    bins = np.unique(np.geomspace(low, top + 1, 60).astype(int)) if top > 100 else 50
    axes.hist(lengths, bins=bins, color="tab:blue")
    if top > 100:
        axes.set_xscale("log")
    if limit is not None:
        axes.axvline(limit, color="tab:red", linestyle="--", label=f"max_tokens_per_gpu {limit:,}")
        axes.legend()
    axes.set_xlabel("tokens per sample")
    axes.set_ylabel("samples")
    axes.set_title(f"{title}: {lengths.size:,} samples")
    save_figure(figure, target)
