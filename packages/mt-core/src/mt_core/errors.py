"""Errors that end a run for a reason the user acts on: shown as one message, no traceback.

Kept free of torch so the command line can catch them without loading the model stack.
"""

from __future__ import annotations

import sys

__all__ = ["NonFiniteError", "RunError", "write_error"]


class RunError(RuntimeError):
    """The run stopped; the message says why, what is intact on disk and what to do."""


class NonFiniteError(RunError):
    """The loss or gradient norm became NaN or infinite; the message names the step and the
    last good checkpoint."""


def write_error(message: str) -> None:
    """``mt: error: LINE`` on stderr for each line of ``message``, in one write: torchrun's ranks
    share one stderr, and a line written in two pieces (text, then newline) can interleave with
    another rank's."""
    sys.stderr.write("".join(f"mt: error: {line}\n" for line in message.splitlines()))
    sys.stderr.flush()
