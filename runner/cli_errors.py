"""How every `runner` command reports failure: one line on stderr (`runner: error: ...`) and an exit code.

A `RunnerError` raised by a command body keeps its code (2 for usage, 1 for runtime); a mistake on the
command line (unknown option, bad value, misspelt command) exits 2. Imports nothing heavy.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from typing import NoReturn, cast

import typer

from runner.errors import RunnerError

# Click documents `BadParameter` as a subclass of `UsageError`, the class of every command-line mistake.
# Typer re-exports `BadParameter` publicly (click's own before typer 0.26, its vendored copy since), so its
# base is the usage-error class of whichever click typer runs on, with no import of click or its private copy.
USAGE_ERROR = cast(type[Exception], typer.BadParameter.__base__)


def report(message: str) -> None:
    """Print one error line on stderr (newlines in the message are folded)."""
    print(f"runner: error: {' '.join(message.split())}", file=sys.stderr, flush=True)


def run_command(body: Callable[[], int | None], debug: bool = False) -> NoReturn:
    """Run a command body: its return value is the exit code; a RunnerError becomes one line and its code."""
    try:
        code = body()
    except RunnerError as exc:
        if debug:
            traceback.print_exc()
        report(str(exc))
        raise typer.Exit(exc.code) from None
    raise typer.Exit(code or 0)


def run_app(app: typer.Typer, args: list[str] | None, prog_name: str) -> NoReturn:
    """Entry point of a typer app: usage errors become one line on stderr and exit code 2."""
    try:
        code = app(args=args, prog_name=prog_name, standalone_mode=False)
    except USAGE_ERROR as exc:
        message: str = exc.format_message()  # type: ignore[attr-defined]
        if not message:  # a group called without a command: typer has printed its help
            sys.exit(0)
        ctx = getattr(exc, "ctx", None)
        where = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
        report(f"{message}{where}")
        sys.exit(getattr(exc, "exit_code", 2))
    sys.exit(code if isinstance(code, int) else 0)
