"""`runner diff A B`: what changed between two runs (config, code, packages, hardware, metrics, time,
findings), from their files only: torch-free and well under a second."""

from __future__ import annotations

import json

import typer

from runner.cli_errors import run_command


def diff(
    run_a: str = typer.Argument(..., metavar="A", help="A run name (under --run-dir) or a run folder."),
    run_b: str = typer.Argument(..., metavar="B", help="The run to compare it with."),
    run_dir: str = typer.Option("runs", "--run-dir", envvar="RUNNER_RUN_DIR", help="Folder of runs."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """What differs between runs A and B: changed config keys, code version and packages, hardware, final
    and best metrics side by side, the step's time breakdown, and the findings only one of them has."""
    from runner.diagnosis.diff import build_diff, render
    from runner.diagnosis.report import find_run

    def body() -> int:
        found = build_diff(find_run(run_a, run_dir), find_run(run_b, run_dir))
        print(json.dumps(found, indent=2, default=str) if as_json else render(found))
        return 0

    run_command(body)
