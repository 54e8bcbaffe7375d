"""The stall watch for an own loop, which has no supervisor to run it: this rank's heartbeat and
stack-dump registration (as runner/train/run.py does for a trainer), a watcher process per node
(`python -m runner.procs.stall_watch`, started by local rank 0, ending when that rank does), and on the
writer rank the feed that brings its findings to the dashboards and findings.json.

The watcher runs in a session of its own: a terminal's Ctrl+C is for the loop, not for it (it ends
within a poll of its parent's end). Without a run id (the registry is not writable) nothing is watched.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable

from runner.config import TrainConfig
from runner.diagnosis.stall_feed import StallFeed
from runner.procs import heartbeat, stacks
from runner.telemetry.events import Event

log = logging.getLogger("runner")


class OwnLoopWatch:
    """`start()` at the run's start, `step(n)` per step, `stop()` at its end (idempotent)."""

    def __init__(self, cfg: TrainConfig, run_id: str | None, rank: int, world: int) -> None:
        self.cfg, self.run_id, self.rank, self.world = cfg, run_id, rank, world
        self.watcher: subprocess.Popen | None = None
        self.feed: StallFeed | None = None

    @property
    def off(self) -> bool:
        return self.run_id is None or str(self.cfg.stall_timeout) in ("0", "0.0")

    def start(self) -> OwnLoopWatch:
        """Heartbeat and stacks for this rank, and the watcher on local rank 0: before the process group,
        whose joining may hang too."""
        if self.run_id is None:
            return self
        heartbeat.install(self.run_id, self.rank, self.world)
        stacks.register(self.run_id, "rank" if "TORCHELASTIC_RUN_ID" in os.environ else "trainer", self.rank)
        heartbeat.enter("start-up")
        if not self.off and os.environ.get("LOCAL_RANK", "0") == "0":
            cmd = [sys.executable, "-m", "runner.procs.stall_watch", "--run-id", self.run_id,
                   "--run-path", str(self.cfg.run_path), "--stall-timeout", str(self.cfg.stall_timeout),
                   "--on-stall", self.cfg.on_stall, "--name", self.cfg.name]
            try:
                self.watcher = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True)
            except OSError as exc:
                log.warning("stall watch not started (%s): a stalled loop will not be reported", exc)
        return self

    def feed_into(self, emit: Callable[[Event], None]) -> None:
        """The writer rank: the watcher's findings into the hub (dashboards, findings.json)."""
        if not self.off:
            self.feed = StallFeed(self.cfg.run_path, emit).start()

    @staticmethod
    def step(step: int) -> None:
        heartbeat.set_step(step)  # a write into shared memory

    def stop(self) -> None:
        heartbeat.enter("ended")
        if self.feed is not None:
            self.feed.stop()
            self.feed = None
        if self.watcher is not None:
            if self.watcher.poll() is None:
                self.watcher.send_signal(signal.SIGTERM)  # it exits 0 on SIGTERM
            try:
                self.watcher.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.watcher.kill()
                self.watcher.wait()
            self.watcher = None
        heartbeat.uninstall()
        stacks.unregister()
