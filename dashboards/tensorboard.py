"""The TensorBoard sink: every event type into one event file in the run's folder.

`tensorboard --logdir runs` shows every run; tags are grouped `train/`, `time/`, `memory/`, `system/`,
`weights/`, `grads/`, `norms/`, `images/`, and a custom-scalars page groups them as
`dashboards.layout` says. Runs on the hub's sink thread: PNG encoding, histogram protos and waiting
for in-flight device copies all happen here, never on the training thread. What it costs still
competes with the step for the CPU and the GIL, so the per-event path is short: the scalars of a step
go out as one `Event` (histograms too), straight into a buffered file (`dashboards.event_file`,
checksummed in C), images are PNG-encoded at a fast compression level.

The HParams table knows the run from its first step (experiment and session start written when the
trainer's first `HParams` comes), and its status once the run ends (session end): a run killed in
between stays in the table, as a session that never ended.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto.summary_pb2 import Summary

from dashboards import tb_summaries
from dashboards.event_file import EventFile
from runner.telemetry import tags
from runner.telemetry.events import (
    Event,
    Finding,
    Graph,
    Histogram,
    HParams,
    ImageGrid,
    MemorySample,
    Scalar,
    Sink,
    Text,
    as_array,
)

_LAYERS = "Layers (outputs for an example batch of 2):\n\n"
_BATCHED = frozenset({Scalar, MemorySample, Histogram})  # a step's worth goes out as one Event
_START = ("", "running")  # HParams statuses that open the session; any other closes it


class TensorBoardSink(Sink):
    """Writes events into `run_path`; `purge_step` drops what an earlier attempt logged from that step on."""

    accepts = (Scalar, MemorySample, ImageGrid, Histogram, Graph, Text, HParams, Finding)
    # A local file keeps up with any training loop (200k events: minutes of a fast run's scalars); past
    # this the disk is stuck, or a synthetic feed outruns the sink (scripts/bench_scale.py shows when).
    queue_limit = 200_000

    def __init__(self, run_path: Path, purge_step: int | None = None, flush_secs: float = 5.0) -> None:
        # flush_secs: the file reaches the OS every 5 s (SummaryWriter's default is 120 s), so a live
        # TensorBoard keeps up
        self.run_path = Path(run_path)
        self._file = EventFile(self.run_path, purge_step=purge_step, flush_secs=flush_secs)
        self._file.add_summary(tb_summaries.custom_scalars(), 0)
        self._pending: event_pb2.Event | None = None  # the values of one step, built in place (no copies)
        self._pending_step = 0
        self._add: Any = None  # self._pending.summary.value.add
        self._session_open = False
        self._write = {Scalar: self._scalar, ImageGrid: self._image, Histogram: self._histogram,
                       Graph: self._graph, MemorySample: self._memory, Text: self._text, HParams: self._hparams,
                       Finding: self._finding}

    def write(self, event: Event) -> None:
        kind = type(event)
        if self._pending is not None and (event.step != self._pending_step or kind not in _BATCHED):
            self._write_pending()
        self._write[kind](event)

    def flush(self) -> None:
        self._write_pending()
        self._file.flush()

    def close(self) -> None:
        self._write_pending()
        self._file.close()

    def _values(self, step: int) -> Any:
        """`add(tag=…, simple_value=…|histo=…)` into the event of `step` (one per step)."""
        if self._pending is None:
            self._pending, self._pending_step = event_pb2.Event(step=step), step
            self._add = self._pending.summary.value.add
        return self._add

    def _write_pending(self) -> None:
        if self._pending is not None:
            self._pending.wall_time = time.time()
            self._file.add(self._pending)
            self._pending = None

    def _add_text(self, tag: str, content: str, step: int) -> None:
        self._file.add_summary(tb_summaries.text(tag, content), step)

    # --- one method per event type ---------------------------------------------------------

    def _scalar(self, event: Scalar) -> None:
        self._values(event.step)(tag=event.tag, simple_value=float(event.value))

    def _memory(self, event: MemorySample) -> None:
        add = self._values(event.step)
        for tag, value in event.series().items():
            add(tag=tag, simple_value=value)

    def _image(self, event: ImageGrid) -> None:
        image = tb_summaries.png(as_array(event.image))
        self._file.add_summary(Summary(value=[Summary.Value(tag=event.tag, image=image)]), event.step)
        if event.caption:
            self._add_text(f"{event.tag}/caption", event.caption, event.step)

    def _histogram(self, event: Histogram) -> None:
        lo, hi, num, total, squares, counts = event.unpack()
        if not (math.isfinite(lo) and math.isfinite(hi)):
            self._add_text(event.tag, f"not finite at step {event.step} (min {lo}, max {hi})", event.step)
            return
        self._values(event.step)(tag=event.tag, histo=tb_summaries.histogram(lo, hi, num, total, squares, counts))

    def _graph(self, event: Graph) -> None:
        if event.graph_def is None:
            self._add_text(event.tag, f"**Model graph unavailable**: tracing failed ({event.error}).\n\n"
                           + _LAYERS + event.layer_table, event.step)
            return
        self._file.add(event_pb2.Event(graph_def=event.graph_def.SerializeToString()))
        self._add_text(event.tag, _LAYERS + event.layer_table, event.step)

    def _text(self, event: Text) -> None:
        content = event.text
        if event.tag == tags.CONFIG:  # TOML: an indented (code) block keeps its lines
            content = "\n".join("    " + line for line in content.splitlines())
        self._add_text(event.tag, content, event.step)

    def _finding(self, event: Finding) -> None:
        evidence = ", ".join(f"{k} {v}" for k, v in event.evidence.items())
        content = f"**{event.severity}** · {event.kind}: {event.message}"
        content += f"\n\n{event.advice}" if event.advice else ""
        content += f"\n\nevidence: {evidence}" if evidence else ""
        self._add_text(event.tag or "findings", content, event.step)
        self._file.flush()  # rare, and wanted now: a live TensorBoard shows it, a killed run keeps it

    def _hparams(self, event: HParams) -> None:
        """Into this run's folder (add_hparams would make a subfolder); the metric columns read the run's own
        scalars. The first HParams opens the session, one with an end status closes it."""
        status = event.status.split(":")[0].split(" ")[0]  # "stopped by SIGINT at step 5" → "stopped"
        if not self._session_open:
            for summary in tb_summaries.hparams_start(event.hparams, sorted(event.metrics), self.run_path.name):
                self._file.add_summary(summary, event.step)
            self._session_open = True
        if status not in _START:
            self._file.add_summary(tb_summaries.hparams_end(status), event.step)
        self._file.flush()  # the row appears now, and survives a SIGKILL of the run
