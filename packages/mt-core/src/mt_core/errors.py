"""Errors that end a run for a reason the user acts on: shown as one message, no traceback.

Kept free of torch so the command line can catch them without loading the model stack.
"""

from __future__ import annotations

__all__ = ["NonFiniteError", "RunError"]


class RunError(RuntimeError):
    """The run stopped; the message says why, what is intact on disk and what to do."""


class NonFiniteError(RunError):
    """The loss or gradient norm became NaN or infinite; the message names the step and the
    last good checkpoint."""
