"""The diagnosis sink: runs the rules on the hub's sink thread, emits findings back to the other sinks,
and keeps `findings.json` and `summary.json` in the run folder up to date (written whole, atomically).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from runner.diagnosis.rules import Rules
from runner.diagnosis.summary import RunSummary
from runner.telemetry import tags
from runner.telemetry.events import Event, Finding, HParams, LogPoint, MemorySample, Scalar, Sink, Text

log = logging.getLogger("runner.telemetry")

SUMMARY_EVERY_S = 1.0  # summary.json at most this often mid-run (steps may take a few ms each)


def write_json_atomic(path: Path, data: Any) -> None:
    """Readers see the old file or the new one, never a part of either."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def finding_record(finding: Finding) -> dict[str, Any]:
    """A finding as findings.json keeps it."""
    data = asdict(finding)
    return {key: data[key] for key in ("kind", "severity", "message", "evidence", "advice", "step", "rank")}


class DiagnosisSink(Sink):
    """Rules over the stream, findings out (through `bind`'s emit), the run's summary on disk."""

    accepts = (Scalar, MemorySample, Text, HParams, Finding, LogPoint)  # never images or histograms: stays cheap

    def __init__(self, run_path: Path, name: str, start_step: int = 0) -> None:
        self.run_path = Path(run_path)
        self.rules = Rules()
        self.summary = RunSummary(name, str(self.run_path.resolve()))
        self.findings: list[dict[str, Any]] = self._earlier(start_step) if start_step else []
        self._emit: Callable[[Event], None] | None = None
        self._written = 0.0
        self.run_path.mkdir(parents=True, exist_ok=True)
        self._write_summary()  # from the start: a run killed before its first log point still has one

    def _earlier(self, start_step: int) -> list[dict[str, Any]]:
        """On resume: the findings an earlier attempt raised up to the step this one goes on from."""
        try:
            found = json.loads((self.run_path / "findings.json").read_text())
        except (OSError, ValueError):
            return []
        if not isinstance(found, list):
            return []
        return [f for f in found if isinstance(f, dict) and f.get("step", 0) <= start_step]

    def bind(self, emit: Callable[[Event], None]) -> None:
        """The hub's emit: findings go to the other sinks (console, TensorBoard, Visdom) from this thread."""
        self._emit = emit

    def write(self, event: Event) -> None:
        if isinstance(event, Finding):
            self._record(event)  # raised elsewhere: the trainer's first_nonfinite (the hub never echoes ours)
            return
        self.summary.add(event)
        for finding in self.rules.observe(event):
            self._raise(finding)
        if isinstance(event, LogPoint) and time.monotonic() - self._written >= SUMMARY_EVERY_S:
            self._write_summary()  # a whole log point is in
        if isinstance(event, Text) and event.tag == tags.STATUS and self.summary.status != "running":
            self._write_summary()

    def _raise(self, finding: Finding) -> None:
        self._record(finding)
        if self._emit is not None:
            self._emit(finding)

    def _record(self, finding: Finding) -> None:
        self.findings.append(finding_record(finding))
        write_json_atomic(self.run_path / "findings.json", self.findings)

    def _write_summary(self) -> None:
        self._written = time.monotonic()
        write_json_atomic(self.run_path / "summary.json", self.summary.to_dict(self.findings))

    def flush(self) -> None:
        self._write_summary()

    def close(self) -> None:
        if self.summary.status == "running":  # closed without a final status (e.g. the hub of a bare Trainer)
            self.summary.status = "ended"
        if not (self.run_path / "findings.json").exists():
            write_json_atomic(self.run_path / "findings.json", self.findings)
        self._write_summary()
