"""The run tag: environment variables that every process of a run carries from exec on.

`/proc/PID/environ` shows only the environment a process was exec'ed with, so the tag is set
before exec: by the supervisor for the trainer or torchrun (whose ranks, forkserver, resource
tracker and DataLoader workers inherit it), or, for a trainer started without a supervisor
(`python -m runner.train`, a user's own torchrun), at the trainer's start, before any worker
or helper process is started.

    RUNNER_RUN_ID    the run's id in the registry
    RUNNER_RUN_ROOT  "pid:start" of the process whose life is the run's life (supervisor, else
                     torchrun agent, else the trainer): a tagged process whose root is gone is
                     left over, whatever the registry says
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from runner.procs import proc_table, registry

TAG_ENV = "RUNNER_RUN_ID"
ROOT_ENV = "RUNNER_RUN_ROOT"

log = logging.getLogger("runner")


def format_root(root: tuple[int, int]) -> str:
    return f"{root[0]}:{root[1]}"


def parse_root(value: str | None) -> tuple[int, int] | None:
    try:
        pid, start = (value or "").split(":")
        return int(pid), int(start)
    except ValueError:
        return None


def new_run_id() -> str:
    """Unique on this machine: the time and this process's pid."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


@dataclass
class Membership:
    """This process's place in a run; `leave()` takes back the tag `join_run` put in os.environ (for a
    trainer run inside a longer-lived process: a test, a notebook)."""

    run_id: str | None
    set_tag: bool

    def leave(self) -> None:
        if self.set_tag:
            for name in (TAG_ENV, ROOT_ENV):
                os.environ.pop(name, None)


def join_run(name: str, run_path: str) -> Membership:
    """In a trainer or torchrun rank: tag the run (when no supervisor did) and register this process.

    The run id is None when the registry cannot be written (training goes on; cleanup then relies
    on the tag and on the orphan rules).
    """
    pid, ppid = os.getpid(), os.getppid()
    elastic = "TORCHELASTIC_RUN_ID" in os.environ
    parent_start = proc_table.start_ticks(ppid)
    parent = (ppid, parent_start) if parent_start is not None else None
    run_id = os.environ.get(TAG_ENV)
    membership = Membership(run_id, set_tag=run_id is None)
    try:
        if run_id is None:
            own = (pid, proc_table.start_ticks(pid) or 0)
            if elastic:  # a torchrun started by hand: the agent is the root, its run id is shared by all ranks
                run_id, root = f"torchrun-{os.environ['TORCHELASTIC_RUN_ID']}", parent or own
            else:
                run_id, root = new_run_id(), own
            os.environ[TAG_ENV], os.environ[ROOT_ENV] = run_id, format_root(root)
            membership.run_id = run_id
            if not (registry.runs_dir() / run_id / "run.json").exists():
                registry.create_run(run_id, name, run_path, root)
            if elastic and parent is not None:
                registry.register_process(run_id, "agent", pid=ppid)
        registry.register_process(run_id, "rank" if elastic else "trainer", rank=int(os.environ.get("RANK", "0")),
                                  parent=parent)
    except OSError as exc:
        log.warning("run registry %s not writable (%s): `runner cleanup` will go by process tags only",
                    registry.state_dir(), exc)
        membership.run_id = None
    return membership
