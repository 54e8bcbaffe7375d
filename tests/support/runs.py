"""Running `runner` from a test, and what it returned: as a real process (supervisor + trainer child), or
in this process with training right here (fast, and what most tests need)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
TINY = ["--image-size", "16", "--batch-size", "4", "--samples", "32", "--no-progress", "--viz", "none"]


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str


def child_pythonpath() -> str:
    """PYTHONPATH for a process a test starts: the repository root, so `tests.support.models:NAME` imports."""
    return os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)


def run_runner(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> Outcome:
    """`python -m runner ARGS` as a real process (supervisor + trainer child)."""
    full_env = dict(os.environ, PYTHONPATH=child_pythonpath(), **(env or {}))
    proc = subprocess.run([sys.executable, "-m", "runner", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=ROOT)
    return Outcome(proc.returncode, proc.stdout, proc.stderr)


def in_process_cli() -> Callable[..., Outcome]:
    """`runner ARGS` in this process, its `train` training right here (no supervisor, no child): the
    command tree of runner/cli.py around runner/train/run.py's `train_here`, as `python -m runner.train`
    uses it."""
    from typer.testing import CliRunner

    from runner.cli import build_app
    from runner.train.run import train_here

    app = build_app(train_here)

    def run(*args: str) -> Outcome:
        result = CliRunner().invoke(app, list(args))
        if result.exception and not isinstance(result.exception, SystemExit):
            raise result.exception
        return Outcome(result.exit_code, result.stdout, result.stderr)

    return run
