"""Counting host↔device syncs on CUDA, to prove that steps between log points add none.

Off unless `RUNNER_SYNC_DEBUG=<file.json>` is set and the run is on CUDA. Then, from the end of the
first log point (warm-up: cuDNN autotuning, lazy initialisation, the first grids and histograms),
`torch.cuda.set_sync_debug_mode("warn")` is on and every "called a synchronizing CUDA operation"
warning is counted where it happened: in the steady state, or inside `outside_steady_state()` (the
trainer wraps log points and checkpoints in it: they sync on purpose). Training-thread syncs are
told apart from other threads' (sinks copying tensors to the host). The counts, with the first
steady-state sites (file:line), are rewritten to the file after each log point and at `close()`.

The trainer's whole interface:
    sync = SyncDebug.from_env(device, rank)
    with sync.outside_steady_state(step): ...   # a log point, a checkpoint
    sync.close()
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ENV = "RUNNER_SYNC_DEBUG"
MESSAGE = "called a synchronizing CUDA operation"
SITES_KEPT = 20


class SyncDebug:
    """Counts sync warnings by phase; inactive (every method a no-op) unless built by `from_env` on CUDA."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.thread = threading.get_ident()
        self.armed = False
        self.paused = False
        self.steady = {"training_thread": 0, "other_threads": 0}
        self.sites: dict[str, int] = {}
        self.log_points: list[dict[str, int]] = []  # one per outside_steady_state(): step and syncs
        self.first_step: int | None = None
        self.last_step: int | None = None
        self._original: Any = None
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls, device: Any, rank: int = 0) -> SyncDebug:
        target = os.environ.get(ENV, "")
        if not target or getattr(device, "type", str(device)) != "cuda":
            return cls(None)
        return cls(Path(target if rank == 0 else f"{target}.rank{rank}"))

    @property
    def active(self) -> bool:
        return self.path is not None

    @contextlib.contextmanager
    def outside_steady_state(self, step: int) -> Iterator[None]:
        """Syncs inside are the log point's own; the first exit arms the steady-state count."""
        if not self.active:
            yield
            return
        self.paused = True
        self.log_points.append({"step": step, "syncs": 0})
        try:
            yield
        finally:
            self.paused = False
            if not self.armed:
                self._arm()
                self.first_step = step
                self.log_points.clear()  # the warm-up's log point is not steady either
            self.last_step = step
            self.write()

    def _arm(self) -> None:
        import torch

        self._original = warnings.showwarning
        warnings.filterwarnings("always", message=MESSAGE)
        warnings.showwarning = self._show
        torch.cuda.set_sync_debug_mode("warn")
        self.armed = True

    def _show(self, message: Any, category: Any, filename: str, lineno: int, file: Any = None,
              line: Any = None) -> None:
        if not str(message).startswith(MESSAGE):
            self._original(message, category, filename, lineno, file, line)
            return
        with self._lock:
            if self.paused and self.log_points:
                self.log_points[-1]["syncs"] += 1
            elif threading.get_ident() == self.thread:
                self.steady["training_thread"] += 1
                site = f"{filename}:{lineno}"
                if site in self.sites or len(self.sites) < SITES_KEPT:
                    self.sites[site] = self.sites.get(site, 0) + 1
            else:
                self.steady["other_threads"] += 1

    def report(self) -> dict[str, Any]:
        steps = self.last_step - self.first_step if self.first_step is not None and self.last_step is not None else 0
        return {"steady_steps": steps, "steady_syncs": dict(self.steady), "steady_sites": dict(self.sites),
                "log_points": list(self.log_points)}

    def write(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.report(), indent=1))
        tmp.replace(self.path)

    def close(self) -> None:
        """Sync debug mode off, warnings as they were, the report written."""
        if not self.armed:
            return
        import torch

        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = self._original
        self.armed = False
        self.write()
