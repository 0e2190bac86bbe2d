"""Padding-free collation: one rank's minibatch as a single row of concatenated items.

No pad token is ever added. Attention segments are described by ``cu_seqlens`` (the varlen
attention convention: cumulative segment starts, int32) and ``position_ids`` restart at 0 in
every segment, so a model sees each sample exactly as if it ran alone. ``labels`` are the
already-shifted targets of each position (-100 where nothing is learnt): the loss compares
logits[t] with labels[t] and must not shift again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mt_data.sources import TokenSource

__all__ = ["PackedMinibatch", "collate_minibatch", "sequence_shard"]


@dataclass(frozen=True)
class PackedMinibatch:
    """One row of concatenated samples, ready for ``torch.from_numpy``.

    ``input_ids``, ``labels`` and ``position_ids`` have shape ``(1, num_tokens)``, int64.
    ``num_loss_tokens`` counts the targets in this minibatch; ``global_num_loss_tokens`` counts
    them in the whole global batch (every rank, every minibatch): dividing each minibatch's
    summed token loss by the latter makes the gradients those of one unpadded batch.
    An empty minibatch (a rank with nothing to do) has zero tokens and ``cu_seqlens == [0]``.

    A sequence-parallel shard (:func:`sequence_shard`) holds a slice of a row's tokens while
    ``cu_seqlens`` and ``max_seqlen`` describe the whole row: its attention sees the whole row.
    """

    input_ids: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray
    cu_seqlens: np.ndarray
    max_seqlen: int
    num_loss_tokens: int
    global_num_loss_tokens: int
    sample_ids: np.ndarray

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def is_empty(self) -> bool:
        return self.num_tokens == 0


def collate_minibatch(
    source: TokenSource, sample_ids: np.ndarray, global_num_loss_tokens: int
) -> PackedMinibatch:
    """Concatenate the items ``sample_ids`` of ``source`` into one padding-free row."""
    sample_ids = np.asarray(sample_ids, dtype=np.int64)
    items = [source.item(int(i)) for i in sample_ids]
    if items:
        input_ids = np.concatenate([ids for ids, _, _ in items]).astype(np.int64)
        labels = np.concatenate([targets for _, targets, _ in items]).astype(np.int64)
        segments = np.concatenate([segs for _, _, segs in items])
    else:
        input_ids = labels = segments = np.empty(0, dtype=np.int64)
    cu_seqlens = np.zeros(segments.size + 1, dtype=np.int32)
    np.cumsum(segments, out=cu_seqlens[1:])
    # Position of each token inside its segment: its index minus its segment's start.
    position_ids = np.arange(input_ids.size, dtype=np.int64) - np.repeat(
        cu_seqlens[:-1].astype(np.int64), segments
    )
    return PackedMinibatch(
        input_ids=input_ids[None, :],
        labels=labels[None, :],
        position_ids=position_ids[None, :],
        cu_seqlens=cu_seqlens,
        max_seqlen=int(segments.max()) if segments.size else 0,
        num_loss_tokens=int(np.count_nonzero(labels != -100)),
        global_num_loss_tokens=int(global_num_loss_tokens),
        sample_ids=sample_ids,
    )


def sequence_shard(
    minibatch: PackedMinibatch, size: int, index: int, multiple: int = 1
) -> PackedMinibatch:
    """Part ``index`` of ``size`` equal, consecutive parts of ``minibatch``'s row, for sequence
    parallelism: ``size`` ranks each compute one part, and their attention exchanges keys and
    values so that every document still attends to all of itself. Each part is a multiple of
    ``multiple`` tokens long (FP8 matrix products need 16: the tokens are the inner dimension
    of a weight gradient's product); ``size = multiple = 1`` is the row itself.

    The row is first made a multiple of ``size x multiple`` tokens long (and at least that, so an
    empty minibatch gives every rank a part) by a filler segment of its own at the end: fewer
    than ``size x multiple`` tokens, label -100, positions from 0. No document is padded or
    split from its segment: the filler only sees itself and has no target, so it adds exactly
    nothing to the loss or to any gradient. The returned ``cu_seqlens`` and ``max_seqlen`` are
    the whole (filled) row's; the token counts are this part's.
    """
    if size < 1 or multiple < 1 or not 0 <= index < size:
        raise ValueError(
            f"part {index} of {size}, each a multiple of {multiple} tokens: need size >= 1, "
            "multiple >= 1 and 0 <= index < size"
        )
    unit = size * multiple
    if unit == 1:
        return minibatch
    tokens = minibatch.num_tokens
    filled = max(unit, -(-tokens // unit) * unit)
    filler = filled - tokens
    cu_seqlens = minibatch.cu_seqlens
    if filler:
        cu_seqlens = np.append(cu_seqlens, np.int32(filled))

    def with_filler(row: np.ndarray, fill: np.ndarray) -> np.ndarray:
        return np.concatenate([row[0], fill])[None, :] if filler else row

    input_ids = with_filler(minibatch.input_ids, np.zeros(filler, dtype=np.int64))
    labels = with_filler(minibatch.labels, np.full(filler, -100, dtype=np.int64))
    position_ids = with_filler(minibatch.position_ids, np.arange(filler, dtype=np.int64))
    part = slice(index * (filled // size), (index + 1) * (filled // size))
    return PackedMinibatch(
        input_ids=input_ids[:, part],
        labels=labels[:, part],
        position_ids=position_ids[:, part],
        cu_seqlens=cu_seqlens,
        max_seqlen=int(max(minibatch.max_seqlen, filler)),
        num_loss_tokens=int(np.count_nonzero(labels[:, part] != -100)),
        global_num_loss_tokens=minibatch.global_num_loss_tokens,
        sample_ids=minibatch.sample_ids,
    )
