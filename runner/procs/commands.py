"""`runner cleanup`, `runner runs` and `runner stacks` (no torch import)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict

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


def stacks(
    run: str = typer.Argument(..., metavar="RUN", help="A live run: its name (under --run-dir), folder or id."),
    run_dir: str = typer.Option("runs", "--run-dir", envvar="RUNNER_RUN_DIR", help="Folder of runs."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Print the Python stacks (every thread) of a live run's processes, grouped by rank: trainer or ranks and
    their DataLoader workers, with each rank's phase. py-spy where it may attach, else faulthandler files."""
    run_command(lambda: _stacks(run, run_dir, as_json))


def _stacks(run: str, run_dir: str, as_json: bool) -> int:
    from runner.procs import stacks as stacks_module
    from runner.procs import stall_explain, stall_watch

    found = stall_watch.find_live_run(run, run_dir)
    beats = {b.rank: b for b in stall_watch.live_beats(found.id)}
    captured = stacks_module.capture(stacks_module.targets_of(found), stacks_module.folder_for(found.id))
    states = {s.rank: s for s in stall_explain.explain_ranks(list(beats.values()), captured, time.time())}
    if as_json:
        print(json.dumps({"run": found.id, "name": found.name, "processes": [s.to_dict() for s in captured],
                          "ranks": [asdict(s) for s in states.values()]}, indent=2, default=str))
    else:
        notes = {rank: f"{s.doing()} for {s.seconds:.0f} s" for rank, s in states.items()}
        print(f"run {found.name} ({found.id}): {len(captured)} process(es)")
        print(stacks_module.render(captured, notes))
    return 0 if any(s.threads for s in captured) else 1
