"""The run's summary as the event stream tells it: status, steps, throughput, time breakdown, memory.

Kept by the diagnosis sink and written to `runs/<name>/summary.json`; `runner report` reads it back.
"""

from __future__ import annotations

import math
import os
import re
import time
from typing import Any

from runner.procs import proc_table
from runner.telemetry.events import Event, HParams, MemorySample, Scalar, Text

TIME_PARTS = ("data_wait", "h2d", "forward", "backward", "optimizer", "telemetry", "other")
SUMMARY_PREFIXES = ("train/", "time/", "telemetry/", "memory/", "system/")  # per-layer norms stay out
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
        self.scalars: dict[str, float] = {}
        self.peaks: dict[str, float] = {}  # memory/<key>[/rank<r>] → highest reading
        self.throughput: list[float] = []  # samples/s at each log point
        self.texts: dict[str, str] = {}  # the latest of a few texts: device line, memory estimate table
        pid = os.getpid()
        self.process = {"pid": pid, "start": proc_table.start_ticks(pid), "boot": proc_table.boot_id()}

    def add(self, event: Event) -> None:
        self.step = max(self.step, event.step)
        if isinstance(event, Scalar):
            if event.tag.startswith(SUMMARY_PREFIXES):
                value = float(event.value)
                self.scalars[event.tag] = value
                if event.tag == "train/samples_per_s" and math.isfinite(value):
                    self.throughput.append(value)
        elif isinstance(event, MemorySample):
            for tag, value in event.series().items():
                if tag.startswith("memory/") and "host_available" not in tag and value > self.peaks.get(tag, -math.inf):
                    self.peaks[tag] = value
        elif isinstance(event, Text):
            self._text(event)
        elif isinstance(event, HParams) and getattr(event, "status", ""):
            self.status = next((s for prefix, s in ENDED if event.status.startswith(prefix)), self.status)

    def _text(self, event: Text) -> None:
        if event.tag == "status":
            self.status_text = event.text
            if event.text.startswith("training "):
                self.texts["started"] = event.text
                if found := re.search(r"steps \d+→(\d+)", event.text):
                    self.total_steps = int(found[1])
            for prefix, status in ENDED:
                if event.text.startswith(prefix):
                    self.status = status
        elif event.tag in ("memory_estimate", "memory_oom", "auto_batch"):
            self.texts[event.tag] = event.text

    def time_breakdown(self) -> dict[str, Any]:
        """Milliseconds per step at the latest log point, by part, plus per-rank step times under DDP."""
        parts = {p: self.scalars[f"time/{p}_ms"] for p in TIME_PARTS if f"time/{p}_ms" in self.scalars}
        out: dict[str, Any] = {"parts_ms": parts}
        if "time/step_ms" in self.scalars:
            out["step_ms"] = self.scalars["time/step_ms"]
        elif "train/step_time_ms" in self.scalars:
            out["step_ms"] = self.scalars["train/step_time_ms"]
        ranks = {tag.rsplit("/", 1)[1]: v for tag, v in self.scalars.items() if tag.startswith("time/step_ms/rank")}
        if ranks:
            out["step_ms_by_rank"] = ranks
            out["slowest_rank"] = self.scalars.get("time/slowest_rank")
            out["skew"] = self.scalars.get("time/skew")
        return out

    def to_dict(self, findings: list[dict[str, Any]]) -> dict[str, Any]:
        now = time.time()
        severities: dict[str, int] = {}
        for finding in findings:
            severities[finding["severity"]] = severities.get(finding["severity"], 0) + 1
        scalars = {k: _number(v) for k, v in self.scalars.items() if not PER_RANK.search(k) or k.startswith("time/")}
        estimate = {k[len("memory/estimate_"):]: v for k, v in self.scalars.items() if k.startswith("memory/estimate_")}
        return {
            "name": self.name, "run_path": self.run_path, "status": self.status, "status_text": self.status_text,
            "started": self.started, "updated": now, "elapsed_s": round(now - self.started, 3),
            "step": self.step, "total_steps": self.total_steps,
            "throughput": {"samples_per_s": _number(self.throughput[-1]) if self.throughput else None,
                           "mean_samples_per_s": _number(sum(self.throughput) / len(self.throughput))
                           if self.throughput else None},
            "time": self.time_breakdown(),
            "memory": {"peak_bytes": self.peaks, "estimate_bytes": estimate},
            "texts": self.texts, "findings": severities, "scalars": scalars, "process": self.process,
        }
