"""Ranks → supervisor: short notes that change how the supervisor ends a DDP run (no torch).

The supervisor makes a private folder and names it, with itself ("pid:start"), in the environment
of torchrun and so of every local rank. A rank writes a note there and sends SIGUSR1 to the
supervisor (through a pidfd opened after checking its start time: never to a process that reused
its pid). Notes:

- `alive-<local rank>`: this rank began a training step or a collective after a stop signal, so it is
  not blocked in data loading; when every local rank has said so, the ranks will agree on a step to
  stop after and the supervisor waits for them (otherwise it ends the run a few seconds after the
  signal, as a second Ctrl+C would).
- `failed-<pid>`: the rank failed (its one-line reason inside); without restarts left to torchrun,
  the supervisor ends the other ranks at once instead of letting them wait in a collective.

Without a supervisor (a user's own torchrun) the variables are absent and nothing is sent.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

from runner.procs import proc_table

DIR_ENV = "RUNNER_CONTROL_DIR"
SUPERVISOR_ENV = "RUNNER_SUPERVISOR"
NOTICE = signal.SIGUSR1


def _supervisor() -> tuple[Path, int, int] | None:
    folder, who = os.environ.get(DIR_ENV), os.environ.get(SUPERVISOR_ENV, "")
    pid, _, start = who.partition(":")
    if not folder or not pid.isdigit() or not start.isdigit():
        return None
    return Path(folder), int(pid), int(start)


def tell(name: str, text: str = "") -> bool:
    """Write note `name` and notify the supervisor; False when there is none (or it is gone)."""
    found = _supervisor()
    if found is None:
        return False
    folder, pid, start = found
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        if not proc_table.is_same_process(pid, start):
            return False
        tmp = folder / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(folder / name)  # the supervisor never reads half a note
        signal.pidfd_send_signal(fd, NOTICE)
        return True
    except OSError:  # the folder is gone, or the supervisor (ProcessLookupError)
        return False
    finally:
        os.close(fd)


@dataclass
class Notes:
    """What the ranks have said so far."""

    alive: set[int] = field(default_factory=set)
    failed: dict[int, str] = field(default_factory=dict)  # pid → one-line reason

    @classmethod
    def read(cls, folder: Path) -> Notes:
        notes = cls()
        for path in folder.iterdir():
            kind, _, which = path.name.partition("-")
            if not which.isdigit():
                continue
            if kind == "alive":
                notes.alive.add(int(which))
            elif kind == "failed":
                try:
                    notes.failed[int(which)] = path.read_text().strip()
                except OSError:
                    continue
        return notes
