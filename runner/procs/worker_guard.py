"""A DataLoader `worker_init_fn` guard: the worker dies when its parent dies, under every start method.

`PR_SET_PDEATHSIG` misses forkserver workers (their parent is the forkserver); a daemon thread
blocked on `multiprocessing.parent_process().join()` sees the real parent go, for fork, spawn and
forkserver alike, and then kills the worker.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from collections.abc import Callable


def _watch_parent() -> None:
    parent = multiprocessing.parent_process()
    if parent is None:
        return
    parent.join()  # returns when the parent process is gone (its sentinel closes)
    os.kill(os.getpid(), signal.SIGKILL)


class guarded_worker_init:  # noqa: N801 - used like a function: worker_init_fn=guarded_worker_init(fn)
    """Picklable worker_init_fn: starts the parent watch, then calls the user's own init (if any)."""

    def __init__(self, user_fn: Callable[[int], None] | None) -> None:
        self.user_fn = user_fn

    def __call__(self, worker_id: int) -> None:
        threading.Thread(target=_watch_parent, name="parent-watch", daemon=True).start()
        if self.user_fn is not None:
            self.user_fn(worker_id)
