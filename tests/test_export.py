"""`runner export` gives every scalar point of a run's event files (after a resume's purge), without
torch; `runner dashboards up` serves every point of a long scalar tag over TensorBoard's HTTP API."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dashboards import servers
from dashboards.tensorboard import TensorBoardSink
from runner.telemetry.events import Scalar
from tests.support.runs import ROOT, run_runner
from tests.support.visdom_server import free_port


def _write(run: Path, steps: range, purge_step: int | None = None, tags: tuple[str, ...] = ("train/loss",)) -> None:
    sink = TensorBoardSink(run, purge_step=purge_step)
    (run / "config.toml").write_text("[train]\n")  # what makes a folder a run
    for step in steps:
        for i, tag in enumerate(tags):
            sink.write(Scalar(tag=tag, step=step, value=step * 0.5 + i))
    sink.close()


def _accumulated(run: Path) -> set[tuple[str, int, float]]:
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    return {(tag, e.step, e.value) for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}


def test_export_matches_the_event_files(cli, tmp_path: Path) -> None:
    run = tmp_path / "r"
    _write(run, range(1, 31), tags=("train/loss", "train/accuracy", "time/step_ms"))
    _write(run, range(21, 41), purge_step=21, tags=("train/loss", "train/accuracy", "time/step_ms"))  # a resume
    out = cli("export", "r", "--run-dir", str(tmp_path))
    assert out.code == 0, out.stderr
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    exported = {(r["tag"], int(r["step"]), float(r["value"])) for r in rows}
    assert len(rows) == 3 * 40 and exported == _accumulated(run)
    train = cli("export", str(run), "--tags", "train/*", "--format", "jsonl")
    lines = [json.loads(line) for line in train.stdout.splitlines()]
    assert {x["tag"] for x in lines} == {"train/loss", "train/accuracy"} and len(lines) == 80
    missing = cli("export", "nope", "--run-dir", str(tmp_path))
    assert missing.code == 2 and "nope" in missing.stderr


def test_export_does_not_import_torch(tmp_path: Path) -> None:
    _write(tmp_path / "light", range(1, 4))
    code = ("import sys\nfrom runner.cli import main\nsys.argv = ['runner', 'export', 'light', '--run-dir', "
            f"{str(tmp_path)!r}]\ntry:\n    main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
            "print('torch imported' if 'torch' in sys.modules else 'no torch', file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().endswith("no torch") and len(proc.stdout.splitlines()) == 4


@pytest.mark.slow
def test_dashboards_up_serves_every_scalar_point(tmp_path: Path) -> None:
    """TensorBoard's UI would keep a random 1,000 of them without --samples_per_plugin scalars=N."""
    runs, tb = tmp_path / "runs", free_port()
    _write(runs / "long", range(1, 3001))
    up = run_runner("dashboards", "up", "--run-dir", str(runs), "--tb-port", str(tb), "--visdom-port", str(free_port()))
    try:
        assert up.code == 0, up.stderr
        query = urllib.parse.urlencode({"run": "long", "tag": "train/loss"})
        with urllib.request.urlopen(f"http://127.0.0.1:{tb}/data/plugin/scalars/scalars?{query}", timeout=60) as r:
            points = json.loads(r.read())
    finally:
        run_runner("dashboards", "down", "--run-dir", str(runs))
    assert [p[1] for p in points] == list(range(1, 3001))
    assert not servers.recorded(runs)
