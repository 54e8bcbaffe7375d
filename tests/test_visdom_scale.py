"""Visdom at any length: line panes decimated on the server (min/max kept, newest points exact) while
visdom.log keeps every point; replay and resume of a long log; a hung server costs the sink nothing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from dashboards.visdom import VisdomSink, read_log, replay
from dashboards.visdom_panes import LinePane
from dashboards.visdom_series import CAP, EXACT, KEEP, PANE_POINTS, decimate, trace_cap
from runner.telemetry.events import Scalar
from tests.support.visdom_server import HungServer, VisdomServer, by_title, line, logged

STEPS = 12_000


def _value(step: int) -> float:
    """A noisy curve with one spike up and one dip down that decimation must keep."""
    if step == 3_333:
        return 50.0
    if step == 6_666:
        return -50.0
    return math.sin(step / 500) + (step * 7919 % 101) / 1000


def _feed(sink: VisdomSink, steps: range) -> None:
    for step in steps:
        sink.write(Scalar(tag="train/loss", step=step, value=_value(step)))
        sink.write(Scalar(tag="train/lr", step=step, value=1e-3))


def test_decimate_keeps_extremes_and_the_newest_points() -> None:
    xs = np.arange(1, 20_001, dtype=np.int64)
    ys = np.array([_value(int(x)) for x in xs])
    ys[100] = math.nan
    dx, dy = decimate(xs, ys)
    assert len(dx) <= KEEP and np.all(np.diff(dx) > 0)
    assert dx[-EXACT:].tolist() == xs[-EXACT:].tolist() and dy[-EXACT:].tolist() == ys[-EXACT:].tolist()
    assert np.nanmax(dy) == 50.0 and np.nanmin(dy) == -50.0
    again = decimate(np.r_[dx, np.arange(20_001, 25_001)], np.r_[dy, np.zeros(5_000)])
    assert np.nanmax(again[1]) == 50.0 and np.nanmin(again[1]) == -50.0  # decimating again keeps them
    assert decimate(xs[:KEEP], ys[:KEEP])[0].tolist() == xs[:KEEP].tolist()  # short: untouched


def test_a_crowded_pane_shares_its_points() -> None:
    """A norm per layer: 40 traces in one pane share `PANE_POINTS`, each keeping its newest points exact."""
    pane = LinePane("weight_norms_per_layer", "weight norms per layer")
    for step in range(1, 4_001):
        for layer in range(40):
            pane.get(f"layer{layer}").add(step, _value(step))
        if step % 500 == 0:
            pane.settle()
    cap = trace_cap(40)
    assert cap < CAP and sum(len(t) for t in pane.series.values()) <= PANE_POINTS
    for trace in pane.series.values():
        assert len(trace) <= cap and trace.xs[-(cap * EXACT // CAP):].tolist() == \
            list(range(4_001 - cap * EXACT // CAP, 4_001))
        assert trace.ys.max() == 50.0  # the spike at step 3333


def test_server_panes_stay_small_and_the_log_keeps_every_point(tmp_path: Path) -> None:
    log = tmp_path / "visdom.log"
    with VisdomServer(tmp_path / "envs") as server:
        sink = VisdomSink(server.url, "long_run", log, send_every=0.02)
        _feed(sink, range(1, STEPS + 1))
        sink.close()
        windows = by_title(server.windows("long_run"))
    steps, values = line(windows["loss"])["loss"]
    assert len(steps) <= CAP and steps == sorted(steps)
    assert steps[-EXACT:] == list(range(STEPS - EXACT + 1, STEPS + 1))  # the newest points exact
    assert values[-1] == round(_value(STEPS), 6) or math.isclose(values[-1], _value(STEPS), rel_tol=1e-6)
    assert max(values) == 50.0 and min(values) == -50.0  # the spike and the dip survive
    assert len(line(windows["learning rate"])["lr"][0]) <= CAP
    xs, ys = logged(log, "loss", "loss")  # the log: every point, exact to 7 digits
    assert xs == list(range(1, STEPS + 1))
    assert all(math.isclose(y, _value(x), rel_tol=1e-6, abs_tol=1e-9) for x, y in zip(xs, ys, strict=True))
    saved = tmp_path / "envs" / "long_run.json"
    assert saved.stat().st_size < 1_000_000  # two traces of at most CAP points
    assert all(len(t["x"]) <= CAP for w in json.loads(saved.read_text())["jsons"].values()
               for t in w["content"]["data"])


def test_replay_and_resume_of_a_long_log(tmp_path: Path) -> None:
    log = tmp_path / "visdom.log"
    sink = VisdomSink("http://127.0.0.1:9", "long_run", log, send_every=0.05)  # nothing listens: log only
    _feed(sink, range(1, STEPS + 1))
    sink.close()
    panes = read_log(log)
    assert panes is not None and len(panes.panes["loss"].series["loss"]) <= CAP
    with VisdomServer(tmp_path / "envs") as server:
        assert replay(log, server.url) == ("long_run", 2)
        steps, values = line(by_title(server.windows("long_run"))["loss"])["loss"]
        assert len(steps) <= CAP and steps[-1] == STEPS and max(values) == 50.0 and min(values) == -50.0
        resumed = VisdomSink(server.url, "long_run", log, start_step=8_000, send_every=0.05)  # checkpoint at 8000
        _feed(resumed, range(8_001, 9_001))
        resumed.close()
        steps, _ = line(by_title(server.windows("long_run"))["loss"])["loss"]
    assert len(steps) <= CAP and steps[-1] == 9_000 and steps[-EXACT:] == list(range(9_001 - EXACT, 9_001))
    assert logged(log, "loss", "loss")[0] == list(range(1, 9_001))  # the rewritten log: every point up to 9000


def test_a_hung_server_costs_the_sink_nothing(tmp_path: Path) -> None:
    """Delivery runs on the link's thread: while it waits on a server that never answers, every event
    still reaches the log, then the link reports how long the server has been away."""
    log = tmp_path / "visdom.log"
    with HungServer() as hung:
        sink = VisdomSink(hung.url, "hung", log, send_every=0, read_timeout=5.0)
        _feed(sink, range(1, 2))  # the first send: the link connects, and its first request waits 5 s
        assert not sink.link.ready(math.inf)
        _feed(sink, range(2, 1_001))
        assert not sink.link.ready(math.inf)  # still waiting on the server...
        assert logged(log, "loss", "loss")[0] == list(range(1, 1_001))  # ...and every event is in the log
        assert sink.link.wait_idle(30)
        assert sink.link.state == "down" and sink.unreachable_for() > 0
        sink.close()
    assert logged(log, "loss", "loss")[0] == list(range(1, 1_001))
