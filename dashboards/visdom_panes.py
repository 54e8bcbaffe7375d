"""The panes of one Visdom env, and the messages that bring a receiver up to date with them.

Two receivers, told apart by their cursors: visdom.log gets every point exactly once (`log_changes`:
a pane whole when it first appears, then appends of the points settled since), the server gets what
the panes show (`changes`: at most `CAP` points a trace; a trace that was decimated goes whole again).
Panes are kept in the layout's order (`order_of`); on the server a window's place is its creation
index (visdom keeps it in the saved env as `i`, and the page lays windows out in that order), so a
pane that belongs before panes the server already has closes them and they are created again after it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from dashboards.visdom_places import Order, order_of
from dashboards.visdom_series import Message, Trace, json_values, trace_cap

Settled = dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]  # win → series → new points
Cursor = dict[str, Any]  # win → what a receiver has: {series: (version, count)} (line) or a version (replace)


class LinePane:
    """A line plot of named series over steps (stacked areas for parts of a whole)."""

    def __init__(self, win: str, title: str, ylabel: str = "", stacked: bool = False) -> None:
        self.win, self.title, self.ylabel, self.stacked = win, title, ylabel, stacked
        self.series: dict[str, Trace] = {}
        self.order: Order = order_of(win)

    def get(self, series: str, scale: float = 1.0) -> Trace:
        found = self.series.get(series)
        if found is None:
            found = self.series[series] = Trace(scale)
        found.scale = scale  # a trace read back from the log (scaled already) gets the sink's scale
        return found

    def settle(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        out, cap = {}, trace_cap(len(self.series))
        for name, trace in self.series.items():
            xs, ys = trace.settle(cap)
            if len(xs):
                out[name] = (xs, ys)
        return out

    def _layout(self, legend: bool) -> dict[str, Any]:
        layout = {"showlegend": legend, "title": self.title, "margin": {"l": 60, "r": 60, "t": 60, "b": 60},
                  "xaxis": {"title": "step"}}
        if self.ylabel:
            layout["yaxis"] = {"title": self.ylabel}
        return layout

    def _trace(self, name: str, xs: list[int], ys: list[float | None]) -> dict[str, Any]:
        trace = {"x": xs, "y": ys, "name": name, "type": "scatter", "mode": "lines"}
        if self.stacked:
            trace["stackgroup"] = "parts"  # plotly stacks the series of a group: the parts add up to the whole
        return trace

    def _create(self, env: str, data: list[dict[str, Any]]) -> Message:
        opts = {"title": self.title, "xlabel": "step", "ylabel": self.ylabel, "showlegend": len(data) > 1}
        return Message.of("events", {"data": data, "win": self.win, "eid": env, "layout": self._layout(len(data) > 1),
                                     "opts": opts})

    def _update(self, env: str, data: list[dict[str, Any]], name: str | None = None,
                legend: bool = False) -> Message:
        msg = {"data": data, "win": self.win, "eid": env, "layout": {"showlegend": True} if legend else {},
               "append": True}
        if name is not None:
            msg["name"] = name
        return Message.of("update", msg)

    def _grow(self, env: str, have: list[str], new: dict[str, tuple[list[int], list[float | None]]],
              count: int) -> list[Message]:
        """Appends: one message for the series the receiver has (it appends trace by trace, in its order;
        an empty trace adds nothing), one per series new to it."""
        out = []
        grown = [name for name in have if name in new]
        if len(have) > 1 and grown:
            empty: tuple[list[int], list[float | None]] = ([], [])
            out.append(self._update(env, [self._trace(n, *new.get(n, empty)) for n in have]))
        elif grown:
            out.append(self._update(env, [self._trace(grown[0], *new[grown[0]])], grown[0]))
        for name, points in new.items():
            if name not in have:
                count += 1
                out.append(self._update(env, [self._trace(name, *points)], name, legend=count > 1))
        return out

    def changes(self, env: str, have: dict[str, tuple[int, int]] | None) -> tuple[list[Message], dict | None]:
        """What a server that has `have` ({series: (version, count)}) lacks, and what it then has."""
        now = {name: (trace.version, len(trace)) for name, trace in self.series.items() if len(trace)}
        if have == now or not now:
            return [], have
        if have is None or any(now.get(name, (-1,))[0] != version for name, (version, _) in have.items()):
            data = [self._trace(name, *self.series[name].points()) for name in now]
            return [self._create(env, data)], now
        new = {name: self.series[name].points(have[name][1] if name in have else 0) for name in now
               if now[name] != have.get(name)}
        after = dict(have)
        after.update({name: now[name] for name in new})
        return self._grow(env, list(have), new, len(have)), after

    def log_changes(self, env: str, have: list[str] | None,
                    new: dict[str, tuple[np.ndarray, np.ndarray]]) -> tuple[list[Message], list[str]]:
        """The settled points `new` for a log that has the series `have` (None: not the pane)."""
        points = {name: (xs.tolist(), json_values(ys)) for name, (xs, ys) in new.items()}
        if have is None:
            return [self._create(env, [self._trace(name, *p) for name, p in points.items()])], list(points)
        return self._grow(env, have, points, len(have)), have + [name for name in points if name not in have]


class ReplacePane:
    """A pane whose latest content replaces the last (image, histograms, text); built lazily, once.

    `key` (the step) tells a new version from an update of the current one (a histogram pane gets a row
    at a time): a version replaced by another key before visdom.log got it is kept for the log, so the
    log has every image, histogram and text the run showed, not only what each send window ended with.
    """

    def __init__(self, win: str) -> None:
        self.win = win
        self.order: Order = order_of(win)
        self.version = 0
        self.key: object = None
        self.logged = 0  # the version visdom.log has
        self.superseded: list[ReplacePane] = []  # versions replaced before the log got them, oldest first
        self._build: Callable[[], Message] | None = None
        self._message: Message | None = None

    def set(self, build: Callable[[], Message], key: object = None) -> None:
        if key is not None and self.key is not None and key != self.key and self.logged != self.version:
            kept = ReplacePane(self.win)
            kept._build, kept._message = self._build, self._message
            self.superseded.append(kept)
        self._build, self._message, self.key = build, None, key
        self.version += 1

    def set_message(self, message: Message) -> None:
        self._build, self._message = None, message
        self.version += 1

    def message(self) -> Message | None:
        if self._message is None and self._build is not None:
            self._message, self._build = self._build(), None
        return self._message


Pane = LinePane | ReplacePane


class Panes:
    """The panes of one env, kept in layout order (ties: the order they first appeared)."""

    def __init__(self, env: str) -> None:
        self.env = env
        self.panes: dict[str, Pane] = {}

    def line(self, win: str, title: str, ylabel: str = "", stacked: bool = False) -> LinePane:
        pane = self.panes.get(win)
        if not isinstance(pane, LinePane):
            pane = self.panes[win] = LinePane(win, title, ylabel, stacked)
        return pane

    def replace(self, win: str) -> ReplacePane:
        pane = self.panes.get(win)
        if not isinstance(pane, ReplacePane):
            pane = self.panes[win] = ReplacePane(win)
        return pane

    def ordered(self) -> list[Pane]:
        return sorted(self.panes.values(), key=lambda pane: pane.order)  # stable: first seen first on ties

    def settle(self) -> Settled:
        """Every line's new points into its shown ones; returns them (exact) for the log."""
        return {pane.win: new for pane in self.panes.values() if isinstance(pane, LinePane) and (new := pane.settle())}

    def changes(self, cursor: Cursor) -> list[Message]:
        """Messages that bring a server at `cursor` up to date, in layout order; advances `cursor`."""
        out: list[Message] = []
        ordered = [pane for pane in self.ordered() if self._has_content(pane)]
        first_new = next((i for i, pane in enumerate(ordered) if pane.win not in cursor), len(ordered))
        for pane in ordered[first_new + 1:]:  # on the server after a pane it lacks: to be created after it
            if cursor.pop(pane.win, None) is not None:
                out.append(Message.of("close", {"eid": self.env, "win": pane.win}))
        for pane in ordered:
            if isinstance(pane, LinePane):
                messages, after = pane.changes(self.env, cursor.get(pane.win))
                out += messages
                if after is not None:
                    cursor[pane.win] = after
            elif cursor.get(pane.win) != pane.version:
                message = pane.message()
                if message is not None:
                    out.append(message)
                cursor[pane.win] = pane.version
        return out

    def log_changes(self, cursor: Cursor, settled: Settled) -> list[Message]:
        """Messages that give a log at `cursor` the settled points and the changed panes; advances `cursor`."""
        out: list[Message] = []
        for pane in self.panes.values():
            if isinstance(pane, LinePane):
                if pane.win in settled:
                    messages, cursor[pane.win] = pane.log_changes(self.env, cursor.get(pane.win), settled[pane.win])
                    out += messages
            elif cursor.get(pane.win) != pane.version:
                out += [m for old in pane.superseded if (m := old.message()) is not None]
                pane.superseded = []
                message = pane.message()
                if message is not None:
                    out.append(message)
                cursor[pane.win] = pane.logged = pane.version
        return out

    @staticmethod
    def _has_content(pane: Pane) -> bool:
        if isinstance(pane, LinePane):
            return any(len(trace) for trace in pane.series.values())
        return pane.version > 0
