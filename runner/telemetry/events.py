"""Typed events: what the trainer observed, at which step, on which rank.

No torch import: sinks and tests use these without the trainer. Arrays are numpy arrays, or a
`HostCopy` still in flight from the device that a sink resolves with `as_array` on its own thread.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from runner.telemetry import tags


class HostCopy:
    """A device→host copy started with non_blocking=True; `get()` waits for it (sink thread only)."""

    __slots__ = ("_tensor", "_done", "_array")

    def __init__(self, tensor: Any, done: Any = None) -> None:
        self._tensor, self._done = tensor, done  # done: a torch.cuda.Event recorded after the copy
        self._array: np.ndarray | None = None

    def get(self) -> np.ndarray:
        if self._array is None:
            if self._done is not None:
                self._done.synchronize()
            self._array = self._tensor.numpy()
        return self._array


class HostValue:
    """One number inside a HostCopy; `float()` resolves it (on the sink thread)."""

    __slots__ = ("_copy", "_index")

    def __init__(self, copy: HostCopy, index: int) -> None:
        self._copy, self._index = copy, index

    def __float__(self) -> float:
        return float(self._copy.get().reshape(-1)[self._index])


def as_array(value: np.ndarray | HostCopy) -> np.ndarray:
    """The numpy array behind an event field, waiting for an in-flight copy if needed."""
    return value.get() if isinstance(value, HostCopy) else np.asarray(value)


@dataclass(kw_only=True, slots=True)
class Event:
    tag: str
    step: int
    rank: int = 0


@dataclass(kw_only=True, slots=True)
class Scalar(Event):
    """A number; sinks read it with `float(event.value)` (it may be a HostValue still in flight)."""

    value: float | HostValue


@dataclass(kw_only=True, slots=True)
class ImageGrid(Event):
    """A (C, H, W) float image in [0, 1] (numpy or in-flight copy) and its caption."""

    image: np.ndarray | HostCopy
    caption: str = ""


@dataclass(kw_only=True, slots=True)
class Histogram(Event):
    """Fixed-bin histogram computed on the device.

    `data` row: [min, max, count, sum, sum of squares, bin_0 … bin_{B-1}] (bins evenly split [min, max]).
    `row` picks the row when several histograms share one stacked copy.
    """

    data: np.ndarray | HostCopy
    row: int = 0

    def unpack(self) -> tuple[float, float, float, float, float, np.ndarray]:
        values = as_array(self.data)
        values = values[self.row] if values.ndim == 2 else values
        lo, hi, num, total, squares = (float(v) for v in values[:5])
        return lo, hi, num, total, squares, values[5:]


@dataclass(kw_only=True, slots=True)
class GraphNode:
    name: str
    op: str
    inputs: list[str] = field(default_factory=list)
    shape: str = ""


@dataclass(kw_only=True, slots=True)
class Graph(Event):
    """The traced model: a TensorBoard GraphDef (None when tracing failed), nodes for drawing,
    and the layer table (name, type, output shape, parameters) as text."""

    graph_def: Any
    nodes: list[GraphNode]
    layer_table: str
    error: str = ""


@dataclass(kw_only=True, slots=True)
class MemorySample(Event):
    """Memory and system readings in bytes / percent / watts / °C, keyed by short names.

    `world_size` > 1 (DDP): every rank's samples reach the writer, one series per rank.
    """

    values: dict[str, float]
    world_size: int = 1

    def series(self) -> dict[str, float]:
        """Dashboard names, the same in every sink: `memory/<key>` for bytes, `system/<key>` for the
        rest (CPU %, GPU utilisation/power/temperature, worker count); `/rank<r>` appended under DDP."""
        rank = self.rank if self.world_size > 1 else None
        return {tags.reading(key, rank): value for key, value in self.values.items()}


@dataclass(kw_only=True, slots=True)
class Text(Event):
    text: str


@dataclass(kw_only=True, slots=True)
class HParams(Event):
    """The run's hyperparameters, sent at the start (`status` "" or "running": `metrics` names the metric
    columns) and at the end (`status` "finished", "failed", "stopped"…, `metrics` the final values), so
    that a run killed in between is still in TensorBoard's HParams table."""

    hparams: dict[str, Any]
    metrics: dict[str, float]
    status: str = ""


@dataclass(kw_only=True, slots=True)
class Finding(Event):
    """A diagnosis of the run: what was found, how sure, on what evidence, and what to do.

    `kind` names the rule (input_bound, unreadable_samples, exploding_gradients, vanishing_gradients,
    first_nonfinite, memory_growth, allocator_pressure, straggler_rank, dashboard_trouble, stalled,
    hang_suspected, stall_recovered); `tag` is "findings". Raised by the diagnosis sink (or, for
    first_nonfinite, by the trainer after a failure); the stall kinds come from the supervisor's stall
    watch, through runner/diagnosis/stall_feed.py, tagged "findings/stall".
    """

    kind: str
    severity: str  # info | warning | error
    message: str  # one sentence
    evidence: dict[str, Any] = field(default_factory=dict)  # the numbers and steps it rests on
    advice: str = ""


@dataclass(kw_only=True, slots=True)
class LogPoint(Event):
    """Closes the log point of `step`: every scalar, image grid and histogram of it was emitted before.

    Whoever acts once per log point (the console's line, the rules, summary.json) acts on this event,
    never on the order in which scalars arrive.
    """

    tag: str = tags.LOG_POINT


COALESCED = (Scalar, MemorySample)  # past a sink's queue limit, only the newest per tag and rank waits
NEVER_DROPPED = (Text, Graph, HParams, Finding, LogPoint)  # always queued: rare, and each one says something once
# ImageGrid and Histogram (heavy, periodic) are dropped past a sink's `capacity` pending ones.


class Sink:
    """A backend: gets the events it `accepts` on its own thread (the hub's); never sees the trainer.

    Subclasses implement `write`, and override the rest as they need: `accepts` (the event types it
    takes; the trainer skips building events no sink takes), `queue_limit` (pending events past which the
    hub coalesces scalars and memory samples for it), `bind` (called once by the hub with a thread-safe
    `emit` that reaches the other sinks), `unreachable_for` (seconds its backend has been unreachable,
    read from other threads), `flush_every` (seconds within which what `write` got must reach the
    backend whatever comes next: the hub's thread then calls `flush` that long after a write, even when
    no further event arrives; 0: only at the sink's own pace and on close).
    """

    accepts: tuple[type[Event], ...] = (Event,)
    queue_limit: int = 50_000
    flush_every: float = 0.0

    def write(self, event: Event) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        """Push what `write` buffered to the backend (on the hub's thread: `flush_every` after a write,
        and from Hub.flush; never alongside `write`)."""

    def close(self) -> None:
        """Release the backend; the hub calls it once, after the last `write`."""

    def bind(self, emit: Callable[[Event], None]) -> None:
        """Keep `emit` to raise events (findings) from this sink's thread; ignored by default."""

    def unreachable_for(self) -> float:
        """Seconds the backend has been unreachable (0 when it is fine)."""
        return 0.0
