"""The run registry: which processes belong to which run, on disk, outside /dev/shm and $XDG_RUNTIME_DIR.

Layout (under `$XDG_STATE_HOME/runner`, default `~/.local/state/runner`, which survives logout):

    runs/<run id>/run.json                 who started the run, its root process, its exit code
    runs/<run id>/procs/<pid>-<start>.json one file per process: role, rank, parent, command line

Every file is written whole (temp file + rename), so readers never see half a record. A process
is (pid, start time, boot id): a record whose pid now belongs to another process is stale.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from runner.procs import proc_table

KEEP_DAYS = 14.0  # ended runs older than this are forgotten when a new run starts


def state_dir() -> Path:
    """`$XDG_STATE_HOME/runner` (an absolute XDG_STATE_HOME only, per the spec), else ~/.local/state/runner."""
    base = os.environ.get("XDG_STATE_HOME", "")
    root = Path(base) if os.path.isabs(base) else Path.home() / ".local" / "state"
    return root / "runner"


def runs_dir() -> Path:
    return state_dir() / "runs"


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write `data` so that readers see the old file or the new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


@dataclass
class ProcRecord:
    """One process of a run."""

    pid: int
    start: int
    boot: str
    role: str
    rank: int | None
    run_id: str
    cmdline: str
    parent: tuple[int, int] | None = None  # (pid, start) of the process that started it
    worker_id: int | None = None

    def alive(self, boot: str) -> bool:
        """Still this very process (same boot, same pid, same start time)."""
        return self.boot == boot and proc_table.is_running(self.pid, self.start)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProcRecord:
        parent = data.get("parent")
        return cls(pid=int(data["pid"]), start=int(data["start"]), boot=str(data["boot"]), role=str(data["role"]),
                   rank=data.get("rank"), run_id=str(data["run_id"]), cmdline=str(data.get("cmdline", "")),
                   parent=(int(parent[0]), int(parent[1])) if parent else None, worker_id=data.get("worker_id"))


@dataclass
class RunRecord:
    """A run: its id and name, its root process, how it ended, and its processes' records."""

    id: str
    name: str = ""
    run_path: str = ""
    created: float = 0.0
    boot: str = ""
    root: tuple[int, int] | None = None  # the supervisor (or torchrun agent, or lone trainer)
    exit_code: int | None = None
    ended: float | None = None
    procs: list[ProcRecord] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return runs_dir() / self.id

    def root_alive(self, boot: str) -> bool:
        return self.root is not None and self.boot == boot and proc_table.is_running(*self.root)

    def root_role(self) -> str:
        """What the root process was (supervisor, agent, trainer), from its own record."""
        return next((r.role for r in self.procs if self.root and (r.pid, r.start) == self.root), "root")

    def meta(self) -> dict[str, Any]:
        data = asdict(self)
        del data["procs"]
        return data


def register_process(run_id: str, role: str, *, pid: int | None = None, rank: int | None = None,
                     parent: tuple[int, int] | None = None, cmdline: str | None = None,
                     worker_id: int | None = None) -> ProcRecord:
    """Record a process (by default this one) as part of `run_id`."""
    pid = os.getpid() if pid is None else pid
    start = proc_table.start_ticks(pid)
    if start is None:
        raise ProcessLookupError(pid)
    if cmdline is None:
        cmdline = " ".join(proc_table.read_argv(pid))
    record = ProcRecord(pid=pid, start=start, boot=proc_table.boot_id(), role=role, rank=rank, run_id=run_id,
                        cmdline=cmdline, parent=parent, worker_id=worker_id)
    write_json(runs_dir() / run_id / "procs" / f"{pid}-{start}.json", asdict(record))
    return record


def write_run(run: RunRecord) -> None:
    write_json(run.path / "run.json", run.meta())


def create_run(run_id: str, name: str, run_path: str, root: tuple[int, int]) -> RunRecord:
    """Write run.json for a new run rooted at `root` (pid, start)."""
    run = RunRecord(id=run_id, name=name, run_path=run_path, created=time.time(), boot=proc_table.boot_id(),
                    root=root)
    write_run(run)
    return run


def load_run(path: Path) -> RunRecord | None:
    """A run and its process records; None when run.json is missing or unreadable."""
    try:
        meta = json.loads((path / "run.json").read_text())
        root = meta.get("root")
        run = RunRecord(id=str(meta["id"]), name=str(meta.get("name", "")), run_path=str(meta.get("run_path", "")),
                        created=float(meta.get("created", 0.0)), boot=str(meta.get("boot", "")),
                        root=(int(root[0]), int(root[1])) if root else None, exit_code=meta.get("exit_code"),
                        ended=meta.get("ended"))
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
    procs_dir = path / "procs"
    if procs_dir.is_dir():
        for entry in sorted(procs_dir.glob("*.json")):
            try:
                run.procs.append(ProcRecord.from_dict(json.loads(entry.read_text())))
            except (OSError, ValueError, KeyError, TypeError, IndexError):
                continue  # a record removed or replaced while we read: skip it
    return run


def load_runs() -> list[RunRecord]:
    """Every run in the registry, oldest first."""
    base = runs_dir()
    if not base.is_dir():
        return []
    runs = [run for entry in base.iterdir() if entry.is_dir() and (run := load_run(entry)) is not None]
    return sorted(runs, key=lambda r: r.created)


def finish_run(run: RunRecord, exit_code: int) -> None:
    """Record how the run ended and drop the records of its processes (all gone by now), with their
    heartbeats and stack-dump files (runner/procs/heartbeat.py, stacks.py)."""
    run.exit_code, run.ended = exit_code, time.time()
    write_run(run)
    for folder in ("procs", "heartbeat", "stacks"):
        shutil.rmtree(run.path / folder, ignore_errors=True)


def prune(keep_days: float = KEEP_DAYS, now: float | None = None) -> None:
    """Forget runs that ended (or, root killed, started) over `keep_days` ago and have nothing running."""
    now = time.time() if now is None else now
    boot = proc_table.boot_id()
    for run in load_runs():
        if now - (run.ended or run.created) < keep_days * 86400 or run.root_alive(boot):
            continue
        if not any(record.alive(boot) for record in run.procs):
            shutil.rmtree(run.path, ignore_errors=True)


def forget_dead_records(run: RunRecord, boot: str) -> None:
    """Remove the records of a run's processes that no longer exist."""
    for record in run.procs:
        if not record.alive(boot):
            (run.path / "procs" / f"{record.pid}-{record.start}.json").unlink(missing_ok=True)
