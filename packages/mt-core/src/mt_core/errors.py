"""Errors that end a run for a reason the user acts on: shown as one message, no traceback.

Kept free of torch so the command line can catch them without loading the model stack (only
:func:`report_error` in a job of several processes loads ``mt_fsdp.distributed``, and torch
with it, to reach torchrun's store and compare with rank 0).
"""

from __future__ import annotations

import contextlib
import os
import sys
from datetime import timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch.distributed import Store

__all__ = ["NonFiniteError", "PeerLostError", "RunError", "report_error", "write_error"]

# How long a rank other than 0 waits for rank 0's message before it shows its own. Every rank
# reads the same run file, data and model, so a mistake in them stops all ranks within moments
# of each other; a message only some ranks have (a file missing on one node) appears this late.
RANK_ZERO_WAIT = timedelta(seconds=20)


class RunError(RuntimeError):
    """The run stopped; the message says why, what is intact on disk and what to do."""


class NonFiniteError(RunError):
    """The loss or gradient norm became NaN or infinite; the message names the step and the
    last good checkpoint."""


class PeerLostError(RunError):
    """Other ranks of the run ended while this one needed them: their node was lost, they
    stopped answering, or they stopped for an error of their own. One rank has already written
    the message for the whole run (which ranks, the newest complete checkpoint, how to resume),
    so this one ends without repeating it."""


def write_error(message: str) -> None:
    """``mt: error: LINE`` on stderr for each line of ``message``, in one write: torchrun's ranks
    share one stderr, and a line written in two pieces (text, then newline) can interleave with
    another rank's."""
    sys.stderr.write("".join(f"mt: error: {line}\n" for line in message.splitlines()))
    sys.stderr.flush()


def report_error(message: str) -> bool:
    """:func:`write_error` once for the whole job; returns whether this rank wrote it.

    Alone, or under a launcher other than torchrun, the message is written. Under torchrun rank
    0 writes its message and leaves it in torchrun's own key-value store (which outlives the
    ranks); another rank writes its message only when it differs from rank 0's, or when rank 0
    left none within :data:`RANK_ZERO_WAIT`. Ranks stopped by the same mistake (the run file,
    the data, the model) therefore show it once, and a mistake only some ranks hit still shows.
    """
    rank = int(os.environ.get("RANK", "0"))
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if several and rank != 0 and _rank_zero_said(message):
        return False
    write_error(message)
    if several and rank == 0:
        _leave_for_other_ranks(message)
    return True


def _agent_store() -> Store | None:
    """torchrun's agent store (None: not started by torchrun)."""
    from mt_fsdp.distributed import connect_agent_store  # torch only here, for several ranks

    return connect_agent_store(RANK_ZERO_WAIT)


def _rank_zero_key() -> str:
    # a restarted job (torchrun --max-restarts) keeps the store: each attempt has its own key
    return f"mt/error/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/rank0"


def _leave_for_other_ranks(message: str) -> None:
    # without the store the message is still written; the other ranks then add theirs
    with contextlib.suppress(Exception):
        store = _agent_store()
        if store is not None:
            store.set(_rank_zero_key(), message)


def _rank_zero_said(message: str) -> bool:
    try:
        store = _agent_store()
        if store is None:  # not under torchrun: nothing to compare with
            return False
        store.wait([_rank_zero_key()], RANK_ZERO_WAIT)
        return store.get(_rank_zero_key()).decode() == message
    except Exception:  # no answer from rank 0 (in time): this rank speaks for itself
        return False
