"""Where each tag goes in a Visdom env, derived from `dashboards.layout` (the table TensorBoard's
custom-scalars page is built from too): the pane (window id, title, y label, scale, chart) and the
series name, and the order of panes in the env — the layout's groups and panes, then the rest.

Window ids are stable and derived from the layout (`win_id(pane title)`), so the order of a window
can be told from its id alone: `read_log` and `replay` order panes without any extra field in the log.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from dashboards.layout import GROUPS, place
from runner.telemetry import tags

MIB = float(1 << 20)
ESTIMATE = tags.ESTIMATE  # the memory estimate's parts: one bar chart of their latest values
Order = tuple[int, int, int]


def win_id(key: str) -> str:
    """A pane's window id: `key` with anything but letters, digits, `_.-` made `_`."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key)


@dataclass(frozen=True, slots=True)
class LinePlace:
    """A line pane and one of its series: window id, title, y label, scale, stacked."""

    win: str
    title: str
    series: str
    ylabel: str = ""
    scale: float = 1.0
    stacked: bool = False


def _series_name(tag: str, unit: str) -> str:
    """The series' name in its pane: the tag's last part (`rss`, `rss rank1`), a `_ms` unit suffix dropped;
    `val loss` for `val/loss`, which shares its pane with `train/loss`."""
    parts = tag.split("/")
    name = f"{parts[-2]} {parts[-1]}" if len(parts) > 2 and re.fullmatch(r"rank\d+", parts[-1]) else parts[-1]
    if tag.startswith(tags.VAL):
        name = f"val {name}"
    return name.replace("_ms", "") if unit == "ms" else name


@functools.lru_cache(maxsize=4096)
def line_place(tag: str) -> LinePlace:
    """The line pane of a scalar tag (a memory sample's: `MemorySample.series()` names): its layout pane,
    else a pane of its own. Bytes are shown in MiB."""
    found = place(tag)
    pane = found.pane
    if pane is None or not pane.scalar:
        return LinePlace(win_id(tag), tag, tag.rsplit("/", 1)[-1])
    unit, scale = ("MiB", 1 / MIB) if pane.unit == "bytes" else (pane.unit, 1.0)
    title = f"{pane.title} ({unit})" if unit else pane.title
    return LinePlace(win_id(pane.title), title, _series_name(tag, pane.unit), unit, scale, pane.stacked)


def _table() -> dict[str, Order]:
    out: dict[str, Order] = {}
    for g, group in enumerate(GROUPS):
        for p, pane in enumerate(group.panes):
            out.setdefault(win_id(pane.title), (g, p, 0))
    return out


WIN_ORDER = _table()
LAYERS_WIN = "model_layers"  # the layer table: right after the graph picture
GRAPH_WIN = win_id(place(tags.MODEL).pane.title if place(tags.MODEL).pane else "model graph")
WIN_ORDER[LAYERS_WIN] = (*WIN_ORDER.get(GRAPH_WIN, (len(GROUPS), 0, 0))[:2], 1)
OTHER: Order = (len(GROUPS), 0, 0)


def order_of(win: str) -> Order:
    """Where a window goes in the env: layout panes in table order, image panes in the images group,
    text panes by their tag, anything else after every group (then in the order they first appeared)."""
    if win in WIN_ORDER:
        return WIN_ORDER[win]
    for prefix, tag in (("images_", tags.IMAGES + "x"), ("text_", win[5:])):  # any image tag; the text's own
        if win.startswith(prefix):
            found = place(tag)
            return (*found.order, 0) if found.pane is not None else OTHER
    return OTHER


def text_win(tag: str) -> str:
    """The window of a text tag: its layout pane's (findings, run, ...), else `text_<tag>`."""
    found = place(tag)
    return win_id(found.pane.title) if found.pane is not None else win_id(f"text_{tag}")


def histogram_win(kind: str) -> str:
    """The window of a histogram kind (`weights`, `grads`): its layout pane's."""
    found = place(f"{kind}/x")
    return win_id(found.pane.title) if found.pane is not None else win_id(f"{kind}_histograms")
