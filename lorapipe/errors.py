"""Errors a person caused and can fix: shown as one line naming the input and the reason, never retried.

Raise `UserError` (or a subclass) for a bad setting, a missing or unreadable file, a missing optional
dependency, a model that cannot be found: anything where running the same thing again gives the same
failure. The stage tasks do not retry it (tasks/stage.py), and the CLI prints its message alone, without
a traceback (flows/cli.py).
"""

from __future__ import annotations


class UserError(ValueError):
    """A problem with what the user gave us; its message is one line naming the input and the fix."""


def is_permanent(error: BaseException | None) -> bool:
    """True for failures that a retry cannot fix: a UserError anywhere in the exception's chain."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, UserError):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False
