"""How a command ends other than by success: a user's mistake, or a verdict.

Kept free of torch so the command line can catch them without loading the model stack.
"""

from __future__ import annotations

__all__ = ["CommandError", "Verdict"]


class CommandError(ValueError):
    """A mistake on the command line or in a file a command reads: one line per problem, exit 2."""


class Verdict(Exception):  # noqa: N818 - not an error: the command's answer is its exit status
    """The command finished and its answer is an exit status (``mt check``: 1 = does not fit).
    What it had to say is already printed."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status
