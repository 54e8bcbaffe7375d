"""Reading a run back as plain data for the judges: TensorBoard event files (EventAccumulator), a Visdom
env through its server, findings.json, a --profile folder, an OOM post-mortem folder with its allocator
snapshot. Works on CPU runs too (the CPU tests read real runs with these).

Every reader is guarded: a run that failed early leaves no folder, no env, no file, and reading what
is not there must give an empty result and a note, never an exception that would replace the run's
own error in the verdict."""

from __future__ import annotations

import json
import pickle
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Board:
    """What TensorBoard holds for a run."""

    scalars: dict[str, dict[int, float]] = field(default_factory=dict)
    images: list[str] = field(default_factory=list)
    histograms: list[str] = field(default_factory=list)
    texts: dict[str, list[str]] = field(default_factory=dict)
    graph: bool = False
    error: str = ""  # why nothing could be read ("" when read)

    def steps(self, tag: str) -> list[int]:
        return sorted(self.scalars.get(tag, {}))

    def values(self, tag: str) -> list[float]:
        series = self.scalars.get(tag, {})
        return [series[s] for s in sorted(series)]


def board(run: Path) -> Board:
    """What TensorBoard holds for `run`; an empty Board with `error` set when there is nothing to read."""
    if not any(run.glob("events.out.tfevents.*")):
        return Board(error=f"no TensorBoard event file in {run.name}/")
    try:
        return _board(run)
    except Exception as exc:
        return Board(error=f"TensorBoard read-back failed: {type(exc).__name__}: {exc}")


def _board(run: Path) -> Board:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    out = Board(images=list(tags.get("images", [])), histograms=list(tags.get("histograms", [])),
                graph=bool(tags.get("graph")))
    for tag in tags.get("scalars", []):
        out.scalars[tag] = {e.step: e.value for e in acc.Scalars(tag)}
    for tag in tags.get("tensors", []):
        if tag.endswith("/text_summary"):
            out.texts[tag.removesuffix("/text_summary")] = [
                e.tensor_proto.string_val[0].decode() for e in acc.Tensors(tag) if e.tensor_proto.string_val]
    return out


def visdom_windows(url: str, env: str) -> tuple[dict[str, dict[str, Any]], str]:
    """Every window of `env` as the server holds it (POST /win_data, as the visdom client does), and ""; or
    ({}, why not): the server answers HTTP 500 for an env that was never created."""
    body = json.dumps({"eid": env, "win": None}).encode()
    request = urllib.request.Request(url.rstrip("/") + "/win_data", data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            windows = json.loads(response.read())
    except Exception as exc:
        return {}, f"Visdom env {env!r} not readable: {type(exc).__name__}: {exc}"
    if not isinstance(windows, dict):
        return {}, f"Visdom env {env!r}: unexpected answer {str(windows)[:80]}"
    return windows, ""


def json_dict(path: Path) -> dict[str, Any] | None:
    """A JSON object file, or None when it is missing, cut short or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def findings(run: Path) -> tuple[list[dict[str, Any]], str]:
    """The run's findings.json records, and "" (or [], why not)."""
    return _json_list(run / "findings.json")


def _json_list(path: Path) -> tuple[list[dict[str, Any]], str]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return [], f"no {path.parent.name}/{path.name}"
    except (OSError, ValueError) as exc:
        return [], f"{path.name} unreadable: {exc}"
    return (data, "") if isinstance(data, list) else ([], f"{path.name} is not a list")


@dataclass
class Profile:
    """A --profile folder: the Chrome trace's events by category, and the allocator snapshot's traces."""

    files: list[str]
    categories: dict[str, int]
    snapshot_allocs: int
    error: str = ""


def profile(folder: Path) -> Profile:
    files = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if not files:
        return Profile([], {}, 0, f"no files in {folder.parent.name}/{folder.name}/")
    categories: Counter[str] = Counter()
    allocs, errors = 0, []
    for name in files:
        try:
            if name.startswith("trace") and name.endswith(".json"):
                events = json.loads((folder / name).read_text()).get("traceEvents", [])
                categories.update(str(e.get("cat", "?")) for e in events if isinstance(e, dict))
            elif name.endswith(".pickle"):
                with (folder / name).open("rb") as fh:
                    snapshot = pickle.load(fh)
                allocs += sum(1 for trace in snapshot.get("device_traces", []) for entry in trace
                              if entry.get("action") == "alloc")
        except Exception as exc:
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
    return Profile(files, dict(categories), allocs, "; ".join(errors))


def window_types(windows: dict[str, dict[str, Any]]) -> dict[str, int]:
    return dict(Counter(str(w.get("type", "?")) for w in windows.values()))


@dataclass
class PostMortem:
    files: list[str]
    summary: str
    snapshot_keys: list[str]
    snapshot_ooms: int
    viewer_ok: bool


def post_mortem(folder: Path) -> PostMortem:
    """The OOM folder: its files, memory_summary, and the snapshot as the memory-viz tools read it."""
    files = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    summary_file = folder / "memory_summary.txt"
    summary = summary_file.read_text() if summary_file.is_file() else ""
    keys: list[str] = []
    ooms, viewer_ok = 0, False
    snapshot_file = folder / "memory_snapshot.pickle"
    if snapshot_file.is_file():
        try:
            with snapshot_file.open("rb") as fh:
                snapshot = pickle.load(fh)
        except Exception as exc:  # a dump cut short: the verdict names it instead of crashing
            snapshot = {f"unreadable ({type(exc).__name__})": None}
        keys = sorted(snapshot)
        traces = snapshot.get("device_traces") or []
        ooms = sum(1 for trace in traces for entry in trace if entry.get("action") == "oom")
        viewer_ok = _renders(snapshot)
    return PostMortem(files, summary, keys, ooms, viewer_ok)


def _renders(snapshot: dict[str, Any]) -> bool:
    """torch's own snapshot tools (what pytorch.org/memory_viz runs) turn it into a page and a table."""
    try:
        from torch.cuda import _memory_viz

        return bool(_memory_viz.trace_plot(snapshot)) and bool(_memory_viz.segsum(snapshot))
    except Exception:
        return False
