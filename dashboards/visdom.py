"""The Visdom sink: one env per run, its panes fed from the event stream, training never waiting on it.

- Pane state lives here (line series, the latest image grid, histograms, texts). Every `SEND_EVERY`
  seconds (and on flush/close) what changed becomes messages in the stock client's format.
- Every message is appended to `runs/<name>/visdom.log` as an `[endpoint, msg]` JSON line — what
  `Visdom(log_to_filename=...)` writes and `Visdom.replay_log` replays — so the log alone rebuilds
  the env, and on resume the panes are read back from it.
- The same messages go to the server from the hub's sink thread over one persistent HTTP connection
  with connect and read timeouts (`VisdomLink`). Line panes get only their new points, so a send
  costs the same late in a run as early. A *new* connection may reach a new server (restarted, or
  back after an outage), so the first send on it re-creates every pane whole: the env ends complete.
  Unreachable or too slow: one warning, retries with backoff, one message when it is back.

Why not the stock client for I/O: it has no timeouts (a server that accepts and never answers blocks
it forever, its constructor too), prints a traceback per failed call and reports failure only as a
return value. `requests` pools connections and reconnects silently, which would hide a server
restart; one `http.client` connection gives both the timeouts and a reliable "new connection" signal.
No torch or visdom import: `runner dashboards replay` uses this module too.
"""

from __future__ import annotations

import base64
import hashlib
import html
import http.client
import io
import json
import logging
import math
import os
import re
import socket
import time
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import numpy as np

from runner.telemetry.events import (SYSTEM_READINGS, Event, Graph, HParams, Histogram, ImageGrid, MemorySample, Scalar,
                                     Text, as_array)

log = logging.getLogger("runner.telemetry")

SEND_EVERY = 1.0  # seconds between sends: points in between go out together
SAVE_EVERY = 30.0  # seconds between asking the server to write the env to its -env_path
BACKOFF = (1.0, 30.0)  # first and longest wait between reconnection attempts
CONNECT_TIMEOUT, READ_TIMEOUT = 1.0, 3.0
MIB = float(1 << 20)
# Panes group what TensorBoard's custom-scalars page groups (dashboards/tensorboard.py LAYOUT).
CUDA_KEYS = ("allocated", "reserved", "active", "peak")  # one pane: "CUDA memory"
COUNT_KEYS = ("alloc_retries", "ooms")  # under memory/ but counts, not bytes
TIME_TAGS = ("train/step_time_ms", "train/data_wait_ms")  # one pane: "step time and data wait"
ESTIMATE = "memory/estimate_"  # the memory estimate's parts: one bar chart
STATUS_LINES = 30


# --- messages and panes ------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Message:
    """One client call: the endpoint and the JSON body (encoded once, for the log and the POST)."""

    endpoint: str
    body: str

    @classmethod
    def of(cls, endpoint: str, msg: dict[str, Any]) -> "Message":
        return cls(endpoint, json.dumps(msg, allow_nan=False, separators=(",", ":")))

    def log_line(self) -> str:
        return f"[{json.dumps(self.endpoint)}, {self.body}]\n"


def _finite(value: float) -> float | None:
    """JSON-safe and short: 7 significant digits (float32's), None for NaN/inf (browsers reject those)."""
    return float(f"{value:.7g}") if math.isfinite(value) else None


class Series:
    """One line's points, compact (16 bytes a point): steps and values, NaN standing for 'no value'."""

    __slots__ = ("xs", "ys")

    def __init__(self) -> None:
        self.xs, self.ys = array("q"), array("d")

    def __len__(self) -> int:
        return len(self.xs)

    def add(self, step: int, value: float) -> None:
        self.xs.append(step)
        short = _finite(value)
        self.ys.append(math.nan if short is None else short)

    def extend(self, xs: Iterable[int], ys: Iterable[float | None]) -> None:
        self.xs.extend(int(x) for x in xs)
        self.ys.extend(math.nan if y is None else float(y) for y in ys)

    def truncate(self, last_step: int) -> None:
        keep = sum(1 for x in self.xs if x <= last_step)
        del self.xs[keep:], self.ys[keep:]

    def points(self, start: int = 0) -> tuple[list[int], list[float | None]]:
        return self.xs[start:].tolist(), [None if y != y else y for y in self.ys[start:].tolist()]


def win_id(key: str) -> str:
    """A pane's window id: its tag with anything but letters, digits, `_.-` made `_`."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key)


class LinePane:
    """A line plot of named series over steps; sent whole once, then appended to."""

    def __init__(self, win: str, opts: dict[str, Any], layout: dict[str, Any]) -> None:
        self.win, self.opts, self.layout = win, opts, layout
        self.series: dict[str, Series] = {}

    @classmethod
    def new(cls, key: str, title: str, ylabel: str = "", legend: bool = False) -> "LinePane":
        opts = {"title": title, "xlabel": "step", "ylabel": ylabel, "showlegend": legend, "markers": False,
                "fillarea": False, "mode": "lines"}
        layout = {"showlegend": legend, "title": title, "margin": {"l": 60, "r": 60, "t": 60, "b": 60},
                  "xaxis": {"title": "step"}}
        if ylabel:
            layout["yaxis"] = {"title": ylabel}
        return cls(win_id(key), opts, layout)

    def get(self, series: str) -> Series:
        found = self.series.get(series)
        if found is None:
            found = self.series[series] = Series()
        return found

    def truncate(self, last_step: int) -> None:
        """Forget points after `last_step` (a resumed run logs them again)."""
        for series in self.series.values():
            series.truncate(last_step)

    def counts(self) -> dict[str, int]:
        return {name: len(series) for name, series in self.series.items()}

    @staticmethod
    def trace(name: str, xs: list[int], ys: list[float | None]) -> dict[str, Any]:
        return {"x": xs, "y": ys, "name": name, "type": "scatter", "mode": "lines", "textposition": "right",
                "line": {}, "marker": {"size": 10, "symbol": "dot", "line": {"color": "#000000", "width": 0.5}}}

    def create(self, env: str) -> Message:
        data = [self.trace(name, *series.points()) for name, series in self.series.items()]
        return Message.of("events", {"data": data, "win": self.win, "eid": env, "layout": self.layout,
                                     "opts": self.opts})

    def appends(self, env: str, sent: dict[str, int]) -> list[Message]:
        """Points added since `sent` (count per series): one message for the series the server has (it
        appends trace by trace; an empty trace adds nothing), one per series new to the pane."""
        known = [name for name in self.series if name in sent]
        grown = [name for name in known if len(self.series[name]) > sent[name]]
        out = []
        if len(known) > 1 and grown:
            data = [self.trace(n, *self.series[n].points(sent[n])) for n in known]
            out.append(self._update(env, data, None))
        elif grown:
            (name,) = grown
            out.append(self._update(env, [self.trace(name, *self.series[name].points(sent[name]))], name))
        for name, series in self.series.items():
            if name not in sent:
                out.append(self._update(env, [self.trace(name, *series.points())], name))
        return out

    def _update(self, env: str, data: list[dict[str, Any]], name: str | None) -> Message:
        msg = {"data": data, "win": self.win, "eid": env, "layout": {}, "opts": self.opts, "append": True}
        if name is not None:
            msg["name"] = name
        return Message.of("update", msg)


class ReplacePane:
    """A pane whose latest content replaces the last (image, histograms, text); built lazily, once."""

    def __init__(self, win: str) -> None:
        self.win = win
        self.version = 0
        self._build: Callable[[], Message] | None = None
        self._message: Message | None = None

    def set(self, build: Callable[[], Message]) -> None:
        self._build, self._message = build, None
        self.version += 1

    def set_message(self, message: Message) -> None:
        self._build, self._message = None, message
        self.version += 1

    def message(self) -> Message | None:
        if self._message is None and self._build is not None:
            self._message, self._build = self._build(), None
        return self._message


Pane = LinePane | ReplacePane
Cursor = dict[str, Any]  # win → what a receiver has: counts per series (line) or a version (replace)


class Panes:
    """The panes of one env, in the order they are first created on a server."""

    def __init__(self, env: str) -> None:
        self.env = env
        self.panes: dict[str, Pane] = {}

    def line(self, key: str, title: str, ylabel: str = "", legend: bool = False) -> LinePane:
        win = win_id(key)
        pane = self.panes.get(win)
        if not isinstance(pane, LinePane):
            pane = self.panes[win] = LinePane.new(key, title, ylabel, legend)
        return pane

    def replace(self, key: str) -> ReplacePane:
        win = win_id(key)
        pane = self.panes.get(win)
        if not isinstance(pane, ReplacePane):
            pane = self.panes[win] = ReplacePane(win)
        return pane

    def changes(self, cursor: Cursor) -> list[Message]:
        """Messages that bring a receiver at `cursor` up to date; advances `cursor`."""
        out: list[Message] = []
        for win, pane in self.panes.items():
            if isinstance(pane, LinePane):
                counts = pane.counts()
                sent = cursor.get(win)
                if not counts or counts == sent:
                    continue
                out += [pane.create(self.env)] if sent is None else pane.appends(self.env, sent)
                cursor[win] = counts
            elif cursor.get(win) != pane.version:
                message = pane.message()
                if message is not None:
                    out.append(message)
                cursor[win] = pane.version
        return out

    def truncate(self, last_step: int) -> None:
        for pane in self.panes.values():
            if isinstance(pane, LinePane):
                pane.truncate(last_step)


def read_log(path: Path) -> Panes | None:
    """The panes a visdom.log describes (line panes with every point, others at their latest); None if empty."""
    panes: Panes | None = None
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            try:
                endpoint, msg = json.loads(line)
                win, data = msg.get("win"), msg.get("data")
            except (ValueError, TypeError, AttributeError):
                if line.endswith("\n"):  # a torn last line (killed mid-write) is expected; others are not
                    log.warning("%s:%d is not a Visdom log entry; skipped", path, number)
                continue
            if panes is None:
                panes = Panes(msg.get("eid") or "main")
            is_line = isinstance(data, list) and bool(data) and all(
                isinstance(t, dict) and t.get("type") == "scatter" for t in data)
            pane = panes.panes.get(win)
            if endpoint == "events" and is_line:
                pane = panes.panes[win] = LinePane(win, msg.get("opts") or {}, msg.get("layout") or {})
                for trace in data:
                    pane.get(trace.get("name", "")).extend(trace["x"], trace["y"])
            elif endpoint == "events":
                pane = panes.panes[win] = ReplacePane(win)
                pane.set_message(Message.of(endpoint, msg))
            elif endpoint == "update" and msg.get("append") and is_line:
                if not isinstance(pane, LinePane):
                    pane = panes.panes[win] = LinePane(win, msg.get("opts") or {}, {})
                names = [msg["name"]] if msg.get("name") else [t.get("name", "") for t in data]
                for name, trace in zip(names, data):
                    pane.get(name).extend(trace["x"], trace["y"])
    return panes


# --- the connection ----------------------------------------------------------------------------

class Unreachable(Exception):
    """The server did not answer in time, refused the connection, or refused us."""


class Rejected(Exception):
    """The server answered this one message with an error (it is skipped)."""


def _reason(exc: BaseException) -> str:
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "no answer in time"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    return str(exc) or type(exc).__name__


class VisdomConnection:
    """One keep-alive HTTP connection to a Visdom server, with connect and read timeouts, and login."""

    def __init__(self, url: str, connect_timeout: float = CONNECT_TIMEOUT, read_timeout: float = READ_TIMEOUT) -> None:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        self.url = url
        self.https = parts.scheme == "https"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if self.https else 80)
        self.base = parts.path.rstrip("/")
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self._conn: http.client.HTTPConnection | None = None
        self._cookie = ""

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def connect(self) -> None:
        kind = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        conn = kind(self.host, self.port, timeout=self.connect_timeout)
        conn.auto_open = 0  # never reconnect silently: a new connection must be noticed
        try:
            conn.connect()
        except OSError as exc:
            conn.close()
            raise Unreachable(_reason(exc)) from None
        self._conn = conn
        user, password = os.environ.get("VISDOM_USERNAME"), os.environ.get("VISDOM_PASSWORD")
        if user and password:  # what the stock client does: the server hashes the sha256 again
            digest = hashlib.sha256(password.encode()).hexdigest()
            self._request(self.base or "/", json.dumps({"username": user, "password": digest}), self.read_timeout)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def post(self, message: Message, timeout: float | None = None) -> str:
        """POST one message; the read timeout grows by a second per MB sent."""
        wait = (timeout or self.read_timeout) + len(message.body) / 1e6
        return self._request(f"{self.base}/{message.endpoint}", message.body, wait)

    def _request(self, path: str, body: str, timeout: float) -> str:
        if self._conn is None:
            raise Unreachable("not connected")
        headers = {"Content-Type": "application/json"}
        if self._cookie:
            headers["Cookie"] = self._cookie
        if self._conn.sock is None:  # the server ended the keep-alive connection
            self.close()
            raise Unreachable("connection closed by the server")
        try:
            self._conn.sock.settimeout(timeout)
            self._conn.request("POST", path, body=body.encode(), headers=headers)
            response = self._conn.getresponse()
            text = response.read().decode(errors="replace")
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise Unreachable(_reason(exc)) from None
        cookie = response.getheader("Set-Cookie")
        if cookie:
            self._cookie = cookie.split(";", 1)[0]
        if response.status in (400, 401, 403):
            self.close()
            hint = " (login required? set VISDOM_USERNAME and VISDOM_PASSWORD)" if response.status == 400 else ""
            raise Unreachable(f"HTTP {response.status}{hint}")
        if response.status >= 300:
            raise Rejected(f"HTTP {response.status} on {path.rsplit('/', 1)[-1] or '/'}")
        return text


class VisdomLink:
    """Delivery to one server: backoff while it is away, and every pane whole on a new connection."""

    def __init__(self, url: str, env: str, log_path: Path | None = None, connect_timeout: float = CONNECT_TIMEOUT,
                 read_timeout: float = READ_TIMEOUT) -> None:
        self.conn = VisdomConnection(url, connect_timeout, read_timeout)
        self.env, self.log_path = env, log_path
        self.sent: Cursor = {}
        self.state = "new"  # new → up ⇄ down
        self.cleared = False  # the first connection closes windows this run will not re-create
        self.backoff = BACKOFF[0]
        self.next_attempt = 0.0
        self.last_save = time.monotonic()
        self.missed = 0
        self.rejected: set[str] = set()

    @property
    def due(self) -> bool:
        return self.state != "down" or time.monotonic() >= self.next_attempt

    def deliver(self, panes: Panes, messages: list[Message], made_from: Cursor | None, made_to: Cursor,
                final: bool = False) -> None:
        """Send `messages` (made from cursor `made_from` to `made_to`), or whatever the server lacks.
        `final`: the last call (try even while backing off, then save the env to the server's disk)."""
        if not (self.due or final):
            self.missed += len(messages)
            return
        for attempt in (1, 2):
            reused = self.conn.connected
            try:
                if not reused:
                    self._open()
                if self.sent == made_from:
                    out, after = messages, dict(made_to)
                else:
                    after = dict(self.sent)
                    out = panes.changes(after)
                for message in out:
                    self._post(message)
                self.sent = after
                if final or time.monotonic() - self.last_save >= SAVE_EVERY:
                    self._post(Message.of("save", {"data": [self.env], "eid": self.env}), timeout=30.0)
                    self.last_save = time.monotonic()
            except Unreachable as exc:
                if reused and attempt == 1:
                    continue  # a keep-alive connection the server dropped: one more try on a new one
                self._went_away(str(exc), len(messages))
                return
            break
        if self.state == "down":
            log.warning("Visdom at %s is back: env %r re-sent in full (%d updates had been missed)",
                        self.conn.url, self.env, self.missed)
        self.state, self.backoff, self.missed = "up", BACKOFF[0], 0

    def _open(self) -> None:
        self.conn.connect()
        self.sent = {}  # maybe a new server: send every pane whole
        self._post(Message(f"env/{quote(self.env, safe='')}", json.dumps({"eid": self.env})))
        if not self.cleared:
            self._post(Message.of("close", {"eid": self.env, "win": None}))
            self.cleared = True

    def _post(self, message: Message, timeout: float | None = None) -> None:
        try:
            self.conn.post(message, timeout)
        except Rejected as exc:
            if message.endpoint not in self.rejected:
                self.rejected.add(message.endpoint)
                log.warning("Visdom at %s rejected an update (%s); skipped", self.conn.url, exc)

    def _went_away(self, reason: str, pending: int) -> None:
        self.conn.close()
        if self.state != "down":
            where = f"; updates go to {self.log_path}" if self.log_path else ""
            log.warning("Visdom at %s is unreachable (%s)%s; retrying in the background", self.conn.url, reason, where)
        self.state = "down"
        self.missed += pending
        self.next_attempt = time.monotonic() + self.backoff
        self.backoff = min(self.backoff * 2, BACKOFF[1])

    def close(self) -> None:
        self.conn.close()


# --- what each event becomes -------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Place:
    """Where a number goes: pane key and title, series name, y label, legend, scale."""

    key: str
    title: str
    series: str
    ylabel: str = ""
    legend: bool = False
    scale: float = 1.0


def scalar_place(tag: str) -> Place:
    """Norms share a pane per kind, per-rank min/max share one, step time and data wait share one."""
    if tag.startswith("norms/") and tag.count("/") >= 2:
        _, kind, name = tag.split("/", 2)
        return Place(f"norms/{kind}", f"norms/{kind}", name, legend=True)
    match = re.fullmatch(r"memory/ranks_(.+)_(min|max)", tag)
    if match:
        return Place(f"memory/ranks_{match[1]}", f"memory/ranks_{match[1]} (MiB)", match[2], "MiB", True, 1 / MIB)
    if tag in TIME_TAGS:
        return Place("train/time_ms", "train/step_time and data_wait (ms)", tag[6:-3], "ms", True)
    return Place(tag, tag, tag.rsplit("/", 1)[-1])


def memory_place(key: str, rank: int, world_size: int) -> Place:
    """memory/<key> (MiB; CUDA allocator counters in one pane) or system/<key>; a series per rank under DDP."""
    ranked = world_size > 1
    if key in SYSTEM_READINGS:
        return Place(f"system/{key}", f"system/{key}", f"rank{rank}" if ranked else key, legend=ranked)
    if key in COUNT_KEYS:
        return Place(f"memory/{key}", f"memory/{key}", f"rank{rank}" if ranked else key, legend=ranked)
    if key in CUDA_KEYS:
        return Place("memory/cuda", "memory/cuda (MiB)", f"{key} rank{rank}" if ranked else key, "MiB", True, 1 / MIB)
    return Place(f"memory/{key}", f"memory/{key} (MiB)", f"rank{rank}" if ranked else key, "MiB", ranked, 1 / MIB)


def _image_message(win: str, env: str, image: np.ndarray, title: str, caption: str) -> Message:
    """A (C, H, W) image in [0, 1] as a PNG image pane, scaled up (nearest) to be at least ~384 px wide."""
    from PIL import Image

    array = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0)
    if array.ndim == 2:
        array = array[None]
    if array.shape[0] == 1:
        array = np.repeat(array, 3, axis=0)
    pixels = (np.clip(array[:3], 0, 1) * 255 + 0.5).astype(np.uint8).transpose(1, 2, 0)
    picture = Image.fromarray(pixels)
    scale = max(1, min(8, 384 // max(picture.width, 1)))
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    src = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    return Message.of("events", {"data": [{"content": {"src": src, "caption": caption}, "type": "image"}],
                                 "win": win, "eid": env,
                                 "opts": {"title": title, "caption": caption, "width": picture.width,
                                          "height": picture.height}})


def _histogram_message(win: str, env: str, kind: str, step: int,
                       rows: dict[str, tuple[float, float, np.ndarray]]) -> Message:
    """Bar charts of one kind's tensors at one step, in one pane: a dropdown picks the tensor."""
    names = list(rows)
    data = []
    for i, name in enumerate(names):
        lo, hi, counts = rows[name]
        width = (hi - lo) / len(counts) if hi > lo else 1.0
        data.append({"type": "bar", "name": name, "visible": i == 0, "x0": _finite(lo + width / 2),
                     "dx": _finite(width), "width": _finite(width), "y": [int(c) for c in counts],
                     "marker": {"color": "#1f77b4" if kind == "weights" else "#ff7f0e"}})
    buttons = [{"label": name, "method": "restyle", "args": [{"visible": [j == i for j in range(len(names))]}]}
               for i, name in enumerate(names)]
    layout = {"showlegend": False, "bargap": 0, "margin": {"l": 50, "r": 20, "t": 50, "b": 40},
              "xaxis": {"title": "value"}, "yaxis": {"title": "count"},
              "updatemenus": [{"buttons": buttons, "direction": "down", "showactive": True, "x": 0, "xanchor": "left",
                               "y": 1.16, "yanchor": "top"}]}
    title = f"{kind} histograms · step {step}"
    return Message.of("events", {"data": data, "layout": layout, "win": win, "eid": env,
                                 "opts": {"title": title, "width": 480, "height": 360}})


def _text_message(win: str, env: str, content: str, title: str, width: int = 480, height: int = 360) -> Message:
    return Message.of("events", {"data": [{"content": content, "type": "text"}], "win": win, "eid": env,
                                 "opts": {"title": title, "width": width, "height": height}})


def _bars_message(win: str, env: str, values: dict[str, float], title: str) -> Message:
    data = [{"type": "bar", "x": list(values), "y": [_finite(v) for v in values.values()],
             "marker": {"color": ["#d62728" if k == "total" else "#1f77b4" for k in values]}}]
    layout = {"showlegend": False, "margin": {"l": 60, "r": 20, "t": 30, "b": 110}, "yaxis": {"title": "MiB"}}
    return Message.of("events", {"data": data, "layout": layout, "win": win, "eid": env, "opts": {"title": title}})


def markdown_html(text: str) -> str:
    """Enough markdown for the runner's texts: tables become HTML tables, other lines stay as they are."""
    out, table = [], []
    for line in [*text.splitlines(), ""]:
        if line.strip().startswith("|"):
            table.append(line)
            continue
        if table:
            out.append(markdown_table_html("\n".join(table)))
            table = []
        if line.strip():
            out.append(f'<div style="font-family:monospace;font-size:12px;white-space:pre">{html.escape(line)}</div>')
    return "".join(out)


def markdown_table_html(table: str) -> str:
    """A markdown table as an HTML table."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.splitlines() if line.strip()]
    rows = [r for r in rows if not all(set(c) <= set("-: ") for c in r)]
    if not rows:
        return ""
    cell = 'style="padding:1px 8px;border-bottom:1px solid #e5e7eb;text-align:{}"'

    def tr(cells: list[str], tag: str) -> str:
        out = []
        for i, c in enumerate(cells):
            bold = c.startswith("**") and c.endswith("**")
            text = html.escape(c.strip("*"))
            out.append(f"<{tag} {cell.format('right' if i == len(cells) - 1 else 'left')}>"
                       f"{f'<b>{text}</b>' if bold else text}</{tag}>")
        return "<tr>" + "".join(out) + "</tr>"

    body = "".join(tr(r, "td") for r in rows[1:])
    return (f'<table style="font-family:monospace;font-size:12px;border-collapse:collapse">'
            f"{tr(rows[0], 'th')}{body}</table>")


class RunText:
    """The run pane: status lines, final metrics and the configuration."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.status: list[tuple[int, str]] = []
        self.config = ""
        self.metrics: dict[str, float] = {}

    def html(self) -> str:
        status = "".join(f"<div>step {step}: {html.escape(text)}</div>" for step, text in self.status[-STATUS_LINES:])
        parts = [f'<div style="font-family:monospace;font-size:12px"><b>run {html.escape(self.name)}</b>{status}']
        if self.metrics:
            rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.6g}</td></tr>" for k, v in self.metrics.items())
            parts.append(f"<br><b>final metrics</b><table>{rows}</table>")
        if self.config:
            parts.append(f"<details open><summary><b>config</b></summary><pre>{html.escape(self.config)}</pre></details>")
        return "".join(parts) + "</div>"


# --- the sink ----------------------------------------------------------------------------------

class VisdomSink:
    """Events → panes of env `env` → visdom.log always, the server when it answers. Sink thread only."""

    def __init__(self, url: str, env: str, log_path: Path, start_step: int = 0, first_panes: Iterable[str] = (),
                 send_every: float = SEND_EVERY, connect_timeout: float = CONNECT_TIMEOUT,
                 read_timeout: float = READ_TIMEOUT, on_close: Callable[[], None] | None = None) -> None:
        self.env, self.log_path, self.send_every, self.on_close = env, Path(log_path), send_every, on_close
        self.panes = Panes(env)
        if start_step > 0 and self.log_path.is_file():
            restored = read_log(self.log_path)
            if restored is not None:
                restored.env = env
                restored.truncate(start_step)
                self.panes = restored
        for tag in first_panes:  # created empty at once, so they lead the env's layout
            self._line(scalar_place(tag)).get(scalar_place(tag).series)
        self.run_text = RunText(env)
        self.histograms: dict[str, tuple[int, dict[str, tuple[float, float, np.ndarray]]]] = {}
        self.estimate: dict[str, float] = {}
        self.logged: Cursor = {}
        self._start_log()
        self.link = VisdomLink(url, env, self.log_path, connect_timeout, read_timeout)
        self._next_send = 0.0

    @classmethod
    def for_run(cls, cfg: Any, start_step: int = 0) -> "VisdomSink":
        """The sink of a run: its server (started for the run when none answers), env `cfg.name`."""
        metric = "train/psnr" if cfg.resolved_task == "denoise" else "train/accuracy"
        url, on_close = server_for_run(cfg)
        return cls(url, cfg.name, cfg.run_path / "visdom.log", start_step=start_step,
                   first_panes=("train/loss", metric), on_close=on_close)

    def _start_log(self) -> None:
        """A fresh log holding the current panes whole (on resume: what the env had up to the resumed step)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.log_path.with_name(f".{self.log_path.name}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(m.log_line() for m in self.panes.changes(self.logged))
        os.replace(tmp, self.log_path)
        self._log = open(self.log_path, "a", encoding="utf-8")

    # --- events ---

    def _line(self, place: Place) -> LinePane:
        return self.panes.line(place.key, place.title, place.ylabel, place.legend)

    def write(self, event: Event) -> None:
        if isinstance(event, Scalar) and event.tag.startswith(ESTIMATE):
            self._estimate(event)
        elif isinstance(event, Scalar):
            place = scalar_place(event.tag)
            self._line(place).get(place.series).add(event.step, float(event.value) * place.scale)
        elif isinstance(event, MemorySample):
            for name, value in event.values.items():
                place = memory_place(name, event.rank, event.world_size)
                self._line(place).get(place.series).add(event.step, value * place.scale)
        elif isinstance(event, ImageGrid):
            self._image(event)
        elif isinstance(event, Histogram):
            self._histogram(event)
        elif isinstance(event, Graph):
            self._graph(event)
        elif isinstance(event, Text):
            self._text(event)
        elif isinstance(event, HParams):
            self.run_text.metrics = event.metrics
            self._run_pane()
        if time.monotonic() >= self._next_send:
            self._send()

    def _image(self, event: ImageGrid) -> None:
        image, win = as_array(event.image), win_id(event.tag)
        caption = f"step {event.step}" + (f" · {event.caption}" if event.caption else "")
        self.panes.replace(event.tag).set(lambda: _image_message(win, self.env, image, event.tag, caption))

    def _histogram(self, event: Histogram) -> None:
        kind, _, name = event.tag.partition("/")
        step, rows = self.histograms.get(kind, (event.step, {}))
        if step != event.step:
            step, rows = event.step, {}
        lo, hi, _, _, _, counts = event.unpack()
        rows[name] = (lo, hi, np.array(counts))
        self.histograms[kind] = (step, rows)
        win = win_id(f"{kind}/histograms")
        self.panes.replace(f"{kind}/histograms").set(
            lambda: _histogram_message(win, self.env, kind, step, dict(rows)))

    def _graph(self, event: Graph) -> None:
        from dashboards.graph_svg import graph_svg

        nodes, table, error = event.nodes, event.layer_table, event.error
        graph_win, layers_win = win_id("model/graph"), win_id("model/layers")

        def picture() -> Message:
            svg = graph_svg(nodes, table, title="model graph" + (" (layer table: tracing failed)" if error else ""))
            size = re.search(r'width="(\d+)" height="(\d+)"', svg)
            width, height = (int(size[1]), int(size[2])) if size else (480, 480)
            return _text_message(graph_win, self.env, svg, "model graph", min(width + 30, 640), min(height + 50, 720))

        self.panes.replace("model/graph").set(picture)
        self.panes.replace("model/layers").set(
            lambda: _text_message(layers_win, self.env, markdown_table_html(table), "model layers", 520, 420))

    def _estimate(self, event: Scalar) -> None:
        self.estimate[event.tag.removeprefix(ESTIMATE)] = float(event.value) / MIB
        parts, win = dict(self.estimate), win_id("memory/estimate")
        self.panes.replace("memory/estimate").set(lambda: _bars_message(win, self.env, parts, "memory/estimate (MiB)"))

    def _text(self, event: Text) -> None:
        if event.tag in ("config", "status"):
            if event.tag == "config":
                self.run_text.config = event.text
            else:
                self.run_text.status.append((event.step, event.text))
            self._run_pane()
            return
        content, win = markdown_html(event.text), win_id(f"text/{event.tag}")
        self.panes.replace(f"text/{event.tag}").set(lambda: _text_message(win, self.env, content, event.tag))

    def _run_pane(self) -> None:
        text, win = self.run_text.html(), win_id("run")
        self.panes.replace("run").set(lambda: _text_message(win, self.env, text, f"run {self.env}", 520, 420))

    # --- delivery ---

    def _send(self, final: bool = False) -> None:
        self._next_send = time.monotonic() + self.send_every
        before = dict(self.logged)
        messages = self.panes.changes(self.logged)
        if messages:
            self._log.writelines(m.log_line() for m in messages)
            self._log.flush()
        self.link.deliver(self.panes, messages, before, self.logged, final=final)

    def flush(self) -> None:
        self._send()

    def close(self) -> None:
        self._send(final=True)
        self._log.close()
        self.link.close()
        if self.on_close is not None:
            self.on_close()
        if self.link.state == "down":
            log.info("Visdom stayed unreachable: the whole env is in %s; send it with `runner dashboards replay %s`",
                     self.log_path, self.log_path.parent)


def server_for_run(cfg: Any) -> tuple[str, Callable[[], None] | None]:
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
    except Exception as exc:  # noqa: BLE001 - no server is no reason to stop training: the log keeps it all
        log.warning("could not start a Visdom server on port %d (%s); updates go to %s", cfg.visdom_port,
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__, cfg.run_path / "visdom.log")
        return url, None
    if not new:
        return server.local_url.rstrip("/"), None
    log.info("started a Visdom server for this run: %senv/%s (it stops with the run; `runner dashboards up` "
             "serves the saved env afterwards)", server.local_url, cfg.name)

    def release() -> None:
        servers.release(cfg.run_dir, server)
        log.info("stopped this run's Visdom server; env %s is saved in %s", cfg.name, servers.visdom_env_path(cfg.run_dir))

    return server.local_url.rstrip("/"), release


def normalize_url(url: str, port: int) -> str:
    """`host`, `host:port`, `http://host/base/` → `http://host:port/base` (`port` when none is given)."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.port is None:
        parts = parts._replace(netloc=f"{parts.netloc}:{port}")
    return parts._replace(path=parts.path.rstrip("/")).geturl()


def replay(log_path: Path, url: str, timeout: float = 10.0) -> tuple[str, int]:
    """Send the env a visdom.log describes to the server at `url` (windows it lacks, whole). Returns (env, panes)."""
    from runner.errors import RunnerError

    panes = read_log(log_path)
    if panes is None:
        raise RunnerError(f"{log_path} holds no Visdom updates")
    link = VisdomLink(url, panes.env, read_timeout=timeout)
    link.deliver(panes, [], None, {}, final=True)
    link.close()
    if link.state != "up":
        raise RunnerError(f"Visdom at {url} is unreachable: start it with `runner dashboards up`, then replay again")
    return panes.env, len(panes.panes)
