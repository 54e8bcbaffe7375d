"""`runner cleanup`: find what runs left behind (processes, /dev/shm segments) and, when asked, end it.

A dry run by default. Acting: processes are ended in the order and through the pidfds of
`termination`, then segments that are leaks now (some only become leaks once their holders are
gone) are removed, then the registry forgets processes that no longer exist.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.errors import usage_error
from runner.procs import proc_table, registry, shm
from runner.procs.candidates import Candidate, find_candidates
from runner.procs.gpu_memory import gpu_memory_by_pid
from runner.procs.termination import Target, phase_of, terminate


@dataclass
class Scope:
    """What the user limited the cleanup to: a run (id or name), and/or pids and segment names."""

    run: str | None = None
    only: list[str] = field(default_factory=list)

    @property
    def pids(self) -> set[int]:
        return {int(item) for item in self.only if item.isdigit()}

    @property
    def names(self) -> set[str]:
        return {Path(item).name for item in self.only if not item.isdigit()}


@dataclass
class Plan:
    candidates: list[Candidate]
    leaks: list[shm.ShmLeak]
    gpu: dict[int, int]
    now_ticks: int


def _run_ids(scope: Scope, runs: list[registry.RunRecord], candidates: list[Candidate]) -> set[str]:
    ids = {run.id for run in runs if scope.run in (run.id, run.name)}
    ids |= {c.run_id for c in candidates if c.run_id is not None and c.run_id == scope.run}
    if not ids:
        raise usage_error(f"no run {scope.run!r} in the registry or among left-over processes (see `runner runs`)")
    return ids


def _scoped_leaks(scope: Scope, runs: list[registry.RunRecord], run_ids: set[str] | None) -> list[shm.ShmLeak]:
    leaks = shm.find_leaks()
    if run_ids is not None:
        creators = {record.pid for run in runs if run.id in run_ids for record in run.procs}
        leaks = [leak for leak in leaks if leak.creator in creators]
    if scope.only:
        leaks = [leak for leak in leaks if leak.path.name in scope.names]
    return leaks


def plan(scope: Scope) -> Plan:
    """Candidates and leaks within `scope` (nothing is touched)."""
    table = proc_table.snapshot()
    runs = registry.load_runs()
    candidates = find_candidates(table, runs, proc_table.boot_id(), os.getpid())
    run_ids = _run_ids(scope, runs, candidates) if scope.run else None
    if run_ids is not None:
        candidates = [c for c in candidates if c.run_id in run_ids]
    if scope.only:
        candidates = [c for c in candidates if c.proc.pid in scope.pids]
    leaks = _scoped_leaks(scope, runs, run_ids)
    gpu = gpu_memory_by_pid() if candidates else {}
    return Plan(candidates, leaks, gpu, proc_table.uptime_ticks())


@dataclass
class Outcome:
    ended: list[Candidate]
    left: list[Candidate]
    removed: list[shm.ShmLeak]
    shm_left: list[shm.ShmLeak]


def act(scope: Scope, found: Plan, grace: float) -> Outcome:
    """End the planned processes, remove the leaks (as they stand after that), prune the registry."""
    targets = {Target(c.proc.pid, c.proc.start, phase_of(c.proc, c.role)): c for c in found.candidates}
    left_targets = set(terminate(list(targets), grace))
    left = [c for t, c in targets.items() if t in left_targets]
    runs = registry.load_runs()
    run_ids = _run_ids(scope, runs, found.candidates) if scope.run else None
    leaks = _scoped_leaks(scope, runs, run_ids) if found.candidates else found.leaks
    shm_left = shm.remove(leaks)
    boot = proc_table.boot_id()
    for run in runs:
        if not run.root_alive(boot):
            registry.forget_dead_records(run, boot)
    return Outcome([c for c in targets.values() if c not in left], left,
                   [leak for leak in leaks if leak not in shm_left], shm_left)


# --- presentation --------------------------------------------------------------------------

def _size(n: float) -> str:
    for unit in ("B", "K", "M", "G"):
        if n < 1024 or unit == "G":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return ""


def _age(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def process_rows(found: Plan) -> list[dict[str, Any]]:
    return [{"pid": c.proc.pid, "ppid": c.proc.ppid, "age_s": round(c.proc.age_s(found.now_ticks), 1),
             "rss_bytes": c.proc.rss, "gpu_bytes": found.gpu.get(c.proc.pid), "role": c.role, "run": c.run_id,
             "reason": c.reason, "cmdline": c.proc.cmdline} for c in found.candidates]


def leak_rows(leaks: list[shm.ShmLeak]) -> list[dict[str, Any]]:
    return [{"path": str(leak.path), "size_bytes": leak.size, "age_s": round(leak.age_s, 1), "creator": leak.creator,
             "reason": leak.reason} for leak in leaks]


def table_text(found: Plan) -> str:
    """The dry run's table (processes, then /dev/shm findings)."""
    lines: list[str] = []
    if found.candidates:
        header = ("PID", "PPID", "AGE", "RSS", "GPU", "ROLE", "REASON")
        rows = [(str(r["pid"]), str(r["ppid"]), _age(r["age_s"]), _size(r["rss_bytes"]),
                 _size(r["gpu_bytes"]) if r["gpu_bytes"] is not None else "-", r["role"], r["reason"])
                for r in process_rows(found)]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
        for row in [header, *rows]:
            lines.append("  ".join([*(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)), row[-1]]))
    else:
        lines.append("no left-over processes")
    if found.leaks:
        lines.append("")
        lines += [f"{leak.path}  {_size(leak.size)}  {leak.reason}" for leak in found.leaks]
    else:
        lines.append(f"no leaked {shm.SHM_DIR}/torch_* segments")
    return "\n".join(lines)
