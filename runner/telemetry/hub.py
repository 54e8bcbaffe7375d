"""The hub: one place that fans events out to sinks, each on its own thread, never blocking the step.

Policy when a sink falls behind: scalars, memory samples, text, graph and hparams are always
queued (they are small); image grids and histograms beyond `capacity` pending ones are dropped,
counted in `dropped` and warned about once per sink.
"""

from __future__ import annotations

import collections
import logging
import threading
import time

from runner.telemetry.events import ESSENTIAL, Event, Sink

log = logging.getLogger("runner.telemetry")


class _SinkWorker:
    """A sink, its queue and its delivery thread."""

    def __init__(self, sink: Sink, capacity: int) -> None:
        self.sink, self.capacity = sink, capacity
        self.accepts: tuple[type[Event], ...] = getattr(sink, "accepts", (Event,))
        self.queue: collections.deque[Event | None] = collections.deque()
        self.heavy_pending = 0
        self.dropped = 0
        self.busy = False
        self.abandoned = False  # set when close() gave up: deliver nothing more
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._deliver, name=f"sink-{type(sink).__name__}", daemon=True)
        self.thread.start()

    def put(self, event: Event) -> None:
        if not isinstance(event, self.accepts):
            return
        with self.cond:
            if not isinstance(event, ESSENTIAL):
                if self.heavy_pending >= self.capacity:
                    self.dropped += 1
                    if self.dropped == 1:
                        log.warning("%s is falling behind: dropping image/histogram events (counted in "
                                    "telemetry/dropped)", type(self.sink).__name__)
                    return
                self.heavy_pending += 1
            self.queue.append(event)
            self.cond.notify()

    def _deliver(self) -> None:
        while True:
            with self.cond:
                while not self.queue:
                    self.cond.wait()
                if self.abandoned:
                    return
                event = self.queue.popleft()
                self.busy = True
                if event is not None and not isinstance(event, ESSENTIAL):
                    self.heavy_pending -= 1
            try:
                if event is None:
                    return
                self.sink.write(event)
            except Exception:  # noqa: BLE001 - a broken sink must not take training down
                log.exception("%s failed on %s %r", type(self.sink).__name__, type(event).__name__, event.tag)
            finally:
                with self.cond:
                    self.busy = False
                    self.cond.notify_all()

    def wait_idle(self, deadline: float) -> bool:
        with self.cond:
            while self.queue or self.busy:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.cond.wait(remaining)
        return True

    def request_stop(self) -> None:
        """Deliver what is queued, then end the thread."""
        with self.cond:
            self.queue.append(None)
            self.cond.notify()

    def join(self, deadline: float) -> bool:
        """Wait for the thread until `deadline`; on timeout, drop the rest so it ends after the current write."""
        self.thread.join(max(0.0, deadline - time.monotonic()))
        if self.thread.is_alive():
            with self.cond:
                self.abandoned = True
                self.queue.clear()
                self.queue.append(None)
                self.cond.notify()
            return False
        return True


class Hub:
    """Events in (from the training thread), a bounded queue and a thread per sink."""

    def __init__(self, sinks: list[Sink], capacity: int = 1024) -> None:
        self._workers = [_SinkWorker(sink, capacity) for sink in sinks]
        self._closed = False
        self._wanted: dict[type[Event], bool] = {}

    @property
    def active(self) -> bool:
        """False on ranks that write nothing: callers can skip building events at all."""
        return bool(self._workers)

    def wants(self, kind: type[Event]) -> bool:
        """Whether some sink takes events of `kind`: the trainer builds costly ones (histograms, image
        grids, the graph) only then. A sink lists what it takes in `accepts` (default: everything)."""
        if kind not in self._wanted:
            self._wanted[kind] = any(issubclass(kind, w.accepts) for w in self._workers)
        return self._wanted[kind]

    @property
    def dropped(self) -> int:
        return sum(w.dropped for w in self._workers)

    def emit(self, event: Event) -> None:
        """Queue an event for every sink; returns at once."""
        for worker in self._workers:
            worker.put(event)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every sink has written what it was given, then flush them. False on timeout."""
        deadline = time.monotonic() + timeout
        ok = all([w.wait_idle(deadline) for w in self._workers])
        for worker in self._workers:
            try:
                worker.sink.flush()
            except Exception:  # noqa: BLE001
                log.exception("%s failed to flush", type(worker.sink).__name__)
        return ok

    def close(self, timeout: float = 30.0) -> bool:
        """Drain, flush and close every sink within `timeout` seconds in all. False if one hung."""
        if self._closed:
            return True
        self._closed = True
        deadline = time.monotonic() + timeout
        ok = True
        for worker in self._workers:
            worker.request_stop()  # all sinks drain in parallel under one deadline
        for worker in self._workers:
            if not worker.join(deadline):
                log.warning("%s did not finish within %g s; giving up on it", type(worker.sink).__name__, timeout)
                ok = False
                continue
            try:
                worker.sink.close()
            except Exception:  # noqa: BLE001
                log.exception("%s failed to close", type(worker.sink).__name__)
        return ok
