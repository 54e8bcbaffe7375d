"""Which processes `runner cleanup` may end, and why: the candidate rules and the never-rules.

Candidates
- registered processes of a run whose root (supervisor, else torchrun agent, else lone trainer) is gone;
- processes carrying the tag (RUNNER_RUN_ID) of such a run;
- untracked orphans, by "logical parent gone": a DataLoader worker whose trainer is gone, a
  forkserver or resource tracker whose owner is gone, a torchrun rank whose agent is gone;
- descendants of candidates.
"Gone" for a logical parent: no such process, a zombie, or a process running another program
(the orphan was reparented to PID 1 or a subreaper). For a forkserver's child the logical parent is
the forkserver's parent. `ppid == 1` alone proves nothing (a nohup'd job has it).

Never: other users' processes, the caller and its ancestors, PID 1, kernel threads, processes of
live runs (registered, tagged, or below a live root), anything matched by name alone,
torch_shm_manager.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

from runner.procs import proc_table
from runner.procs.proc_table import Proc
from runner.procs.registry import RunRecord
from runner.procs.run_tag import ROOT_ENV, TAG_ENV, parse_root

NEVER_COMMS = ("torch_shm_manager",)
# Untagged, unregistered processes that are left-overs by their role alone, once their parent is gone.
ORPHAN_RULES = {"worker": "DataLoader worker whose trainer is gone", "forkserver": "forkserver whose owner is gone",
                "tracker": "resource tracker whose owner is gone", "rank": "torchrun rank whose agent is gone"}


@dataclass
class Candidate:
    proc: Proc
    role: str
    run_id: str | None
    reason: str


def inferred_role(proc: Proc) -> str:
    if proc.comm == "pt_elastic":
        return "agent"
    if proc.is_forkserver:
        return "forkserver"
    if proc.is_tracker:
        return "tracker"
    if proc.is_data_worker:
        return "worker"
    if "LOCAL_RANK" in proc.environ and "TORCHELASTIC_RUN_ID" in proc.environ:
        return "rank"
    return "process"


class _Runs:
    """Which runs are live: by the registry's root record or by the root named in a process's tag."""

    def __init__(self, runs: list[RunRecord], boot: str) -> None:
        self.by_id = {run.id: run for run in runs if run.boot == boot}
        self._live: dict[str, bool] = {}
        self._roots: dict[str, int] = {}
        for run in self.by_id.values():
            if run.root is not None:
                self._note(run.id, run.root, run.root_alive(boot))

    def _note(self, run_id: str, root: tuple[int, int], live: bool) -> None:
        self._live[run_id] = live
        if live:
            self._roots[run_id] = root[0]

    def note_tag(self, run_id: str, root: tuple[int, int] | None) -> None:
        if root is not None and not self._live.get(run_id, False):
            self._note(run_id, root, proc_table.is_running(*root))

    def live(self, run_id: str) -> bool | None:
        """True/False when known; None when nothing tells (then the run is left alone)."""
        return self._live.get(run_id)

    def roots(self) -> list[int]:
        """The root pids of live runs."""
        return list(self._roots.values())


def _logical_parent(proc: Proc, table: dict[int, Proc]) -> Proc | None:
    """The process that started `proc`, as far as the table tells: for a forkserver's child, the
    forkserver's parent."""
    parent = table.get(proc.ppid)
    if parent is not None and parent.is_forkserver and not proc.is_forkserver:
        return table.get(parent.ppid)
    return parent


def _gone(proc: Proc, parent: Proc | None) -> bool:
    """Whether `parent` cannot be what started `proc` (False when we cannot tell)."""
    return bool(proc.exe) and (parent is None or parent.is_zombie or parent.exe != proc.exe)


def _run_tags(mine: dict[int, Proc], known: _Runs) -> dict[int, str]:
    """pid → the run its environment is tagged with; each tag also tells `known` its run's root."""
    tags: dict[int, str] = {}
    for pid, proc in mine.items():
        run_id = proc.environ.get(TAG_ENV)
        if run_id:
            tags[pid] = run_id
            known.note_tag(run_id, parse_root(proc.environ.get(ROOT_ENV)))
    return tags


def _protected(table: dict[int, Proc], mine: dict[int, Proc], tags: dict[int, str], known: _Runs, boot: str,
               caller: int) -> set[int]:
    """Never candidates: init and the caller's ancestors, NEVER_COMMS, and whatever belongs to a live run."""
    protected = set(proc_table.ancestors(table, caller)) | {1}
    protected |= {pid for pid, p in mine.items() if p.comm in NEVER_COMMS}
    protected |= {pid for pid, run_id in tags.items() if known.live(run_id)}
    for run in known.by_id.values():
        if known.live(run.id):
            protected |= {r.pid for r in run.procs if r.alive(boot)}
    for root in known.roots():
        protected |= {root, *proc_table.descendants(table, root)}
    return protected


def _orphans_by_role(table: dict[int, Proc], mine: dict[int, Proc],
                     untagged: set[int]) -> Iterator[tuple[int, str, str]]:
    """(pid, role, reason) of each untagged process that ORPHAN_RULES and a gone parent make a left-over."""
    for pid in untagged:
        proc = mine[pid]
        role = inferred_role(proc)
        rule = ORPHAN_RULES.get(role)
        parent = _logical_parent(proc, table)
        if rule and _gone(proc, parent):
            yield pid, role, f"{rule} (now under {parent.comm if parent else '?'} {parent.pid if parent else ''})"


def find_candidates(table: dict[int, Proc], runs: list[RunRecord], boot: str, caller: int) -> list[Candidate]:
    """Every candidate in `table`, with its reason; never-rules applied."""
    uid = os.getuid()
    mine = {pid: p for pid, p in table.items() if p.uid == uid and not p.is_kernel_thread and not p.is_zombie}
    known = _Runs(runs, boot)
    tags = _run_tags(mine, known)
    protected = _protected(table, mine, tags, known, boot, caller)
    found: dict[int, Candidate] = {}

    def add(pid: int, role: str, run_id: str | None, reason: str) -> None:
        if pid in mine and pid not in protected and pid not in found:
            found[pid] = Candidate(mine[pid], role, run_id, reason)

    for run in known.by_id.values():
        if known.live(run.id) is False:
            root = f"{run.root_role()} {run.root[0]}" if run.root else "root"
            for record in (r for r in run.procs if r.alive(boot)):
                add(record.pid, record.role, run.id, f"{record.role} of run {run.id}, whose {root} is gone")
    for pid, run_id in tags.items():
        if known.live(run_id) is False:
            add(pid, inferred_role(mine[pid]), run_id, f"tagged with run {run_id}, whose root process is gone")
    for pid, role, reason in _orphans_by_role(table, mine, untagged=mine.keys() - tags.keys() - found.keys()):
        add(pid, role, None, reason)
    for pid, origin in list(found.items()):
        for child in (c for c in proc_table.descendants(table, pid) if c in mine):
            add(child, inferred_role(mine[child]), origin.run_id, f"descendant of {pid} ({origin.role})")
    return sorted(found.values(), key=lambda c: (c.proc.start, c.proc.pid))
