"""The hub never blocks the step: bounded heavy events, explicit drops, essential events kept, close() on time."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from runner.telemetry.events import Event, Histogram, ImageGrid, MemorySample, Scalar, Text
from runner.telemetry.hub import Hub


class Recorder:
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
def test_a_sink_sleeping_a_second_per_event_leaves_the_step_time_unchanged(tmp_path: Path) -> None:
    """The loop with every stream at every step, once beside a fast sink only and once beside a sink
    that sleeps 1 s per event: a blocking hub would need minutes; this one keeps the pace."""
    from runner.config import resolve
    from runner.train.loop import Trainer
    from runner.train.strategy import make_strategy

    steps = 20

    def fit(name: str, *slow: Slow) -> tuple[float, Recorder, Hub]:
        cfg = resolve(None, dict(model="mlp", image_size=16, batch_size=4, samples=32, steps=steps, log_every=1,
                                 images_every=1, hist_every=1, memory_every=1, device="cpu", graph=False,
                                 run_dir=str(tmp_path), name=name, resume="never", progress=False))
        cfg.run_path.mkdir(parents=True)
        trainer = Trainer(cfg, make_strategy(cfg))
        recorder = Recorder()
        hub = Hub([*slow, recorder], capacity=16)
        try:
            started = time.perf_counter()
            trainer.fit(hub)
            return time.perf_counter() - started, recorder, hub
        finally:
            trainer.close()

    baseline, _, quick_hub = fit("baseline")
    assert quick_hub.close(timeout=30)
    slow_sink = Slow(1.0)
    elapsed, recorder, hub = fit("slow", slow_sink)
    started = time.perf_counter()
    assert hub.close(timeout=2.0) is False  # hundreds of events left: it gives up on time
    assert time.perf_counter() - started < 5.0
    assert elapsed < steps * 1.0 / 4  # a hub that waited for the sink: ≥ 1 s per step
    assert elapsed < 3 * baseline + 2.0  # the same pace as without the slow sink, give or take a busy CPU
    assert hub.dropped > 0  # images/histograms over capacity, counted …
    dropped = [e.value for e in recorder.of(Scalar) if e.tag == "telemetry/dropped"]
    assert dropped[-1] > 0  # … and reported
    assert [e.step for e in recorder.of(Scalar) if e.tag == "train/loss"] == list(range(1, steps + 1))
    assert [e.step for e in recorder.of(MemorySample)] == list(range(1, steps + 1))
