"""Ending processes safely: through pidfds opened after re-checking the start time, in a fixed order.

A pid alone can be reused between the moment a process is chosen and the moment it is signalled;
a pidfd opened while `/proc/PID/stat` still shows the recorded start time names that very
process for as long as the fd is open, so every signal sent through it reaches the right one.

Order: the torchrun agent first (it restarts ranks that die under it), then ranks and trainers,
then DataLoader workers and anything else, then forkservers, then resource trackers (which ignore
SIGTERM and exit by themselves, unlinking what they track, once everyone else is gone).
Each phase: SIGTERM, wait up to `grace` seconds, SIGKILL what is left.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from dataclasses import dataclass

from runner.procs import proc_table
from runner.procs.proc_table import Proc

PHASES = ("agent", "rank", "worker", "forkserver", "tracker")
KILL_WAIT = 2.0  # seconds for SIGKILLed processes to be gone


@dataclass(frozen=True)
class Target:
    """A process to end: pid and start time (its identity), and its phase in the kill order."""

    pid: int
    start: int
    phase: str


def phase_of(proc: Proc, role: str | None = None) -> str:
    """Where `proc` goes in the kill order."""
    if role == "agent" or proc.comm == "pt_elastic":
        return "agent"
    if proc.is_tracker:
        return "tracker"
    if proc.is_forkserver:
        return "forkserver"
    if role == "worker" or proc.is_data_worker:
        return "worker"
    if role in ("trainer", "rank", "supervisor") or "LOCAL_RANK" in proc.environ:
        return "rank"
    return "worker"


def open_pidfd(pid: int, start: int) -> int | None:
    """A pidfd for the process (pid, start), or None when it is gone or its pid now names another one."""
    try:
        fd = os.pidfd_open(pid)
    except (ProcessLookupError, OSError):
        return None
    if not proc_table.is_same_process(pid, start):
        os.close(fd)
        return None
    return fd


def _send(fd: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(fd, sig)


def _wait_gone(fds: dict[int, Target], deadline: float) -> None:
    """Remove from `fds` every process that exits before `deadline` (a pidfd is readable once it has)."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    while fds:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        for fd, _event in poller.poll(max(1, int(remaining * 1000))):
            poller.unregister(fd)
            os.close(fd)
            del fds[fd]


def terminate(targets: list[Target], grace: float) -> list[Target]:
    """End `targets` phase by phase (SIGTERM, `grace` seconds, SIGKILL). Returns those still alive."""
    opened = {t: fd for t in targets if (fd := open_pidfd(t.pid, t.start)) is not None}
    left: list[Target] = []
    for phase in PHASES:
        fds = {fd: t for t, fd in opened.items() if t.phase == phase}
        if not fds:
            continue
        if phase != "tracker":  # trackers ignore SIGTERM; they leave once their clients are gone
            for fd in fds:
                _send(fd, signal.SIGTERM)
        _wait_gone(fds, time.monotonic() + grace)
        for fd in fds:
            _send(fd, signal.SIGKILL)
        _wait_gone(fds, time.monotonic() + KILL_WAIT)
        left += fds.values()
        for fd in fds:
            os.close(fd)
    return left


def wait_gone(targets: list[Target], timeout: float) -> list[Target]:
    """Wait up to `timeout` seconds for `targets` to exit by themselves; returns those still alive."""
    fds = {fd: t for t in targets if (fd := open_pidfd(t.pid, t.start)) is not None}
    _wait_gone(fds, time.monotonic() + timeout)
    for fd in fds:
        os.close(fd)
    return list(fds.values())


def kill_now(targets: list[Target]) -> None:
    """SIGKILL every target at once (the second Ctrl+C)."""
    for t in targets:
        fd = open_pidfd(t.pid, t.start)
        if fd is not None:
            _send(fd, signal.SIGKILL)
            os.close(fd)
