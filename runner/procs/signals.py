"""Graceful stop for the trainer: SIGINT, SIGTERM and SIGHUP are handled alike.

The first asks the loop to stop after the current step (it then writes the checkpoint, flushes the
sinks, shuts the DataLoader down and exits 130/143/129); while the loop waits for a batch (a worker
may be blocked in `__getitem__` for good) the first signal ends the wait at once. The second kills
the run's process group at once. Under DDP the ranks agree on the step at a log point; a rank blocked
in data loading never gets there, which the supervisor sees (control.py) and ends the run itself.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

_installed: GracefulStop | None = None  # signal handlers are per process: so is the one GracefulStop


class StopRequested(Exception):
    """Raised out of a wait marked `interruptible()` by the first stop signal."""


class GracefulStop:
    """Install with `install()`; the loop polls `reason()` (a plain attribute read per step)."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._waiting = False

    def install(self) -> GracefulStop:
        global _installed
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)  # re-arms SIGINT even if inherited as ignored (`cmd &`)
        _installed = self
        return self

    def _handle(self, signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if self.requested is None:
            self.requested = name
            print(f"runner: {name}: stopping after this step (checkpoint, flush); again to kill now",
                  file=sys.stderr, flush=True)
            if self._waiting:
                raise StopRequested(name)
            return
        print(f"runner: second {name}: killing the run now", file=sys.stderr, flush=True)
        try:
            if os.getpgid(0) == os.getpid():  # our own group (supervised trainer, torchrun rank): all of it
                os.killpg(0, signal.SIGKILL)
        finally:
            os._exit(128 + signum)  # workers without us die by their guard

    def reason(self) -> str | None:
        return self.requested

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """Mark a wait (for the next batch) that the first stop signal may end with StopRequested."""
        if self.requested is not None:
            raise StopRequested(self.requested)
        self._waiting = True
        try:
            yield
        finally:
            self._waiting = False


def stop_requested() -> str | None:
    """The stop signal this process got (its name), or None; None too where no GracefulStop is installed."""
    return _installed.requested if _installed is not None else None


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold stop signals back while DataLoader workers start: they inherit the blocked mask and ignore
    the signals before unblocking them (worker_guard), so a Ctrl+C never hits a half-started worker.
    Signals that arrive meanwhile reach this process when the block ends."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
