"""The one exception type for mistakes a user can make."""

from __future__ import annotations

__all__ = ["LTMPError"]


class LTMPError(ValueError):
    """An invalid plan, an unsupported model or a call that cannot be honoured.

    The message names the offending field or module and is meant to be shown to the user as is;
    the command line turns it into one line on stderr and exit code 2.
    """
