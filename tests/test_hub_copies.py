"""The hub bounds pending heavy *copies*: one step's histograms share one stacked copy and count once,
so a model of thousands of parameter tensors loses none; what is dropped is counted per sink and kind."""

from __future__ import annotations

import threading

import numpy as np

from runner.telemetry import tags
from runner.telemetry.events import Event, Histogram, Sink
from runner.telemetry.hub import Hub


class Held(Sink):
    """Takes nothing until released: everything emitted meanwhile waits in its queue."""

    def __init__(self) -> None:
        self.release, self.events = threading.Event(), []

    def write(self, event: Event) -> None:
        self.release.wait(30)
        self.events.append(event)


def test_a_steps_histograms_count_as_one_copy_and_drops_are_named() -> None:
    sink = Held()
    hub = Hub([sink], capacity=1024)
    table = np.zeros((3000, 69))  # one step of a 1,500-tensor model: weights and gradients, one copy
    for row in range(3000):
        hub.emit(Histogram(tag=f"weights/layer{row}", step=1, data=table, row=row))
    for i in range(1100):  # histograms each with its own copy: 1,023 more fit
        hub.emit(Histogram(tag=f"weights/alone{i}", step=2, data=np.zeros(69)))
    assert hub.dropped_by() == {("Held", "Histogram"): 1100 - 1023}
    assert hub.health()[tags.dropped("Held", "Histogram")] == 77.0
    sink.release.set()
    assert hub.close(timeout=30)
    assert len(sink.events) == 3000 + 1023
