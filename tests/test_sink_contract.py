"""The sink contract, one canned event stream through every sink the trainer builds (runner/train/sinks.py):
each writes what it `accepts` without raising, takes `flush` and `close` twice, and its output reads back.

The stream is what a short run emits, LogPoint included, so that a sink which acts per log point is
driven as the trainer drives it. Visdom has no server here: its offline log (visdom.log) is the read-back.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from runner.telemetry import tags
from runner.telemetry.events import (
    Event,
    Finding,
    Graph,
    Histogram,
    HParams,
    ImageGrid,
    LogPoint,
    MemorySample,
    Scalar,
    Sink,
    Text,
)

STEPS = 4
FINDING = Finding(tag=tags.FINDINGS, step=3, kind="input_bound", severity="warning",
                  message="the step waits for data", evidence={"share": [0.9]}, advice="raise --workers")


def stream() -> list[Event]:
    """A 4-step run: start, per step scalars, a memory sample and the LogPoint that closes it; images,
    histograms and the graph at step 2; a finding at 3; the end."""
    events: list[Event] = [
        HParams(tag=tags.HPARAMS, step=0, hparams={"model": "mlp", "lr": 0.01}, metrics={tags.LOSS: 0.0}),
        Text(tag=tags.CONFIG, step=0, text='model = "mlp"'),
        Text(tag=tags.STATUS, step=0, text="started"),
        Graph(tag=tags.MODEL, step=0, graph_def=None, nodes=[], layer_table="fc  Linear  (4, 10)  650"),
    ]
    for step in range(1, STEPS + 1):
        events += [Scalar(tag=tags.LOSS, step=step, value=2.0 / step), Scalar(tag=tags.LR, step=step, value=0.01),
                   Scalar(tag=tags.SAMPLES_PER_S, step=step, value=100.0),
                   *(Scalar(tag=tags.time_ms(part), step=step, value=1.0) for part in tags.TIME_PARTS),
                   Scalar(tag=tags.STEP_MS, step=step, value=7.0),
                   MemorySample(tag=tags.MEMORY_SAMPLE, step=step, values={"rss": 1e8, "cpu_percent": 50.0})]
        if step == 2:
            events += [ImageGrid(tag=tags.IMAGES_SAMPLES, step=step, image=np.full((3, 8, 8), 0.5, np.float32),
                                 caption="pred/true: 1/1"),
                       Histogram(tag=tags.weights("fc.weight"), step=step,
                                 data=np.array([-1.0, 1.0, 4.0, 0.0, 2.0, 1.0, 1.0, 1.0, 1.0]))]
        if step == 3:
            events.append(FINDING)
        events.append(LogPoint(step=step))
    return [*events, Text(tag=tags.STATUS, step=STEPS, text="finished"),
            HParams(tag=tags.HPARAMS, step=STEPS, hparams={"model": "mlp", "lr": 0.01},
                    metrics={tags.LOSS: 0.5}, status="finished")]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tensorboard(run: Path) -> Sink:
    from dashboards.tensorboard import TensorBoardSink

    return TensorBoardSink(run)


def visdom(run: Path) -> Sink:
    from dashboards.visdom import VisdomSink

    return VisdomSink(f"http://127.0.0.1:{_closed_port()}", "contract", run / "visdom.log", connect_timeout=0.2)


def console(run: Path) -> Sink:
    from runner.telemetry.console import ConsoleSink

    return ConsoleSink(STEPS, "contract", live=False)


def diagnosis(run: Path) -> Sink:
    from runner.diagnosis.sink import DiagnosisSink

    return DiagnosisSink(run, "contract")


def read_tensorboard(run: Path, stderr: str) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0, "histograms": 0, "tensors": 0})
    events.Reload()
    assert [e.step for e in events.Scalars(tags.LOSS)] == list(range(1, STEPS + 1))
    assert [e.step for e in events.Scalars(tags.reading("rss"))] == list(range(1, STEPS + 1))
    assert [e.step for e in events.Images(tags.IMAGES_SAMPLES)] == [2]
    assert [e.step for e in events.Histograms(tags.weights("fc.weight"))] == [2]
    statuses = [e.tensor_proto.string_val[0].decode() for e in events.Tensors(f"{tags.STATUS}/text_summary")]
    assert statuses[-1] == "finished"


def read_visdom(run: Path, stderr: str) -> None:
    from dashboards.visdom_places import line_place
    from tests.support.visdom_server import logged

    place = line_place(tags.LOSS)
    xs, ys = logged(run / "visdom.log", place.win, place.series)
    assert xs == list(range(1, STEPS + 1)) and ys == pytest.approx([2.0 / step for step in xs], rel=1e-6)  # float32


def read_console(run: Path, stderr: str) -> None:
    assert f"step {STEPS}/{STEPS}" in stderr and "loss 0.5000" in stderr
    assert "WARNING input_bound at step 3: the step waits for data" in stderr


def read_diagnosis(run: Path, stderr: str) -> None:
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == STEPS and summary["status"] == "finished"
    assert [f["kind"] for f in json.loads((run / "findings.json").read_text())] == ["input_bound"]


SINKS: dict[str, tuple[Callable[[Path], Sink], Callable[[Path, str], None]]] = {
    "tensorboard": (tensorboard, read_tensorboard), "visdom": (visdom, read_visdom),
    "console": (console, read_console), "diagnosis": (diagnosis, read_diagnosis),
}


@pytest.mark.parametrize("kind", list(SINKS))
def test_every_sink_takes_the_stream_and_reads_back(kind: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    build, read_back = SINKS[kind]
    sink = build(tmp_path)
    sink.bind(lambda event: None)
    taken = [event for event in stream() if isinstance(event, sink.accepts)]
    assert any(isinstance(event, Scalar) for event in taken)
    for event in taken:
        sink.write(event)
    sink.flush()
    sink.flush()
    sink.close()
    sink.close()
    read_back(tmp_path, capsys.readouterr().err)
