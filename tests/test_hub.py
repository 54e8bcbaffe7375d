"""The hub never blocks the step: bounded queues (heavy events dropped, scalars coalesced past a limit),
explicit counts, text kept, close() on time, findings emitted back from a sink, health."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from runner.telemetry.events import Event, Finding, Histogram, ImageGrid, MemorySample, Scalar, Sink, Text
from runner.telemetry.hub import Hub


class Recorder(Sink):
    """Keeps every event it is given."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.closed = False

    def write(self, event: Event) -> None:
        self.events.append(event)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def of(self, kind: type[Event]) -> list[Event]:
        return [e for e in self.events if isinstance(e, kind)]


class Gated(Recorder):
    """Blocks in `write` until the gate opens; `entered` is set once a write is waiting on it."""

    def __init__(self) -> None:
        super().__init__()
        self.gate, self.entered = threading.Event(), threading.Event()

    def write(self, event: Event) -> None:
        self.thread = threading.current_thread()
        self.entered.set()
        self.gate.wait()
        super().write(event)


class Slow(Recorder):
    """Sleeps `seconds` in every write: a dashboard that cannot keep up."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def write(self, event: Event) -> None:
        time.sleep(self.seconds)
        super().write(event)


def heavy(step: int) -> list[Event]:
    return [Histogram(tag="weights/w", step=step, data=np.zeros(69)),
            ImageGrid(tag="images/samples", step=step, image=np.zeros((3, 4, 4)))]


def essential(step: int) -> list[Event]:
    return [Scalar(tag="train/loss", step=step, value=1.0 / step),
            MemorySample(tag="memory", step=step, values={"rss": 1e6}),
            Text(tag="status", step=step, text=f"step {step}")]


def test_a_full_queue_drops_heavy_events_only_and_counts_them(caplog: pytest.LogCaptureFixture) -> None:
    sink = Gated()
    hub = Hub([sink], capacity=4)
    hub.emit(Scalar(tag="train/loss", step=0, value=1.0))
    assert sink.entered.wait(5)  # the sink is stuck on its first event: everything else queues
    with caplog.at_level(logging.WARNING, logger="runner.telemetry"):
        for step in range(1, 11):
            for event in heavy(step) + essential(step):
                hub.emit(event)
    assert hub.dropped == 20 - 4
    assert sum("falling behind" in r.message for r in caplog.records) == 1  # warned once, not per drop
    sink.gate.set()
    assert hub.close(timeout=10)
    assert [e.step for e in sink.of(Scalar)] == list(range(0, 11))  # every scalar, in order
    assert [e.step for e in sink.of(MemorySample)] == list(range(1, 11))
    assert len(sink.of(Text)) == 10
    assert [(type(e).__name__, e.step) for e in sink.of(Histogram) + sink.of(ImageGrid)] == \
        [("Histogram", 1), ("Histogram", 2), ("ImageGrid", 1), ("ImageGrid", 2)]  # the first 4 kept
    assert sink.closed


def test_emit_returns_at_once_while_a_sink_is_stuck() -> None:
    sink = Gated()
    hub = Hub([sink], capacity=8)
    started = time.perf_counter()
    for step in range(1, 1001):
        for event in heavy(step) + essential(step):
            hub.emit(event)
    assert time.perf_counter() - started < 5.0  # 5000 events; a blocking hub would never return
    assert hub.dropped >= 2000 - 8 - 1  # capacity, and the one the sink is stuck on
    sink.gate.set()
    assert hub.close(timeout=30)


def test_close_drains_everything_when_sinks_keep_up() -> None:
    first, second = Recorder(), Slow(0.01)
    hub = Hub([first, second])
    for step in range(1, 21):
        for event in heavy(step) + essential(step):
            hub.emit(event)
    assert hub.close(timeout=30)
    assert len(first.events) == len(second.events) == 100
    assert first.closed and second.closed
    assert hub.close(timeout=1)  # a second close is a no-op


def test_close_gives_up_on_a_hung_sink_within_its_timeout() -> None:
    hung, fine = Gated(), Recorder()
    hub = Hub([hung, fine])
    for step in range(1, 6):
        for event in essential(step):
            hub.emit(event)
    assert hung.entered.wait(5)
    started = time.perf_counter()
    assert hub.close(timeout=0.5) is False
    assert time.perf_counter() - started < 3.0
    assert len(fine.events) == 15 and fine.closed  # the other sink was drained and closed
    hung.gate.set()  # unstuck, its thread ends after the current write and delivers nothing more
    hung.thread.join(5)
    assert not hung.thread.is_alive()
    assert len(hung.events) == 1 and not hung.closed


def test_a_failing_sink_does_not_stop_the_others(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(Recorder):
        def write(self, event: Event) -> None:
            raise OSError("disk full")

    good = Recorder()
    hub = Hub([Broken(), good])
    with caplog.at_level(logging.ERROR, logger="runner.telemetry"):
        for event in essential(1):
            hub.emit(event)
        assert hub.close(timeout=10)
    assert len(good.events) == 3
    assert "Broken failed on Scalar 'train/loss'" in caplog.text


def test_sinks_get_only_what_they_accept_and_the_trainer_can_ask() -> None:
    class ScalarsOnly(Recorder):
        accepts = (Scalar, Text)

    narrow = ScalarsOnly()
    hub = Hub([narrow])
    assert hub.wants(Scalar) and not hub.wants(Histogram) and not hub.wants(ImageGrid)
    for event in heavy(1) + essential(1):
        hub.emit(event)
    assert hub.close(timeout=10)
    assert [type(e) for e in narrow.events] == [Scalar, Text]
    assert Hub([Recorder()]).wants(Histogram) and not Hub([]).wants(Scalar)


@pytest.mark.slow
def test_a_sink_stuck_for_the_whole_run_does_not_hold_the_trainer_back(tmp_path: Path) -> None:
    """The loop with every stream at every step beside a sink stuck in its first write until the run has
    ended: a hub that waited for it would never return from `fit` (no timing is asserted)."""
    from runner.config import resolve
    from runner.train.loop import Trainer
    from runner.train.strategy import make_strategy

    steps = 20
    cfg = resolve(None, dict(model="mlp", image_size=16, batch_size=4, samples=32, steps=steps, log_every=1,
                             images_every=1, hist_every=1, memory_every=1, device="cpu", graph=False,
                             run_dir=str(tmp_path), name="stuck", resume="never", progress=False))
    cfg.run_path.mkdir(parents=True)
    trainer = Trainer(cfg, make_strategy(cfg))
    stuck, recorder = Gated(), Recorder()
    hub = Hub([stuck, recorder], capacity=16)
    try:
        assert trainer.fit(hub) == 0
    finally:
        trainer.close()
    assert stuck.entered.is_set() and not stuck.events  # it was stuck all along
    assert hub.close(timeout=2.0) is False  # hundreds of events left: it gives up on time
    stuck.gate.set()
    assert hub.dropped > 0  # images/histograms over capacity, counted …
    dropped = [e.value for e in recorder.of(Scalar) if e.tag == "telemetry/dropped"]
    assert dropped[-1] > 0  # … and reported
    assert [e.step for e in recorder.of(Scalar) if e.tag == "train/loss"] == list(range(1, steps + 1))
    assert [e.step for e in recorder.of(MemorySample)] == list(range(1, steps + 1))


# --- a sink whose backend never answers: bounded memory, the others unaffected ------------------

class Unanswered(Recorder):
    """Sends each event to a real TCP server and waits for a reply that never comes (a hung dashboard)."""

    queue_limit = 200

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__()
        self.conn = socket.create_connection(address, timeout=5)
        self.conn.settimeout(None)  # as a client without a read timeout: blocked until the server speaks
        self.waiting_since = 0.0

    def write(self, event: Event) -> None:
        if self.conn.fileno() >= 0:
            self.waiting_since = time.monotonic()
            try:
                self.conn.sendall(f"{event.tag} {event.step}\n".encode())
                reply = self.conn.recv(1)
            except ConnectionError:  # reset: the server hung up with our requests unread
                reply = b""
            if not reply:  # gone: later writes return at once
                self.conn.close()
            self.waiting_since = 0.0
        super().write(event)

    def unreachable_for(self) -> float:
        since = self.waiting_since
        return time.monotonic() - since if since else 0.0


@pytest.fixture
def silent_server() -> Iterator[tuple[socket.socket, list[socket.socket]]]:
    """A listening socket that accepts and never answers; closing the accepted connections unblocks clients."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(server.accept()[0]), daemon=True).start()
    yield server, accepted
    for conn in accepted:
        conn.close()
    server.close()


TAGS = [f"train/t{i}" for i in range(5)]


def stream(steps: range) -> Iterator[Event]:
    for step in steps:
        yield from (Scalar(tag=tag, step=step, value=float(step)) for tag in TAGS)
        yield MemorySample(tag="memory", step=step, values={"rss": float(step)})


def test_a_hung_sink_costs_bounded_memory_and_gets_the_newest_values(silent_server, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dashboards.tensorboard import TensorBoardSink

    server, accepted = silent_server
    hung, fine = Unanswered(server.getsockname()), TensorBoardSink(tmp_path)
    hub = Hub([hung, fine])
    steps = range(1, 5001)
    for event in stream(steps):  # 30,000 events: 150 times the hung sink's limit
        hub.emit(event)
    # twice (its limit + the newest per (type, tag, rank)): the batch its thread holds, and what waits
    bound = 2 * (hung.queue_limit + len(TAGS) + 1)
    deadline = time.monotonic() + 60
    while (health := hub.health())["telemetry/backlog"] > bound:  # the largest queue: TensorBoard's, until it
        assert time.monotonic() < deadline, health  # has written everything; then the hung sink's
        time.sleep(0.05)
    assert hub.dropped == health["telemetry/dropped"] > 25_000
    assert health["telemetry/unreachable_s"] > 0
    assert hub.flush(timeout=0.5) is False  # it cannot drain while its server is silent …
    accepted[0].close()  # … until the server hangs up: every write returns at once
    assert hub.close(timeout=30)
    got = hung.of(Scalar)
    assert len(got) < 1000 and hung.closed
    newest = {e.tag: e.step for e in got}
    assert newest == dict.fromkeys(TAGS, steps[-1])  # what it shows last is the latest of every series
    assert hung.of(MemorySample)[-1].step == steps[-1]
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    events.Reload()
    for tag in TAGS:  # the sink that keeps up lost nothing
        assert [e.step for e in events.Scalars(tag)] == list(steps)
    assert len(events.Scalars("memory/rss")) == len(steps)


def test_below_its_limit_a_slow_sink_gets_every_event() -> None:
    sink = Slow(0.0005)
    hub = Hub([sink])
    events = list(stream(range(1, 101)))
    for event in events:
        hub.emit(event)
    assert hub.close(timeout=30)
    assert sink.events == events and hub.dropped == 0


# --- bind: a sink raises events for the others --------------------------------------------------

def test_a_bound_sink_emits_findings_to_the_other_sinks_while_running_and_closing() -> None:
    class Diagnosis(Recorder):
        accepts = (Scalar,)

        def bind(self, emit) -> None:
            self.emit = emit

        def close(self) -> None:  # a rule evaluated at the end: the others are still open
            self.emit(Finding(tag="findings", step=self.events[-1].step, kind="run_summary", severity="info",
                              message="The run ended."))

        def write(self, event: Event) -> None:
            super().write(event)
            if isinstance(event, Scalar) and float(event.value) > 10:
                self.emit(Finding(tag="findings", step=event.step, kind="exploding_gradients", severity="warning",
                                  message="The loss grew tenfold.", evidence={"loss": float(event.value)}))

    class TextOnly(Recorder):
        accepts = (Text,)

    everything, diagnosis, texts = Recorder(), Diagnosis(), TextOnly()  # it emits to a sink listed before it
    hub = Hub([everything, diagnosis, texts])
    for step, value in enumerate((1.0, 2.0, 50.0), start=1):
        hub.emit(Scalar(tag="train/loss", step=step, value=value))
    assert hub.close(timeout=10)
    assert [(e.kind, e.step) for e in everything.of(Finding)] == [("exploding_gradients", 3), ("run_summary", 3)]
    assert not diagnosis.of(Finding)  # not back to itself
    assert not texts.events  # nor to a sink that does not accept it


def test_health_of_sinks_that_keep_up() -> None:
    hub = Hub([Recorder(), Recorder()])
    for event in stream(range(1, 11)):
        hub.emit(event)
    assert hub.flush(timeout=10)
    assert hub.health() == {"telemetry/dropped": 0.0, "telemetry/backlog": 0.0, "telemetry/unreachable_s": 0.0}
    assert hub.close(timeout=10)


@pytest.mark.slow
def test_bench_scale_prints_its_table() -> None:
    """scripts/bench_scale.py end to end on a short stream (its numbers are not checked: timings vary)."""
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, str(root / "scripts" / "bench_scale.py"), "--steps", "300", "--every", "100",
                          "--scenarios", "bare,tensorboard,visdom-hung", "--close-timeout", "20"],
                         capture_output=True, text=True, timeout=300, cwd=root)
    assert out.returncode == 0, out.stderr
    rows = {line.split(" | ")[0].strip("| "): line for line in out.stdout.splitlines() if line.startswith("| ")}
    assert {"bare", "tensorboard", "visdom-hung"} <= set(rows)
    assert "tensorboard events" in rows["tensorboard"] and "visdom-hung/visdom.log" in rows["visdom-hung"]
    assert f"| {300 * 21 + 3 * 21:,} |" in rows["tensorboard"]  # events: 21 a step, 21 more every 100 steps
