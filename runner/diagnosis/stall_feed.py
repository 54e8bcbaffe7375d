"""The stall watch's findings into this process's hub, so that they reach the dashboards and findings.json.

The stall watch runs in another process (the supervisor, or a stand-alone watcher) and has no hub: it
appends each finding to `runs/<name>/stall/findings.jsonl` (runner/procs/stall_watch.py). In the writer
rank a small daemon thread reads the new lines every `POLL` seconds and emits them as `Finding` events
(tag "findings/stall"): the diagnosis sink records them in findings.json, TensorBoard and Visdom show
them; the console sink leaves them alone (the watch printed them). It runs beside the training thread,
never on it, so it works while that thread is the one that is stuck. It counts what it delivered in
`stall/.fed`, after flushing the sinks (`flush`: Hub.flush), which `--on-stall stop` waits for before it
ends the run: the run's files then hold its last step and the finding.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path

from runner.procs.stall_watch import FED, FINDINGS, stall_dir
from runner.telemetry import tags
from runner.telemetry.events import Event, Finding

POLL = 0.5  # seconds between looks at findings.jsonl
FLUSH_WAIT = 2.0  # seconds the hub's flush may take after a finding (a hung dashboard is not waited for longer)

log = logging.getLogger("runner.telemetry")


def to_finding(record: dict) -> Finding:
    """A findings.jsonl line as the event the sinks take."""
    return Finding(tag=tags.STALL_FINDINGS, step=int(record.get("step", 0)), rank=int(record.get("rank", 0)),
                   kind=str(record.get("kind", "stalled")), severity=str(record.get("severity", "error")),
                   message=str(record.get("message", "")), evidence=dict(record.get("evidence") or {}),
                   advice=str(record.get("advice", "")))


class StallFeed:
    """`start()` a thread that emits every finding appended to `<run>/stall/findings.jsonl`; `stop()`."""

    def __init__(self, run_path: Path, emit: Callable[[Event], None], poll: float = POLL,
                 flush: Callable[[float], object] | None = None) -> None:
        self.folder = stall_dir(Path(run_path))
        self.emit, self.poll, self.flush = emit, poll, flush
        self.offset = self._size()  # findings of an earlier attempt of this run are already in findings.json
        self.delivered = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stall-feed", daemon=True)

    def _size(self) -> int:
        try:
            return (self.folder / FINDINGS).stat().st_size
        except OSError:
            return 0

    def start(self) -> StallFeed:
        self._mark_fed()
        self._thread.start()
        return self

    def _mark_fed(self) -> None:
        if not self.folder.is_dir():  # no stall yet: the run folder gets no stall/ of its own
            return
        try:
            tmp = self.folder / f"{FED}.tmp"
            tmp.write_text(str(self.delivered))
            tmp.replace(self.folder / FED)
        except OSError:
            pass

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2 * self.poll + 1)

    def _run(self) -> None:
        while not self._stop.wait(self.poll):
            try:
                self.check()
            except Exception:
                log.debug("stall feed failed", exc_info=True)

    def check(self) -> int:
        """Emit the complete lines added since the last look; returns how many."""
        if self._size() <= self.offset:
            return 0
        with open(self.folder / FINDINGS, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        complete = data[:data.rfind(b"\n") + 1]  # a line still being written waits for the next look
        self.offset += len(complete)
        emitted = 0
        for line in complete.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                self.emit(to_finding(record))
                emitted += 1
        if emitted:
            if self.flush is not None:  # on disk before `.fed` says so: --on-stall stop ends the run next
                self.flush(FLUSH_WAIT)
            self.delivered += emitted
            self._mark_fed()
        return emitted
