"""The run's summary as the event stream tells it: status, steps, throughput, time breakdown, memory.

Kept by the diagnosis sink and written to `runs/<name>/summary.json`; `runner report` reads it back.
"""

from __future__ import annotations

import math
import os
import re
import time
from typing import Any

from runner.procs import heartbeat, proc_table
from runner.telemetry import tags
from runner.telemetry.events import Event, HParams, MemorySample, Scalar, Text

# Per-layer norms stay out.
SUMMARY_PREFIXES = (tags.TRAIN, tags.VAL, tags.TIME, tags.TELEMETRY, tags.MEMORY, tags.SYSTEM)
PER_RANK = re.compile(r"/rank\d+$")
ENDED = (("finished", "finished"), ("stopped", "stopped"), ("failed", "failed"))


def _number(value: float) -> float | str:
    """JSON has no NaN/inf: those become strings."""
    return value if math.isfinite(value) else str(value)


class RunSummary:
    """Latest scalars, peaks of every memory reading, status and the writer process's identity."""

    def __init__(self, name: str, run_path: str) -> None:
        self.name, self.run_path = name, run_path
        self.status, self.status_text = "running", ""
        self.started = time.time()
        self.step, self.total_steps = 0, 0
        self.progress_time = self.started  # when `step` last went up
        self.scalars: dict[str, float] = {}
        self.peaks: dict[str, float] = {}  # memory/<key>[/rank<r>] → highest reading
        self.throughput: list[float] = []  # samples/s at each log point
        self.texts: dict[str, str] = {}  # the latest of a few texts: device line, memory estimate table
        pid = os.getpid()
        self.process = {"pid": pid, "start": proc_table.start_ticks(pid), "boot": proc_table.boot_id()}

    def add(self, event: Event) -> None:
        if event.step > self.step:
            self.step, self.progress_time = event.step, time.time()
        if isinstance(event, Scalar):
            if event.tag.startswith(SUMMARY_PREFIXES):
                value = float(event.value)
                self.scalars[event.tag] = value
                if event.tag == tags.SAMPLES_PER_S and math.isfinite(value):
                    self.throughput.append(value)
        elif isinstance(event, MemorySample):
            for tag, value in event.series().items():
                peak = tag.startswith(tags.MEMORY) and "host_available" not in tag
                if peak and value > self.peaks.get(tag, -math.inf):
                    self.peaks[tag] = value
        elif isinstance(event, Text):
            self._text(event)
        elif isinstance(event, HParams) and event.status:
            self.status = next((s for prefix, s in ENDED if event.status.startswith(prefix)), self.status)

    def _text(self, event: Text) -> None:
        if event.tag == tags.STATUS:
            self.status_text = event.text
            if event.text.startswith("training "):
                self.texts["started"] = event.text
                if found := re.search(r"steps \d+→(\d+)", event.text):
                    self.total_steps = int(found[1])
            for prefix, status in ENDED:
                if event.text.startswith(prefix):
                    self.status = status
        elif event.tag in (tags.MEMORY_ESTIMATE, tags.MEMORY_OOM, tags.AUTO_BATCH, tags.BEST):
            self.texts[event.tag] = event.text

    def time_breakdown(self) -> dict[str, Any]:
        """Milliseconds per step at the latest log point, by part, plus per-rank step times under DDP."""
        parts = {p: self.scalars[tags.time_ms(p)] for p in tags.TIME_PARTS if tags.time_ms(p) in self.scalars}
        out: dict[str, Any] = {"parts_ms": parts}
        if tags.STEP_MS in self.scalars:
            out["step_ms"] = self.scalars[tags.STEP_MS]
        ranks = {tag.rsplit("/", 1)[1]: v for tag, v in self.scalars.items() if tag.startswith(tags.STEP_MS + "/rank")}
        if ranks:
            out["step_ms_by_rank"] = ranks
            out["slowest_rank"] = self.scalars.get(tags.SLOWEST_RANK)
            out["skew"] = self.scalars.get(tags.TIME_SKEW)
        return out

    def _progress(self) -> dict[str, Any]:
        """The last step seen and when it came; the writer rank's phase (its heartbeat) when written."""
        progress: dict[str, Any] = {"step": self.step, "time": self.progress_time}
        beat = heartbeat.current()
        if beat is not None:
            progress.update(phase=beat.phase_name, phase_since=beat.since)
        return progress

    def to_dict(self, findings: list[dict[str, Any]]) -> dict[str, Any]:
        now = time.time()
        severities: dict[str, int] = {}
        for finding in findings:
            severities[finding["severity"]] = severities.get(finding["severity"], 0) + 1
        scalars = {k: _number(v) for k, v in self.scalars.items() if not PER_RANK.search(k) or k.startswith(tags.TIME)}
        estimate = {k[len(tags.ESTIMATE):]: v for k, v in self.scalars.items() if k.startswith(tags.ESTIMATE)}
        return {
            "name": self.name, "run_path": self.run_path, "status": self.status, "status_text": self.status_text,
            "started": self.started, "updated": now, "elapsed_s": round(now - self.started, 3),
            "step": self.step, "total_steps": self.total_steps, "progress": self._progress(),
            "throughput": {"samples_per_s": _number(self.throughput[-1]) if self.throughput else None,
                           "mean_samples_per_s": _number(sum(self.throughput) / len(self.throughput))
                           if self.throughput else None},
            "time": self.time_breakdown(),
            "memory": {"peak_bytes": self.peaks, "estimate_bytes": estimate},
            "texts": self.texts, "findings": severities, "scalars": scalars, "process": self.process,
        }
