"""The one error type for bad input (no imports from raykd: every module may raise it)."""

from __future__ import annotations

import difflib


class ConfigError(ValueError):
    """A bad configuration value: the message is one line naming the field and the fix."""


def suggest(name: str, choices) -> str:
    """'; did you mean X?' for the closest of `choices`, or ''."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""
