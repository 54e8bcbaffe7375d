"""`runner runs`: each run in the registry with its status and the processes it still has."""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from typing import Any

from runner.procs import proc_table, registry
from runner.procs.run_tag import TAG_ENV


@dataclass
class RunStatus:
    run: registry.RunRecord
    status: str
    alive: list[int]  # pids of the run's processes still running


def _ended(code: int | None) -> str:
    if code is None:
        return "gone (its root was killed)"
    if code == 0:
        return "finished"
    if code > 128:
        try:
            return f"stopped by {signal.Signals(code - 128).name}"
        except ValueError:
            pass
    return f"failed (exit {code})"


def statuses() -> list[RunStatus]:
    """Every run, oldest first: running, ended (how), or ended with processes left over."""
    boot = proc_table.boot_id()
    table = proc_table.snapshot()
    tagged: dict[str, set[int]] = {}
    for pid, proc in table.items():
        run_id = proc.environ.get(TAG_ENV) if not proc.is_zombie else None
        if run_id:
            tagged.setdefault(run_id, set()).add(pid)
    out = []
    for run in registry.load_runs():
        if run.boot != boot:
            out.append(RunStatus(run, "ended before the last reboot", []))
            continue
        alive = sorted(tagged.get(run.id, set()) | {r.pid for r in run.procs if r.alive(boot)})
        if run.root_alive(boot):
            status = "running"
        elif alive:
            status = f"{len(alive)} process(es) left over: runner cleanup --run {run.id}"
        else:
            status = _ended(run.exit_code)
        out.append(RunStatus(run, status, alive))
    return out


def rows(found: list[RunStatus]) -> list[dict[str, Any]]:
    return [{"id": s.run.id, "name": s.run.name, "status": s.status, "started": s.run.created,
             "root": s.run.root[0] if s.run.root else None, "exit_code": s.run.exit_code, "alive": s.alive,
             "run_path": s.run.run_path} for s in found]


def table_text(found: list[RunStatus]) -> str:
    if not found:
        return f"no runs in {registry.runs_dir()}"
    header = ("RUN", "NAME", "STARTED", "ROOT", "STATUS")
    lines = [(s.run.id, s.run.name, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.run.created)),
              str(s.run.root[0]) if s.run.root else "-", s.status) for s in found]
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header) - 1)]
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)), row[-1]])
                     for row in [header, *lines])
