"""visdom.log: every message a run's env got, as `[endpoint, msg]` JSON lines — what
`Visdom(log_to_filename=...)` writes and `Visdom.replay_log` replays — with every point of every line.

Reading it back gives the panes as a server should show them (lines decimated to `CAP` points a
trace as they are read, so memory stays bounded for any length); on resume the log is rewritten
without the points after the resumed step, streaming, so a million-step log never sits in memory.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dashboards.visdom_panes import Cursor, LinePane, Panes, ReplacePane
from dashboards.visdom_series import Message

log = logging.getLogger("runner.telemetry")


def entries(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """The log's `(endpoint, msg)` entries; a torn last line (killed mid-write) is skipped quietly."""
    for endpoint, msg, _ in _lines(path):
        yield endpoint, msg


def _lines(path: Path) -> Iterator[tuple[str, dict[str, Any], str]]:
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            try:
                endpoint, msg = json.loads(line)
                if not isinstance(msg, dict) or not isinstance(endpoint, str):
                    raise TypeError
            except (ValueError, TypeError):
                if line.endswith("\n"):
                    log.warning("%s:%d is not a Visdom log entry; skipped", path, number)
                continue
            yield endpoint, msg, line


def _is_line(data: Any) -> bool:
    return isinstance(data, list) and bool(data) and all(isinstance(t, dict) and t.get("type") == "scatter"
                                                         for t in data)


def _names(msg: dict[str, Any]) -> list[str]:
    """The series an append goes to: `name` for one, else each trace's name (the order the sink sent them)."""
    return [msg["name"]] if msg.get("name") else [str(t.get("name", "")) for t in msg["data"]]


def _apply(panes: Panes, endpoint: str, msg: dict[str, Any]) -> None:
    win, data = str(msg.get("win")), msg.get("data")
    if endpoint == "events" and _is_line(data):
        opts = msg.get("opts") or {}
        pane = panes.panes[win] = LinePane(win, str(opts.get("title", win)), str(opts.get("ylabel", "")),
                                           any("stackgroup" in t for t in data))
        for trace in data:
            pane.get(str(trace.get("name", ""))).extend(trace["x"], trace["y"])
    elif endpoint == "events":
        panes.replace(win).set_message(Message.of(endpoint, msg))
    elif endpoint == "update" and msg.get("append") and _is_line(data):
        pane = panes.panes.get(win)
        if not isinstance(pane, LinePane):
            pane = panes.panes[win] = LinePane(win, win)
        for name, trace in zip(_names(msg), data, strict=False):  # one `name` for a one-trace append
            pane.get(name).extend(trace["x"], trace["y"])


def read_log(path: Path) -> Panes | None:
    """The panes a visdom.log describes (lines decimated as the server shows them, others at their
    latest); None if it holds no entry."""
    panes: Panes | None = None
    for endpoint, msg in entries(path):
        if panes is None:
            panes = Panes(str(msg.get("eid") or "main"))
        _apply(panes, endpoint, msg)
    if panes is not None:
        panes.settle()
    return panes


def _cut(msg: dict[str, Any], last_step: int) -> bool:
    """Drop a line message's points after `last_step`; whether it changed."""
    changed = False
    for trace in msg["data"]:
        if trace["x"] and trace["x"][-1] > last_step:  # steps ascend within a message
            keep = sum(1 for x in trace["x"] if x <= last_step)
            trace["x"], trace["y"], changed = trace["x"][:keep], trace["y"][:keep], True
    return changed


def rewrite_log(path: Path, env: str, last_step: int) -> tuple[Panes, Cursor]:
    """Rewrite `path` (atomically) as env `env` up to `last_step`: line points after it dropped, other
    panes at their latest. Returns the panes and the cursor of what the new log holds."""
    panes, cursor = Panes(env), {}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as out:
        if path.is_file():
            for endpoint, msg, line in _lines(path):
                renamed, msg["eid"] = msg.get("eid") != env, env
                if endpoint in ("events", "update") and _is_line(msg.get("data")):
                    if _cut(msg, last_step) or renamed:
                        if endpoint == "update" and not any(t["x"] for t in msg["data"]):
                            continue  # an append left with no points
                        line = Message.of(endpoint, msg).log_line()
                    out.write(line if line.endswith("\n") else line + "\n")
                    _apply(panes, endpoint, msg)
                    win, have = str(msg["win"]), cursor.get(str(msg["win"]))
                    names = [str(t.get("name", "")) for t in msg["data"]] if endpoint == "events" else _names(msg)
                    cursor[win] = names if endpoint == "events" or have is None else \
                        have + [n for n in names if n not in have]
                elif endpoint == "events":
                    _apply(panes, endpoint, msg)
        for pane in panes.panes.values():
            if isinstance(pane, ReplacePane) and (message := pane.message()) is not None:
                out.write(message.log_line())
                cursor[pane.win] = pane.logged = pane.version
    os.replace(tmp, path)
    panes.settle()
    return panes, cursor
