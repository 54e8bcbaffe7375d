"""The Visdom sink: one env per run (`<experiment>_<run>`), its panes fed from the event stream in the
layout's order, training never waiting on it.

- Events only touch pane state: a scalar costs a dict lookup and two array appends (the sink alone
  takes ~600k scalars a second on a busy 2-core machine). Every `SEND_EVERY` seconds the new points
  settle (vectorised) and what changed goes out, coalesced: one message per pane, whatever the number
  of events behind it.
- visdom.log gets every point (`dashboards.visdom_log`); the server gets at most `CAP` points a
  trace (`dashboards.visdom_series`), so a pane stays as light after a million steps as after 2000.
- Delivery (`dashboards.visdom_link`) runs on the link's own thread, one batch at a time: the sink
  thread builds the batch (what the server lacks, from the link's cursor) and never waits on the
  network. Batches are paced (a pane's append costs the server more as the pane grows, so a batch that
  took t s is followed after 5 t at the earliest), and while the server is away nothing queues up:
  the panes are the state, and a server that comes back gets them whole. Memory is bounded by the
  number of traces, not the run's length.
No torch or visdom import: `runner dashboards replay` uses this module too.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dashboards.visdom_link import CONNECT_TIMEOUT, READ_TIMEOUT, VisdomConnection, VisdomLink, normalize_url
from dashboards.visdom_log import read_log, rewrite_log
from dashboards.visdom_panes import Panes
from dashboards.visdom_places import ESTIMATE, GRAPH_WIN, LAYERS_WIN, MIB, histogram_win, line_place, text_win, win_id
from dashboards.visdom_render import (
    FindingsText,
    RunText,
    bars_message,
    histogram_message,
    image_message,
    markdown_html,
    text_message,
)
from dashboards.visdom_series import Message, Trace
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

__all__ = ["Message", "VisdomConnection", "VisdomSink", "env_name", "normalize_url", "read_log", "replay",
           "server_for_run"]  # what other modules and the tests import from here

log = logging.getLogger("runner.telemetry")

SEND_EVERY = 1.0  # seconds between sends: points in between go out together
Appends = tuple[Callable[[int], None], Callable[[float], None]]  # a trace's step and value appends
DUTY = 5.0  # a batch that took t seconds to deliver is followed by the next after DUTY * t at the earliest


def env_name(cfg: Any) -> str:
    """`<experiment>_<run>`: Visdom's env tree groups envs by the text before the first `_`, so the
    experiment (`cfg.experiment_name`: `--experiment`, else `<model>-<data kind>`) holds no `_`; a run
    name that starts with the experiment (the default names do) does not repeat it."""
    experiment = re.sub(r"[_/\\]+", "-", cfg.experiment_name) or "runs"
    run = cfg.name.removeprefix(f"{experiment}-") or cfg.name
    return f"{experiment}_{run}"


class VisdomSink(Sink):
    """Events → panes of env `env` → visdom.log always, the server when it answers. Sink thread only."""

    accepts = (Scalar, MemorySample, ImageGrid, Histogram, Graph, Text, HParams, Finding)

    def __init__(self, url: str, env: str, log_path: Path, start_step: int = 0, send_every: float = SEND_EVERY,
                 connect_timeout: float = CONNECT_TIMEOUT, read_timeout: float = READ_TIMEOUT,
                 on_close: Callable[[], None] | None = None) -> None:
        self.env, self.log_path, self.send_every, self.on_close = env, Path(log_path), send_every, on_close
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.panes, self.logged = Panes(env), {}
        if start_step > 0 and self.log_path.is_file():  # resume: what the env had up to the resumed step
            self.panes, self.logged = rewrite_log(self.log_path, env, start_step)
        self._log = open(self.log_path, "a" if start_step > 0 else "w", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self._scalars: dict[str, Appends] = {}
        self._memory: dict[tuple[str, int, int], Trace] = {}
        self.run_text, self.findings = RunText(env), FindingsText()
        self.histograms: dict[str, tuple[int, dict[str, tuple[float, float, np.ndarray]]]] = {}
        self.estimate: dict[str, float] = {}
        self._handlers: dict[type, Callable[[Any], None]] = {
            MemorySample: self._memory_sample, ImageGrid: self._image, Histogram: self._histogram,
            Graph: self._graph, Text: self._text, HParams: self._hparams, Finding: self._finding}
        self.link = VisdomLink(url, env, self.log_path, connect_timeout, read_timeout)
        self._next_send = 0.0

    @classmethod
    def for_run(cls, cfg: Any, start_step: int = 0) -> VisdomSink:
        """The sink of a run: its server (started for the run when none answers), env `env_name(cfg)`."""
        env = env_name(cfg)
        url, on_close = server_for_run(cfg, env)
        return cls(url, env, cfg.run_path / "visdom.log", start_step=start_step, on_close=on_close)

    def unreachable_for(self) -> float:
        """Seconds the server has been unreachable (0 while it answers): the hub's health reads it."""
        return self.link.unreachable_for()

    # --- events ---

    def write(self, event: Event) -> None:
        if type(event) is Scalar:  # the bulk of a long run's events: a lookup and two appends
            add = self._scalars.get(event.tag)
            if add is None:
                add = self._scalar_trace(event)
            if add is not None:
                add[0](event.step)
                add[1](float(event.value))
        else:
            handler = self._handlers.get(type(event))
            if handler is not None:
                handler(event)
        if time.monotonic() >= self._next_send:
            self._send()

    def _line(self, tag: str) -> Trace:
        place = line_place(tag)
        pane = self.panes.line(place.win, place.title, place.ylabel, place.stacked)
        return pane.get(place.series, place.scale)

    def _scalar_trace(self, event: Scalar) -> Appends | None:
        if event.tag.startswith(ESTIMATE):  # the memory estimate's parts: bars of the latest values
            self.estimate[event.tag.removeprefix(ESTIMATE)] = float(event.value) / MIB
            parts, win = dict(self.estimate), win_id("memory estimate")
            self.panes.replace(win).set(lambda: bars_message(win, self.env, parts, "memory estimate (MiB)"))
            return None
        trace = self._line(event.tag)
        add = self._scalars[event.tag] = (trace.new_x.append, trace.new_y.append)  # arrays emptied in place
        return add

    def _memory_sample(self, event: MemorySample) -> None:
        for key, value in event.values.items():
            trace = self._memory.get((key, event.rank, event.world_size))
            if trace is None:
                tag = dict(zip(event.values, event.series(), strict=True))[key]  # the dashboard name of this reading
                trace = self._memory[(key, event.rank, event.world_size)] = self._line(tag)
            trace.add(event.step, value)

    def _image(self, event: ImageGrid) -> None:
        image, win = as_array(event.image), win_id(event.tag)
        caption = f"step {event.step}" + (f" · {event.caption}" if event.caption else "")
        self.panes.replace(win).set(lambda: image_message(win, self.env, image, event.tag, caption), key=event.step)

    def _histogram(self, event: Histogram) -> None:
        kind, _, name = event.tag.partition("/")
        step, rows = self.histograms.get(kind, (event.step, {}))
        if step != event.step:
            step, rows = event.step, {}
        lo, hi, _, _, _, counts = event.unpack()
        rows[name] = (lo, hi, np.array(counts))
        self.histograms[kind] = (step, rows)
        win = histogram_win(kind)
        self.panes.replace(win).set(lambda: histogram_message(win, self.env, kind, step, dict(rows)), key=step)

    def _graph(self, event: Graph) -> None:
        from dashboards.graph_svg import graph_svg

        nodes, table, error = event.nodes, event.layer_table, event.error

        def picture() -> Message:
            svg = graph_svg(nodes, table, title="model graph" + (" (layer table: tracing failed)" if error else ""))
            size = re.search(r'width="(\d+)" height="(\d+)"', svg)
            width, height = (int(size[1]), int(size[2])) if size else (480, 480)
            return text_message(GRAPH_WIN, self.env, svg, "model graph", min(width + 30, 640), min(height + 50, 720))

        self.panes.replace(GRAPH_WIN).set(picture)
        self.panes.replace(LAYERS_WIN).set(
            lambda: text_message(LAYERS_WIN, self.env, markdown_html(table), "model layers", 520, 420))

    def _text(self, event: Text) -> None:
        if event.tag in (tags.CONFIG, tags.STATUS):
            if event.tag == tags.CONFIG:
                self.run_text.config = event.text
            else:
                self.run_text.status.append((event.step, event.text))
            self._run_pane()
            return
        content, win = markdown_html(event.text), text_win(event.tag)
        self.panes.replace(win).set(lambda: text_message(win, self.env, content, event.tag), key=event.step)

    def _hparams(self, event: HParams) -> None:
        if event.metrics:
            self.run_text.metrics = dict(event.metrics)
            self._run_pane()

    def _run_pane(self) -> None:
        text, win = self.run_text.html(), text_win("status")
        self.panes.replace(win).set(lambda: text_message(win, self.env, text, f"run {self.env}", 520, 420))

    def _finding(self, event: Finding) -> None:
        self.findings.add(event.kind, event.severity, event.message, dict(event.evidence), event.advice, event.step)
        text, win = self.findings.html(), text_win("findings")
        self.panes.replace(win).set(lambda: text_message(win, self.env, text, "findings", 560, 360))
        self._next_send = 0.0  # rare, and wanted now (a stall's finding may come while nothing else does)

    # --- delivery ---

    def _send(self, force: bool = False) -> None:
        """Settle the new points and log them; hand the link a batch of what the server lacks when it is
        ready for one (`force`: whatever the pacing, if it is idle)."""
        now = time.monotonic()
        self._next_send = now + self.send_every
        messages = self.panes.log_changes(self.logged, self.panes.settle())
        if messages:
            self._log.writelines(m.log_line() for m in messages)
            self._log.flush()
        if self.link.ready(now, force):
            if not self.link.conn.connected:
                self.link.submit(None)  # connect (or probe a server that was away) first
            else:
                after = dict(self.link.sent)
                batch = self.panes.changes(after)
                if batch:
                    self.link.submit(batch, after, pace=DUTY)

    def flush(self) -> None:
        self._send(force=True)

    def close(self) -> None:
        self._send()
        if self.link.stop(timeout=2 * self.link.conn.read_timeout + 2):  # else stuck on a hung server: leave it
            self.link.deliver(self.panes, final=True)
        self._log.close()
        self.link.close()
        if self.on_close is not None:
            self.on_close()
        if self.link.state != "up":
            log.info("Visdom stayed unreachable: the whole env is in %s; send it with `runner dashboards replay %s`",
                     self.log_path, self.log_path.parent)


def server_for_run(cfg: Any, env: str) -> tuple[str, Callable[[], None] | None]:
    """The Visdom server a run talks to, and what to do when the run ends: --visdom-url; else the
    server recorded for this runs folder; else whatever answers on the local port; else a server
    started for the run (stopped when it ends; its env stays on disk for `runner dashboards up`)."""
    from dashboards import servers

    if cfg.visdom_url:
        return normalize_url(cfg.visdom_url, cfg.visdom_port), None
    running = servers.running_visdom(cfg.run_dir)
    if running is not None:
        return running.local_url.rstrip("/"), None
    url = f"http://127.0.0.1:{cfg.visdom_port}"
    if servers.answers(url + "/", timeout=0.5):
        return url, None
    try:
        server, new = servers.start_for_run(cfg.run_dir, cfg.visdom_port, owner=f"run {cfg.name}")
    except Exception as exc:
        log.warning("could not start a Visdom server on port %d (%s); updates go to %s", cfg.visdom_port,
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__, cfg.run_path / "visdom.log")
        return url, None
    if not new:
        return server.local_url.rstrip("/"), None
    log.info("started a Visdom server for this run: %senv/%s (it stops with the run; `runner dashboards up` "
             "serves the saved env afterwards)", server.local_url, env)

    def release() -> None:
        servers.release(cfg.run_dir, server)
        log.info("stopped this run's Visdom server; env %s is saved in %s", env, servers.visdom_env_path(cfg.run_dir))

    return server.local_url.rstrip("/"), release


def replay(log_path: Path, url: str, timeout: float = 10.0) -> tuple[str, int]:
    """Send the env a visdom.log describes to the server at `url` (every pane whole, lines decimated as a
    live run shows them). Returns (env, panes)."""
    from runner.errors import RunnerError

    panes = read_log(log_path)
    if panes is None:
        raise RunnerError(f"{log_path} holds no Visdom updates")
    link = VisdomLink(url, panes.env, read_timeout=timeout)
    link.deliver(panes, final=True)
    link.close()
    if link.state != "up":
        raise RunnerError(f"Visdom at {url} is unreachable: start it with `runner dashboards up`, then replay again")
    return panes.env, len(panes.panes)
