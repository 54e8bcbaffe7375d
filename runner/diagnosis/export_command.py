"""`runner export RUN`: every scalar point of a run at full resolution, from its own event files.

The dashboards sample (TensorBoard's UI, Visdom's decimated panes); this is the whole series, for a
notebook or a spreadsheet. Torch-free, and fast: the records are read straight from the files
(`runner/diagnosis/event_reader.py`).
"""

from __future__ import annotations

import csv
import fnmatch
import io
import json
import sys
from typing import Literal

import typer

from runner.cli_errors import run_command


def export(
    run: str = typer.Argument(..., metavar="RUN", help="A run name (under --run-dir) or a run folder."),
    tags: str = typer.Option("*", "--tags", help="Only tags matching this glob (e.g. 'train/*')."),
    fmt: Literal["csv", "jsonl"] = typer.Option("csv", "--format", help="csv (tag,step,wall_time,value) or jsonl."),
    run_dir: str = typer.Option("runs", "--run-dir", envvar="RUNNER_RUN_DIR", help="Folder of runs."),
) -> None:
    """Print every scalar point of RUN (tag, step, wall time, value) in step order per file, after the
    purges of resumed attempts, as CSV or JSON lines."""
    from runner.diagnosis.event_reader import event_files, scalar_points
    from runner.diagnosis.report import find_run
    from runner.errors import RunnerError

    def body() -> int:
        path = find_run(run, run_dir)
        if not event_files(path):
            raise RunnerError(f"{path} has no TensorBoard event files (was it run with --viz none?)")
        points = scalar_points(path)
        wanted = {tag: fnmatch.fnmatchcase(tag, tags) for tag in {p.tag for p in points}}
        field = {tag: (_csv_field(tag) if fmt == "csv" else json.dumps(tag)) for tag in wanted}  # quoted once a tag
        out = sys.stdout
        if fmt == "csv":
            out.write("tag,step,wall_time,value\n")
            out.writelines(f"{field[t]},{s},{w!r},{v!r}\n" for t, s, w, v in points if wanted[t])
        else:
            out.writelines(f'{{"tag": {field[t]}, "step": {s}, "wall_time": {w!r}, "value": {_json_number(v)}}}\n'
                           for t, s, w, v in points if wanted[t])
        return 0

    run_command(body)


def _csv_field(text: str) -> str:
    """`text` as one CSV field (quoted only when it must be, as the csv module does)."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="").writerow([text])
    return buffer.getvalue()


def _json_number(value: float) -> str:
    """A float as JSON writes it (NaN and Infinity as Python's json module spells them)."""
    return json.dumps(value)
