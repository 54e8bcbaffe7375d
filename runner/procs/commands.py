"""`runner cleanup` and `runner runs` (no torch import)."""

from __future__ import annotations

import json

import typer

from runner.cli_errors import run_command


def _only_items(only: list[str]) -> list[str]:
    """`--only 12 --only 34`, `--only 12,34`: pids and /dev/shm segment names."""
    return [item.strip() for value in only for item in value.split(",") if item.strip()]


def cleanup(
    yes: bool = typer.Option(False, "--yes", "-y", help="Act: end the processes and remove the segments listed."),
    run: str | None = typer.Option(None, "--run", metavar="ID", help="Only what this run (id or name) left."),
    only: list[str] = typer.Option([], "--only", metavar="PID|SEGMENT",
                                   help="Only these pids or /dev/shm segment names (repeat, or comma-separated)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    grace: float = typer.Option(10.0, "--grace", min=0.0, help="Seconds between SIGTERM and SIGKILL."),
) -> None:
    """Find what runs left behind: orphaned DataLoader workers, torchrun ranks, forkservers, resource trackers,
    leaked /dev/shm/torch_* segments. A dry run unless --yes. Exit 0 when nothing remains, 1 otherwise."""
    run_command(lambda: _cleanup(yes, run, _only_items(only), as_json, grace))


def _cleanup(yes: bool, run: str | None, only: list[str], as_json: bool, grace: float) -> int:
    from runner.procs import cleanup as cleanup_module

    scope = cleanup_module.Scope(run=run, only=only)
    found = cleanup_module.plan(scope)
    report = {"dry_run": not yes, "processes": cleanup_module.process_rows(found),
              "shm": cleanup_module.leak_rows(found.leaks)}
    remaining = bool(found.candidates or found.leaks)
    if not as_json:
        print(cleanup_module.table_text(found))
    if yes and remaining:
        outcome = cleanup_module.act(scope, found, grace)
        report["left"] = {"processes": [c.proc.pid for c in outcome.left],
                          "shm": [str(leak.path) for leak in outcome.shm_left]}
        report["removed_shm"] = [str(leak.path) for leak in outcome.removed]
        remaining = bool(outcome.left or outcome.shm_left)
        if not as_json:
            print(f"ended {len(outcome.ended)} process(es), removed {len(outcome.removed)} segment(s)")
            if remaining:
                left = [str(c.proc.pid) for c in outcome.left] + [str(leak.path) for leak in outcome.shm_left]
                print(f"still there: {', '.join(left)}")
    elif remaining and not as_json:
        print("dry run: nothing was touched; run again with --yes to end/remove the above")
    if as_json:
        print(json.dumps(report, indent=2))
    return 1 if remaining else 0


def runs(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List runs (from the run registry) with their status: running, finished, stopped, or left over."""
    from runner.procs import run_status

    found = run_status.statuses()
    print(json.dumps(run_status.rows(found), indent=2) if as_json else run_status.table_text(found))
