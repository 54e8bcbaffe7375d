"""Visdom messages and line series: what one client call carries, and a trace that stays small at any length.

A `Trace` takes points one at a time at the cost of two array appends (the sink sees ~100k scalars
a second), and turns them into numbers once per send (`settle`), vectorised. What it shows is
bounded: past `CAP` points it is decimated to `KEEP` — the newest `EXACT` points as they are, the
older ones as the minimum and the maximum of each of equal step-width buckets — so a pane costs the
server and the browser the same after a million steps as after two thousand, and no peak or dip
disappears. Panes of many traces (a norm per layer) get a smaller cap each (`trace_cap`), so a pane
stays under `PANE_POINTS`. Every exact point still reaches visdom.log (the caller logs what `settle`
returns).
"""

from __future__ import annotations

import json
from array import array
from dataclasses import dataclass
from typing import Any

import numpy as np

# A pane is ~400 px wide: 400 min/max buckets already give every pixel column its extremes. Fewer
# points make the page open faster (the browser's cost grows with the points of the env).
CAP = 2000  # most points a trace holds (and the server gets) before it is decimated
KEEP = 1200  # points left after decimating: the server's pane then grows again from here
EXACT = 400  # newest points never decimated
PANE_POINTS = 20_000  # most points of a pane of many traces (norms of every layer): CAP shrinks to fit
SMALLEST_CAP = 300


def trace_cap(traces: int) -> int:
    """The cap of each trace of a pane of `traces` traces: `CAP`, less in crowded panes (≥ `SMALLEST_CAP`)."""
    return max(SMALLEST_CAP, min(CAP, PANE_POINTS // max(traces, 1)))


@dataclass(frozen=True, slots=True)
class Message:
    """One client call: the endpoint and the JSON body (encoded once, for the log and the POST)."""

    endpoint: str
    body: str

    @classmethod
    def of(cls, endpoint: str, msg: dict[str, Any]) -> Message:
        return cls(endpoint, json.dumps(msg, allow_nan=False, separators=(",", ":")))

    def log_line(self) -> str:
        return f"[{json.dumps(self.endpoint)}, {self.body}]\n"


def short(values: np.ndarray) -> np.ndarray:
    """7 significant digits (float32's): short JSON; NaN for NaN/inf (sent as null: browsers reject those)."""
    values = np.where(np.isfinite(values), values, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        exponent = np.floor(np.log10(np.abs(values)))
    exponent = np.clip(np.nan_to_num(exponent, nan=0.0, posinf=0.0, neginf=0.0), -290, 290)
    scale = 10.0 ** (6 - exponent)
    return np.round(values * scale) / scale


def json_values(values: np.ndarray) -> list[float | None]:
    """A float array as a JSON-ready list, NaN as None."""
    out = values.tolist()
    if np.isnan(values).any():
        out = [None if v != v else v for v in out]
    return out


def finite(value: float) -> float | None:
    """One number as `short` makes it, None for NaN/inf."""
    return json_values(short(np.array([value], dtype=np.float64)))[0]


def decimate(xs: np.ndarray, ys: np.ndarray, keep: int = KEEP, exact: int = EXACT) -> tuple[np.ndarray, np.ndarray]:
    """At most `keep` points: the last `exact` as they are, before them the minimum and the maximum of
    each of `(keep - exact) // 2` buckets of equal step width (points of a bucket holding only NaN: its
    first). Steps must be ascending. Decimating decimated points keeps the extremes: it can repeat."""
    if len(xs) <= keep:
        return xs, ys
    head_x, head_y = xs[:-exact], ys[:-exact]
    buckets = max(1, (keep - exact) // 2)
    edges = np.linspace(float(head_x[0]), float(head_x[-1]), buckets + 1)
    which = np.clip(np.searchsorted(edges, head_x, side="right") - 1, 0, buckets - 1)
    starts = np.flatnonzero(np.r_[True, which[1:] != which[:-1]])  # buckets are runs: steps ascend
    seg = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(which)]))
    nan = np.isnan(head_y)
    low = np.fmin.reduceat(np.where(nan, np.inf, head_y), starts)
    high = np.fmax.reduceat(np.where(nan, -np.inf, head_y), starts)
    chosen = np.zeros(len(head_x), dtype=bool)
    for hit in (head_y == low[seg], head_y == high[seg]):
        idx = np.flatnonzero(hit)
        chosen[idx[np.unique(seg[idx], return_index=True)[1]]] = True  # the first such point of a bucket
    chosen[starts[np.isinf(low)]] = True  # a bucket of NaN only: its first point shows the gap
    keep_idx = np.r_[np.flatnonzero(chosen), np.arange(len(xs) - exact, len(xs))]
    return xs[keep_idx], ys[keep_idx]


class Trace:
    """One line: points not yet settled (`add`: two appends) and the shown points (at most `CAP`).

    `scale` multiplies values when they settle (bytes → MiB); `version` changes whenever the shown
    points are rewritten rather than extended (decimated), so a receiver knows to take them whole.
    """

    __slots__ = ("new_x", "new_y", "xs", "ys", "scale", "version")

    def __init__(self, scale: float = 1.0) -> None:
        self.new_x, self.new_y = array("q"), array("d")
        self.xs, self.ys = np.empty(0, np.int64), np.empty(0, np.float64)
        self.scale = scale
        self.version = 0

    def __len__(self) -> int:
        return len(self.xs)

    def add(self, step: int, value: float) -> None:
        self.new_x.append(step)
        self.new_y.append(value)

    def extend(self, xs: list[int], ys: list[float | None]) -> None:
        """Points as the log holds them (scaled already: on a trace of scale 1)."""
        self.new_x.extend(int(x) for x in xs)
        self.new_y.extend(np.nan if y is None else float(y) for y in ys)
        if len(self.new_x) > CAP:
            self.settle()

    def settle(self, cap: int = CAP) -> tuple[np.ndarray, np.ndarray]:
        """Move the new points into the shown ones (decimated past `cap`, to 3/5 of it, the newest
        fifth exact); returns the new points, exact."""
        xs, ys = np.empty(0, np.int64), np.empty(0, np.float64)
        if self.new_x:
            xs = np.frombuffer(self.new_x, dtype=np.int64).copy()
            ys = short(np.frombuffer(self.new_y, dtype=np.float64) * self.scale)
            del self.new_x[:], self.new_y[:]
            self.xs, self.ys = np.concatenate((self.xs, xs)), np.concatenate((self.ys, ys))
        if len(self.xs) > cap:
            self.xs, self.ys = decimate(self.xs, self.ys, cap * KEEP // CAP, cap * EXACT // CAP)
            self.version += 1
        return xs, ys

    def points(self, start: int = 0) -> tuple[list[int], list[float | None]]:
        return self.xs[start:].tolist(), json_values(self.ys[start:])
