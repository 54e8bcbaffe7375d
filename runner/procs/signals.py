"""Graceful stop: the first SIGINT/SIGTERM/SIGHUP asks the loop to stop after the current step;
the second kills the run's process group at once."""

from __future__ import annotations

import os
import signal
import sys

HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class GracefulStop:
    """Install with `install()`; the loop polls `reason()` (a plain attribute read per step)."""

    def __init__(self) -> None:
        self.requested: str | None = None

    def install(self) -> "GracefulStop":
        for sig in HANDLED:
            signal.signal(sig, self._handle)  # re-arms SIGINT even if inherited as ignored (`cmd &`)
        return self

    def _handle(self, signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if self.requested is None:
            self.requested = name
            print(f"runner: {name}: stopping after this step (checkpoint, flush); again to kill now",
                  file=sys.stderr, flush=True)
            return
        print(f"runner: second {name}: killing the run now", file=sys.stderr, flush=True)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        try:
            if os.getpgid(0) == os.getpid():
                os.killpg(0, signal.SIGKILL)
        finally:
            os._exit(128 + signum)

    def reason(self) -> str | None:
        return self.requested
