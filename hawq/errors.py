"""User-facing errors: one clear line, a non-zero exit, no traceback."""

from __future__ import annotations


class HawqError(Exception):
    """An error the user caused (bad config value, missing data, corrupt file).

    The command-line entry point prints ``hawq: error: <message>`` and exits with
    :attr:`exit_code`; library callers get an ordinary exception.
    """

    exit_code = 2


def choices(values) -> str:
    """Format allowed values for an error message: ``a, b, c``."""
    return ", ".join(sorted(str(v) for v in values))
