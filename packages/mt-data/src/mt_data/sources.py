"""What the trainer samples from: fine-tuning samples or pretraining blocks of a token store.

Both kinds of source hand out *items* in the same shape, so packing and collation do not care
which one they serve:

* ``lengths[i]``: tokens of item ``i`` (what the packer balances);
* ``loss_counts[i]``: positions of item ``i`` that have a target (what the loss divides by);
* ``item(i) -> (input_ids, targets, segment_lengths)``: ``targets[t]`` is the token that position
  ``t`` must predict (already shifted, -100 where nothing is learnt), and the item is made of
  attention segments of ``segment_lengths`` tokens (position ids restart at 0 in each segment,
  attention never crosses a segment boundary).

Targets are shifted here, per item, rather than by the model on the packed row: a model that
shifted the concatenated row would make the last position of one sample predict the first
token of the next one.
"""

from __future__ import annotations

import warnings
from typing import Literal, Protocol

import numpy as np

from mt_data.errors import DataError, DataWarning
from mt_data.store import TokenStore

__all__ = ["IGNORE_INDEX", "PretrainingBlocks", "SampleDataset", "TokenSource"]

IGNORE_INDEX = (
    -100
)  # label of a position that is not learnt (the convention of HF and mini_trainer)


class TokenSource(Protocol):
    lengths: np.ndarray
    loss_counts: np.ndarray

    def __len__(self) -> int: ...

    def item(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...

    def location(self, index: int) -> str: ...


class SampleDataset:
    """Fine-tuning samples of a store, minus those that cannot or need not be trained on.

    Dropped, each with one warning that gives the count: samples longer than ``max_tokens``
    (they fit in no minibatch; ``too_long="error"`` refuses them instead, naming ``path:line``)
    and samples without any loss-counted token (they add nothing and can make a minibatch's loss
    0/0). When no sample is left, one DataError says why and what to change (no warnings
    first). Item ``i`` of the dataset is sample ``kept[i]`` of the store. ``limit_name`` is how
    the messages name ``max_tokens`` (the run-file keys that set it).
    """

    def __init__(
        self,
        store: TokenStore,
        max_tokens: int | None = None,
        too_long: Literal["drop", "error"] = "drop",
        limit_name: str = "max_tokens_per_gpu",
    ) -> None:
        if store.labels is None or store.loss_counts is None:
            raise ValueError(f"{store.source}: fine-tuning needs labels; build the store with them")
        if too_long not in ("drop", "error"):
            raise ValueError(f"too_long must be 'drop' or 'error', got {too_long!r}")
        self.store = store
        lengths = np.asarray(store.lengths)
        over = np.zeros(len(store), dtype=bool)
        if max_tokens is not None:
            over = lengths > max_tokens
        silent = np.asarray(store.loss_counts) == 0
        keep = ~over & ~silent
        if over.any() and too_long == "error":
            # raises, naming each
            _report_too_long(store, over, lengths, max_tokens, too_long, limit_name)
        if not keep.any():  # one error that says why, rather than warnings and then an error
            raise DataError([_nothing_left(store, lengths, over, silent, max_tokens, limit_name)])
        if over.any():
            _report_too_long(store, over, lengths, max_tokens, too_long, limit_name)
        if (silent & ~over).any():
            warnings.warn(
                f"{store.source}: dropped {int((silent & ~over).sum())} sample(s) with no "
                "loss-counted token (every label after the first is -100)",
                DataWarning,
                stacklevel=2,
            )
        self.kept = np.flatnonzero(keep)
        self.lengths = lengths[self.kept]
        self.loss_counts = np.asarray(store.loss_counts)[self.kept]

    def __len__(self) -> int:
        return int(self.kept.size)

    def item(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        sample = int(self.kept[index])
        input_ids = self.store.tokens(sample)
        labels = self.store.sample_labels(sample)
        targets = np.full(input_ids.shape[0], IGNORE_INDEX, dtype=np.int64)
        targets[:-1] = labels[1:]  # position t predicts token t + 1 of the same sample only
        return input_ids, targets, np.array([input_ids.shape[0]], dtype=np.int64)

    def location(self, index: int) -> str:
        return self.store.location(int(self.kept[index]))


def _nothing_left(
    store: TokenStore,
    lengths: np.ndarray,
    over: np.ndarray,
    silent: np.ndarray,
    max_tokens: int | None,
    limit_name: str,
) -> str:
    """Why no sample of ``store`` can be trained on, and what to change."""
    head = f"{store.source}: no sample is left to train on"
    masked = "every label after the first is -100 (nothing to learn)"
    unmask = "give samples labels to learn (their token ids; -100 only where nothing is learnt)"
    if over.all():
        shortest = int(lengths.min())
        return (
            f"{head}: all {len(store)} sample(s) are longer than {limit_name}="
            f"{max_tokens} (the shortest has {shortest} tokens); raise {limit_name} to at "
            f"least {shortest} or shorten the samples"
        )
    if not over.any():
        return f"{head}: in each of its {len(store)} sample(s) {masked}; {unmask}"
    learnable = int(lengths[~silent].min())
    return (
        f"{head}: {int(over.sum())} sample(s) are longer than {limit_name}={max_tokens} "
        f"and in the other {int((silent & ~over).sum())} {masked}; raise {limit_name} to "
        f"at least {learnable} (the shortest sample with labels) or {unmask}"
    )


def _report_too_long(
    store: TokenStore,
    over: np.ndarray,
    lengths: np.ndarray,
    max_tokens: int,
    too_long: str,
    limit_name: str,
) -> None:
    count = int(over.sum())
    share = float(lengths[over].sum()) / float(lengths.sum())
    summary = (
        f"{store.source}: {count} of {len(store)} sample(s) ({share:.2%} of the tokens) are "
        f"longer than {limit_name}={max_tokens}"
    )
    if too_long == "error":
        problems = [
            f"{store.location(int(i))}: sample has {int(lengths[i])} tokens, more than "
            f"{limit_name}={max_tokens}"
            for i in np.flatnonzero(over)[:20]
        ]
        raise DataError(
            problems,
            header=summary + f"; raise {limit_name}, shorten them, or let mt drop them",
        )
    warnings.warn(summary + "; they were dropped", DataWarning, stacklevel=3)


class PretrainingBlocks:
    """The corpus as one token stream, cut into blocks of ``block_size`` input positions.

    Every token of the corpus is a target (of the position just before it) except the corpus's
    first, and only the corpus's last token has no target; so block ``b`` holds inputs
    ``stream[b*B : b*B + B]`` and targets ``stream[b*B + 1 : b*B + B + 1]``, and only the last
    block may be shorter. With ``segment_documents`` (the default) attention stays inside each
    document: a block is cut into segments at document starts. Otherwise a block is one
    contiguous segment, as in classic GPT-style pretraining.
    """

    def __init__(self, store: TokenStore, block_size: int, segment_documents: bool = True) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.store = store
        self.block_size = int(block_size)
        self.segment_documents = segment_documents
        self.num_positions = int(store.offsets[-1]) - 1  # every token but the last has a target
        if self.num_positions < 1:
            raise DataError([f"{store.source}: the corpus needs at least 2 tokens to train on"])
        num_blocks = -(-self.num_positions // self.block_size)
        self.lengths = np.full(num_blocks, self.block_size, dtype=np.int64)
        self.lengths[-1] = self.num_positions - (num_blocks - 1) * self.block_size
        self.loss_counts = self.lengths.copy()

    def __len__(self) -> int:
        return int(self.lengths.size)

    def _span(self, index: int) -> tuple[int, int]:
        start = int(index) * self.block_size
        return start, start + int(self.lengths[index])

    def item(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        start, end = self._span(index)
        stream = self.store.input_ids
        input_ids = stream[start:end]
        targets = stream[start + 1 : end + 1].astype(np.int64)
        if not self.segment_documents:
            return input_ids, targets, np.array([end - start], dtype=np.int64)
        offsets = self.store.offsets
        first = np.searchsorted(offsets, start, side="right")  # document starts after start ...
        last = np.searchsorted(offsets, end, side="left")  # ... and before end cut the block
        cuts = np.concatenate(([start], offsets[first:last], [end]))
        return input_ids, targets, np.diff(cuts).astype(np.int64)

    def location(self, index: int) -> str:
        start, _ = self._span(index)
        document = int(np.searchsorted(self.store.offsets, start, side="right")) - 1
        return f"{self.store.location(document)} (block {index})"
