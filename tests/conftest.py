"""Shared fixtures: run the CLI in-process (fast) or as a real subprocess (end to end)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--image-size", "16", "--batch-size", "4", "--samples", "32", "--no-progress", "--viz", "none"]


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the run registry and anything under XDG state out of the real home."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch):
    """`cli("train", ...)`: the typer app in this process, trainer in-process too (no supervisor)."""
    from typer.testing import CliRunner

    from runner.cli import app

    monkeypatch.setenv("RUNNER_IN_PROCESS", "1")
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "tests") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.syspath_prepend(str(ROOT / "tests"))

    def run(*args: str) -> Outcome:
        result = CliRunner().invoke(app, list(args))
        if result.exception and not isinstance(result.exception, SystemExit):
            raise result.exception
        return Outcome(result.exit_code, result.stdout, result.stderr)

    return run


def run_runner(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> Outcome:
    """`python -m runner ARGS` as a real process (supervisor + trainer child)."""
    full_env = dict(os.environ, PYTHONPATH=str(ROOT / "tests"), **(env or {}))
    full_env.pop("RUNNER_IN_PROCESS", None)
    proc = subprocess.run([sys.executable, "-m", "runner", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=ROOT)
    return Outcome(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def markers(tmp_path: Path) -> Iterator[Path]:
    """The test's marker folder; at teardown every process still carrying it is killed."""
    folder = tmp_path / "markers"
    folder.mkdir(exist_ok=True)
    yield folder
    from procs_helpers import MARKERS_ENV

    from runner.procs import proc_table
    from tests.proc_runs import tagged

    for pid, start in tagged(MARKERS_ENV, str(folder)).items():
        fd = None
        try:
            fd = os.pidfd_open(pid)
            if proc_table.is_same_process(pid, start):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
        except ProcessLookupError:
            pass
        finally:
            if fd is not None:
                os.close(fd)
