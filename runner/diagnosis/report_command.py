"""`runner report RUN`: a one-screen summary of a run, finished, live or killed, from its files (no torch)."""

from __future__ import annotations

import json

import typer

from runner.cli_errors import run_command


def report(
    run: str = typer.Argument(..., metavar="RUN", help="A run name (under --run-dir) or a run folder."),
    run_dir: str = typer.Option("runs", "--run-dir", envvar="RUNNER_RUN_DIR", help="Folder of runs."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Status and exit reason, steps, throughput, where the step's time goes, peak memory, the findings
    with their evidence and advice, and where the dashboards' data lies."""
    from runner.diagnosis.report import build_report, find_run, render

    def body() -> int:
        found = build_report(find_run(run, run_dir))
        print(json.dumps(found, indent=2, default=str) if as_json else render(found))
        return 0

    run_command(body)
