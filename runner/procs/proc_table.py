"""A snapshot of the process table read straight from /proc (no psutil, no torch).

A process is named by (pid, start time): the start time, in clock ticks since boot from
/proc/PID/stat, is what tells a live process from a later one that reused its pid.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

PROC = Path("/proc")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
FORKSERVER_MARK = "multiprocessing.forkserver import main"
TRACKER_MARK = "multiprocessing.resource_tracker import main"
SPAWN_MARK = "--multiprocessing-fork"


def boot_id() -> str:
    """This boot's random id: start times are only comparable within one boot."""
    return (PROC / "sys/kernel/random/boot_id").read_text().strip()


def uptime_ticks() -> int:
    return int(float((PROC / "uptime").read_text().split()[0]) * CLOCK_TICKS)


def _stat_fields(pid: int) -> tuple[str, list[str]]:
    """(comm, fields after the comm) of /proc/PID/stat; OSError if the process is gone."""
    raw = (PROC / str(pid) / "stat").read_bytes().decode(errors="replace")
    open_paren, close_paren = raw.index("("), raw.rindex(")")
    return raw[open_paren + 1:close_paren], raw[close_paren + 2:].split()


def start_ticks(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot, or None when no such process exists."""
    try:
        return int(_stat_fields(pid)[1][19])
    except (OSError, IndexError, ValueError):
        return None


def read_argv(pid: int) -> list[str]:
    """The command line of `pid` (empty when gone or a kernel thread)."""
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def is_same_process(pid: int, start: int) -> bool:
    """Whether `pid` is still the process that started at `start` (not gone, not a reused pid)."""
    return start_ticks(pid) == start


def is_running(pid: int, start: int) -> bool:
    """`is_same_process`, and not a zombie waiting to be reaped."""
    try:
        _comm, f = _stat_fields(pid)
        return int(f[19]) == start and f[0] not in ("Z", "X")
    except (OSError, IndexError, ValueError):
        return False


@dataclass
class Proc:
    """One process as /proc showed it; cmdline, environ and exe are read on first use."""

    pid: int
    ppid: int
    pgid: int
    uid: int
    comm: str
    state: str
    start: int  # clock ticks since boot
    rss: int  # bytes
    children: list[int] = field(default_factory=list)

    @classmethod
    def read(cls, pid: int) -> Proc | None:
        try:
            comm, f = _stat_fields(pid)
            uid = os.stat(PROC / str(pid)).st_uid
        except (OSError, ValueError):
            return None
        return cls(pid=pid, ppid=int(f[1]), pgid=int(f[2]), uid=uid, comm=comm, state=f[0],
                   start=int(f[19]), rss=int(f[21]) * PAGE_SIZE)

    @cached_property
    def argv(self) -> list[str]:
        return read_argv(self.pid)

    @property
    def cmdline(self) -> str:
        return " ".join(self.argv)

    @cached_property
    def environ(self) -> dict[str, str]:
        """The exec-time environment (empty when unreadable: another user's process)."""
        try:
            raw = (PROC / str(self.pid) / "environ").read_bytes()
        except OSError:
            return {}
        env = {}
        for item in raw.split(b"\0"):
            key, sep, value = item.partition(b"=")
            if sep:
                env[key.decode(errors="replace")] = value.decode(errors="replace")
        return env

    @cached_property
    def exe(self) -> str:
        try:
            return os.readlink(PROC / str(self.pid) / "exe")
        except OSError:
            return ""

    @property
    def is_zombie(self) -> bool:
        return self.state in ("Z", "X")

    @property
    def is_kernel_thread(self) -> bool:
        return self.pid == 2 or self.ppid == 2

    @property
    def is_forkserver(self) -> bool:  # its children share its command line until they exec or rename
        return FORKSERVER_MARK in self.cmdline and not self.is_data_worker

    @property
    def is_tracker(self) -> bool:
        return TRACKER_MARK in self.cmdline and not self.is_data_worker

    @property
    def is_data_worker(self) -> bool:
        return self.comm == "pt_data_worker"

    def age_s(self, now_ticks: int) -> float:
        return max(0, now_ticks - self.start) / CLOCK_TICKS


def snapshot() -> dict[int, Proc]:
    """Every process visible in /proc, with children lists filled in."""
    table: dict[int, Proc] = {}
    for entry in os.scandir(PROC):
        if entry.name.isdigit():
            proc = Proc.read(int(entry.name))
            if proc is not None:
                table[proc.pid] = proc
    for proc in table.values():
        parent = table.get(proc.ppid)
        if parent is not None:
            parent.children.append(proc.pid)
    return table


def descendants(table: dict[int, Proc], root: int) -> list[int]:
    """Pids below `root` in the snapshot, parents before children."""
    out: list[int] = []
    stack = list(table[root].children) if root in table else []
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack.extend(table[pid].children)
    return out


def ancestors(table: dict[int, Proc], pid: int) -> list[int]:
    """`pid` and every parent up to PID 1."""
    chain: list[int] = []
    while pid in table and pid not in chain:
        chain.append(pid)
        pid = table[pid].ppid
    return chain
