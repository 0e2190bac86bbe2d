"""Errors and warnings about user data, always pointing at ``path:line``."""

from __future__ import annotations

MAX_PROBLEMS_SHOWN = 10


class DataError(ValueError):
    """Bad input data. ``problems`` holds every ``path:line: what is wrong`` found.

    The message shows the first :data:`MAX_PROBLEMS_SHOWN` of them and how many more there are,
    so one run reports several mistakes at once instead of one per attempt.
    """

    def __init__(self, problems: list[str], *, header: str | None = None) -> None:
        self.problems = list(problems)
        shown = self.problems[:MAX_PROBLEMS_SHOWN]
        lines = ([header] if header else []) + shown
        hidden = len(self.problems) - len(shown)
        if hidden > 0:
            lines.append(f"... and {hidden} more problem(s)")
        super().__init__("\n".join(lines))


class DataWarning(UserWarning):
    """Data was dropped or changed on the way in (too long, nothing to learn from, ...)."""
