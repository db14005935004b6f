"""The one exception type for mistakes a user can make."""

from __future__ import annotations

__all__ = ["LTMPError", "Unreachable"]


class LTMPError(ValueError):
    """An invalid plan, an unsupported model or a call that cannot be honoured.

    The message names the offending field or module and is meant to be shown to the user as is;
    the command line turns it into one line on stderr and exit code 2.
    """


class Unreachable(LTMPError):
    """A FLOPs ratio the plan cannot reach (its floor is above it): for a search, an infeasible plan
    rather than a mistake. ``lowest`` is the lowest ratio it reaches."""

    def __init__(self, message: str, lowest: float) -> None:
        super().__init__(message)
        self.lowest = lowest
