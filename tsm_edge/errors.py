"""Two kinds of failure: the user's input (UserError) and our own bug (InternalError).

The CLI prints a UserError as one ``error: ...`` line and exits with status 2; an
InternalError keeps its traceback because it is ours to fix.
"""

from __future__ import annotations

import difflib
import errno
from collections.abc import Iterable


class UserError(Exception):
    """Bad input from the user: names the bad value and what would be valid."""


class InternalError(Exception):
    """A broken invariant inside tsm-edge (a bug, not the user's fault)."""


def unknown_choice(kind: str, value: str, choices: Iterable[str]) -> UserError:
    """A UserError for an unknown name, listing the valid ones and a close match."""
    choices = sorted(choices)
    close = difflib.get_close_matches(value, choices, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return UserError(f"unknown {kind} '{value}'{hint}; valid: {', '.join(choices)}")


def summarize(items: list[str], limit: int = 5) -> str:
    """The first few items, then a count of the rest."""
    head = ", ".join(items[:limit])
    rest = len(items) - limit
    return f"{head} and {rest} more" if rest > 0 else head


_DISK_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
              errno.EFBIG: "file too large for this file system or size limit"}


def disk_full_reason(exc: BaseException) -> str | None:
    """What ran out when ``exc`` says the disk is full (also from a tool's output), else None."""
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
        return _DISK_FULL[exc.errno]
    text = str(exc).lower()
    for code, phrase in ((errno.ENOSPC, "no space left on device"),
                         (errno.EDQUOT, "disk quota exceeded"), (errno.EFBIG, "file too large")):
        if phrase in text:
            return _DISK_FULL[code]
    return None
