"""A DataLoader `worker_init_fn` guard, composed with the user's own init.

In each worker it
- ignores SIGINT, SIGTERM and SIGHUP: a terminal's Ctrl+C (sent to the whole foreground group) or
  torchrun's SIGTERM to a rank's group must reach the trainer only; the trainer stops after its
  step and shuts its workers down itself (no KeyboardInterrupt tracebacks from workers, no
  "worker exited unexpectedly" in the trainer);
- dies when its parent (the trainer) dies, under every start method. `PR_SET_PDEATHSIG` misses
  forkserver workers (their parent is the forkserver, which outlives the trainer); a daemon
  thread blocked on `multiprocessing.parent_process().join()` sees the real parent go, for fork,
  spawn and forkserver alike, and then kills the worker;
- records the worker in the run registry;
- registers its own faulthandler file, so that the stall watch can read its stacks (runner/procs/stacks.py).

`RUNNER_WORKER_GUARD=0` turns the parent watch off (to study orphans); the rest stays.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable

from runner.procs import proc_table, registry, stacks
from runner.procs.run_tag import TAG_ENV

GUARD_ENV = "RUNNER_WORKER_GUARD"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _watch_parent() -> None:
    parent = multiprocessing.parent_process()
    if parent is None:
        return
    parent.join()  # returns when the parent process is gone (its sentinel closes)
    os.kill(os.getpid(), signal.SIGKILL)


def _register(worker_id: int) -> None:
    run_id = os.environ.get(TAG_ENV)
    parent = multiprocessing.parent_process()
    if run_id is None or parent is None or parent.pid is None:
        return
    start = proc_table.start_ticks(parent.pid)
    # OSError: the trainer already warned that the registry is not writable; the tag still marks us.
    with contextlib.suppress(OSError):
        registry.register_process(run_id, "worker", rank=int(os.environ.get("RANK", "0")), worker_id=worker_id,
                                  parent=(parent.pid, start) if start is not None else None)


class guarded_worker_init:
    """Picklable worker_init_fn: signals, parent watch and registration, then the user's own init."""

    def __init__(self, user_fn: Callable[[int], None] | None) -> None:
        self.user_fn = user_fn

    def __call__(self, worker_id: int) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        # The trainer starts workers with these signals blocked (signals.deferred): now that they are
        # ignored, unblocking drops any that arrived meanwhile.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        if os.environ.get(GUARD_ENV, "1") != "0":
            threading.Thread(target=_watch_parent, name="parent-watch", daemon=True).start()
        _register(worker_id)
        # its own stack-dump file for the stall watch (a forked worker inherited its trainer's)
        stacks.register(os.environ.get(TAG_ENV), "worker", int(os.environ.get("RANK", "0")))
        if self.user_fn is not None:
            self.user_fn(worker_id)
