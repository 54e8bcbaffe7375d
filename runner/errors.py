"""The runner's error type: one line for the user, and the exit code that goes with it."""

from __future__ import annotations

USAGE = 2  # bad flags, names, paths: the user can fix the command line
RUNTIME = 1  # the run started and cannot go on


class RunnerError(Exception):
    """An error the CLI reports as one line on stderr (no traceback unless --debug)."""

    def __init__(self, message: str, code: int = RUNTIME) -> None:
        super().__init__(message)
        self.code = code


def usage_error(message: str) -> RunnerError:
    """A mistake in what the user asked for (exit code 2)."""
    return RunnerError(message, USAGE)
