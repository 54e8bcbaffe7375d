"""The hub: one place that fans events out to sinks, each on its own thread, never blocking the step.

Memory stays bounded whatever a sink does. Per sink:
- text, graph, hparams and findings (`NEVER_DROPPED`) are always queued: they are rare;
- image grids and histograms beyond `capacity` pending *copies* are dropped: the histograms of one
  step share one stacked copy (runner/probes/tensor_stats.py) and count as one, so a model of 2,000
  parameter tensors loses none of them;
- scalars and memory samples (`COALESCED`) are queued up to the sink's `queue_limit` pending events;
  past it, only the newest event per (type, tag, rank) waits, delivered once the sink catches up (so a
  stuck sink holds at most twice its limit plus one per series: the batch in its hands, and the queue).
Whatever a sink never gets is counted per sink and event kind (`dropped_by`), and warned about once
per sink. A sink that keeps
up (TensorBoard writes over 100k scalars a second) never reaches its limit and gets every event; a
dashboard that is slow or gone costs at most its limit in events.

The delivery thread takes everything pending in one go and writes it without holding the lock, so
the training thread's `emit` costs an append, and the sink's per-event cost is its own `write`.
"""

from __future__ import annotations

import collections
import functools
import logging
import threading
import time

from runner.telemetry import tags
from runner.telemetry.events import COALESCED, NEVER_DROPPED, Event, Sink

log = logging.getLogger("runner.telemetry")


# After a batch smaller than LINGER_BELOW the delivery thread waits LINGER seconds before the next:
# a thread that keeps up would otherwise be woken for nearly every event, and each wake-up costs the
# emitting (training) thread a lock and a GIL hand-over. 2 ms is nothing next to a dashboard's refresh.
LINGER, LINGER_BELOW = 0.002, 256
_SKIP, _COALESCED, _KEPT, _HEAVY = range(4)  # what a sink's queue does with an event type


def _copy_of(event: Event) -> object:
    """What a heavy event holds in memory: its (possibly shared) array or in-flight copy."""
    for field in ("data", "image"):
        held = getattr(event, field, None)
        if held is not None:
            return held
    return event


class _SinkWorker:
    """A sink, its queue and its delivery thread.

    The common case takes no lock: `deque.append` and `popleft` are atomic, and only the delivery
    thread removes. The lock guards what is rarer: waking the thread, the heavy-event count, the
    coalesced events, and the idle state that `flush`/`close` wait for.
    """

    def __init__(self, sink: Sink, capacity: int) -> None:
        self.sink, self.capacity, self.limit = sink, capacity, sink.queue_limit
        self.name = type(sink).__name__
        self.accepts = sink.accepts
        self.policy: dict[type, int] = {}  # event type → _SKIP | _COALESCED | _KEPT | _HEAVY, filled on first sight
        self.queue: collections.deque[Event] = collections.deque()
        self.newest: dict[tuple[type, str, int], Event] = {}  # coalesced scalars/memory samples, past `limit`
        self.in_hand = 0  # taken by the delivery thread, not written yet
        self.heavy_pending: dict[int, int] = {}  # id of a pending heavy event's copy → its events pending
        self.dropped: dict[str, int] = {}  # event kind → events this sink never got
        self.busy = False
        self.sleeping = False  # the delivery thread waits (or is about to): the next put wakes it
        self.stopping = False  # deliver what is pending, then end
        self.abandoned = False  # close() gave up: deliver nothing more
        self.lock = threading.Lock()
        self.wake, self.idle = threading.Condition(self.lock), threading.Condition(self.lock)
        # Timed flush: what the sink wrote reaches its files within `flush_every` seconds, whatever the
        # loop does next (a stalled run's last step must show). `flush_due` is set by the first write
        # after a flush; the delivery thread wakes for it even when no event comes.
        self.flush_every = float(sink.flush_every or 0.0)
        self.flush_due: float | None = None
        self.using = threading.Lock()  # the sink is in use: a batch's writes, a timed flush, Hub.flush
        self.thread = threading.Thread(target=self._deliver, name=f"sink-{self.name}", daemon=True)
        self.thread.start()

    @property
    def backlog(self) -> int:
        return len(self.queue) + len(self.newest) + self.in_hand

    def _policy(self, kind: type) -> int:
        if not issubclass(kind, self.accepts):
            policy = _SKIP
        else:
            policy = _COALESCED if issubclass(kind, COALESCED) else _KEPT if issubclass(kind, NEVER_DROPPED) else _HEAVY
        self.policy[kind] = policy
        return policy

    def put(self, event: Event) -> None:
        policy = self.policy.get(type(event))
        if policy is None:
            policy = self._policy(type(event))
        if policy == _COALESCED:
            if len(self.queue) >= self.limit:
                self._coalesce(event)
                return
        elif policy == _SKIP or (policy == _HEAVY and not self._admit_heavy(event)):
            return
        self.queue.append(event)
        if self.sleeping:
            with self.lock:
                self.wake.notify()

    def _coalesce(self, event: Event) -> None:
        key = (type(event), event.tag, event.rank)
        with self.lock:
            if key in self.newest:
                self._drop(type(event).__name__, "coalescing scalars and memory samples to the newest per tag")
            self.newest[key] = event
            if self.sleeping:
                self.wake.notify()

    def _admit_heavy(self, event: Event) -> bool:
        """Admit a heavy event unless `capacity` copies are pending; events sharing a pending copy
        (the rows of one stacked histogram table) ride along with it."""
        copy = id(_copy_of(event))
        with self.lock:
            if copy not in self.heavy_pending and len(self.heavy_pending) >= self.capacity:
                self._drop(type(event).__name__, "dropping image/histogram events")
                return False
            self.heavy_pending[copy] = self.heavy_pending.get(copy, 0) + 1
            return True

    def _heavy_done(self, events: list[Event]) -> None:
        """Release the copies of delivered heavy events (under the lock)."""
        for event in events:
            copy = id(_copy_of(event))
            left = self.heavy_pending.get(copy, 0) - 1
            if left > 0:
                self.heavy_pending[copy] = left
            else:
                self.heavy_pending.pop(copy, None)

    def _drop(self, kind: str, what: str) -> None:
        first = not self.dropped
        self.dropped[kind] = self.dropped.get(kind, 0) + 1
        if first:
            log.warning("%s is falling behind: %s (counted in telemetry/dropped)", self.name, what)

    def _take(self) -> list[Event] | None:
        """Everything pending, oldest first (the coalesced newest last); waits for some. None: stop."""
        with self.lock:
            self.sleeping = True  # before looking: a put that comes after the look sees it and wakes us
            while not (self.queue or self.newest or self.stopping):
                if self.flush_due is None:
                    self.wake.wait()
                elif (remaining := self.flush_due - time.monotonic()) > 0:
                    self.wake.wait(remaining)
                else:  # nothing came, and what was written is due on disk: an empty batch flushes it
                    self.sleeping, self.busy = False, True
                    return []
            self.sleeping = False
            if self.abandoned or not (self.queue or self.newest):
                return None
            queue, newest = self.queue, self.newest
            batch = [queue.popleft() for _ in range(len(queue))]
            if newest:
                batch += newest.values()
                self.newest = {}
            self.in_hand, self.busy = len(batch), True
            return batch

    def _deliver(self) -> None:
        write, policy = self.sink.write, self.policy
        while (batch := self._take()) is not None:
            heavy_done: list[Event] = []
            with self.using:
                for event in batch:
                    if self.abandoned:
                        break
                    try:
                        write(event)
                    except Exception:
                        log.exception("%s failed on %s %r", self.name, type(event).__name__, event.tag)
                    if policy[type(event)] == _HEAVY:
                        heavy_done.append(event)
                    self.in_hand -= 1
                if self.flush_every:
                    self._flush_when_due(bool(batch))
            with self.lock:
                self._heavy_done(heavy_done)
                self.in_hand, self.busy = 0, False
                self.idle.notify_all()
            if len(batch) < LINGER_BELOW and not self.stopping:
                time.sleep(LINGER)  # let a batch gather: waking per event costs the training thread more
        with self.lock:
            self.busy = False
            self.idle.notify_all()

    def _flush_when_due(self, wrote: bool) -> None:
        """After a batch (or an empty one: a due flush), flush the sink if `flush_every` has passed since
        its first write after the last flush (delivery thread, holding `using`)."""
        now = time.monotonic()
        if wrote and self.flush_due is None:
            self.flush_due = now + self.flush_every
        if self.flush_due is not None and now >= self.flush_due and not self.abandoned:
            self.flush_due = None
            try:
                self.sink.flush()
            except Exception:
                log.exception("%s failed to flush", self.name)

    def wait_idle(self, deadline: float) -> bool:
        with self.lock:
            while self.queue or self.newest or self.busy:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self.thread.is_alive():
                    return False
                self.idle.wait(min(remaining, 0.1))  # 0.1: notice a thread that died
        return True

    def request_stop(self) -> None:
        """Deliver what is pending (and what other sinks still send it), then end the thread."""
        with self.lock:
            self.stopping = True
            self.wake.notify()

    def join(self, deadline: float) -> bool:
        """Wait for the thread until `deadline`; on timeout, drop the rest so it ends after the current write."""
        self.thread.join(max(0.0, deadline - time.monotonic()))
        if self.thread.is_alive():
            with self.lock:
                self.abandoned = True
                self.queue.clear()
                self.newest = {}
                self.wake.notify()
            return False
        return True


class Hub:
    """Events in (from the training thread, or a sink's), a bounded queue and a thread per sink."""

    def __init__(self, sinks: list[Sink], capacity: int = 1024) -> None:
        self._workers = [_SinkWorker(sink, capacity) for sink in sinks]
        self._closed = False
        self._emitted = 0
        self._wanted: dict[type[Event], bool] = {}
        for worker in self._workers:
            others = [w for w in self._workers if w is not worker]
            worker.sink.bind(functools.partial(self._emit_to, others))

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
        """Events some sink never got (heavy ones dropped, scalars coalesced away), over all sinks."""
        return sum(sum(w.dropped.values()) for w in self._workers)

    def dropped_by(self) -> dict[tuple[str, str], int]:
        """Events never delivered, per (sink, event kind): what `telemetry/dropped/<sink>/<kind>` shows."""
        return {(w.name, kind): n for w in self._workers for kind, n in list(w.dropped.items())}

    def health(self) -> dict[str, float]:
        """What the trainer shows as `telemetry/*` at log points: events dropped, the longest queue,
        and the longest time a sink has been unable to reach its backend."""
        unreachable = 0.0
        for worker in self._workers:
            try:
                unreachable = max(unreachable, float(worker.sink.unreachable_for()))
            except Exception:
                log.debug("%s.unreachable_for failed", worker.name, exc_info=True)
        health = {tags.DROPPED: float(self.dropped),
                  tags.BACKLOG: float(max((w.backlog for w in self._workers), default=0)),
                  tags.UNREACHABLE_S: unreachable}
        health.update({tags.dropped(sink, kind): float(n) for (sink, kind), n in self.dropped_by().items()})
        return health

    def emit(self, event: Event) -> None:
        """Queue an event for every sink that accepts it; returns at once. Thread-safe."""
        self._emitted += 1
        for worker in self._workers:
            worker.put(event)

    def _emit_to(self, workers: list[_SinkWorker], event: Event) -> None:
        self._emitted += 1  # only read for change: a lost increment between threads still changes it
        for worker in workers:
            worker.put(event)

    def _settle(self, deadline: float) -> bool:
        """Wait until every sink is idle at once, including what sinks emit to each other meanwhile."""
        while True:
            before = self._emitted
            if not all([w.wait_idle(deadline) for w in self._workers]):
                return False
            if self._emitted == before:  # none emitted while they drained: all idle together
                return True

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every sink has written what it was given, then flush them. False on timeout (a sink
        still inside a write by then, e.g. to a hung server, is not flushed: never alongside its thread)."""
        deadline = time.monotonic() + timeout
        ok = self._settle(deadline)
        for worker in self._workers:
            if not worker.using.acquire(timeout=max(0.0, deadline - time.monotonic())):
                ok = False
                continue
            try:
                worker.sink.flush()
            except Exception:
                log.exception("%s failed to flush", worker.name)
            finally:
                worker.using.release()
        return ok

    def close(self, timeout: float = 30.0) -> bool:
        """Drain, flush and close every sink within `timeout` seconds in all. False if one hung.

        All sinks drain in parallel until they are idle together (so a finding raised while draining
        still reaches the others), then stop; a hung sink leaves the others a part of the time to end.
        Sinks that emit (they override `bind`) close first: what they raise while closing (a rule
        evaluated on the last log point) still reaches the others."""
        if self._closed:
            return True
        self._closed = True
        deadline = time.monotonic() + timeout
        self._settle(deadline - min(1.0, timeout / 2))
        emitters = [w for w in self._workers if type(w.sink).bind is not Sink.bind]
        first = self._stop(emitters, deadline, timeout)
        return self._stop([w for w in self._workers if w not in emitters], deadline, timeout) and first

    @staticmethod
    def _stop(workers: list[_SinkWorker], deadline: float, timeout: float) -> bool:
        """End these sinks' threads once they have delivered what is queued, then close the sinks."""
        ok = True
        for worker in workers:
            worker.request_stop()
        for worker in workers:
            if not worker.join(deadline):
                log.warning("%s did not finish within %g s; giving up on it", worker.name, timeout)
                ok = False
                continue
            try:
                worker.sink.close()
            except Exception:
                log.exception("%s failed to close", worker.name)
        return ok
