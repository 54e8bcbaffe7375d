"""`runner report` from the tests, through the runner CLI in this process."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from typer.testing import CliRunner


def run_report(*args: str) -> tuple[int, str, str]:
    """`runner report ARGS`: (exit code, stdout, stderr)."""
    from runner.cli import app

    result = CliRunner().invoke(app, ["report", *args])
    return result.exit_code, result.stdout, result.stderr


def report_json(run_dir: Path, name: str) -> dict[str, Any]:
    code, out, err = run_report(name, "--run-dir", str(run_dir), "--json")
    assert code == 0, err
    return json.loads(out)
