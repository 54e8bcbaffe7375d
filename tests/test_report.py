"""`runner report`: a finished run, a live one and one whose trainer was SIGKILLed, from the run's files
and the process registry, without importing torch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support.report import report_json, run_report
from tests.support.runs import ROOT, child_pythonpath

TINY = ["--image-size", "16", "--no-progress", "--no-graph", "--resume", "never", "--model", "mlp"]


def test_finished_run_text_and_json(cli, tmp_path: Path, monkeypatch) -> None:
    out = cli("train", *TINY, "--batch-size", "4", "--samples", "32", "--steps", "6", "--log-every", "2",
              "--viz", "tensorboard", "--run-dir", str(tmp_path), "--name", "done")
    assert out.code == 0, out.stderr
    report = report_json(tmp_path, "done")
    assert report["status"] == "finished" and report["reason"].startswith("finished at step 6")
    assert report["step"] == 6 and report["total_steps"] == 6 and report["findings"] == []
    parts = report["time"]["parts_ms"]
    assert set(parts) >= {"data_wait", "forward", "backward", "optimizer"}
    assert abs(sum(parts.values()) / report["time"]["step_ms"] - 1) < 0.05  # the parts add up to the step
    assert report["memory"]["peak_bytes"]["memory/rss"] > 0 and report["memory"]["estimate_bytes"]["total"] > 0
    assert report["dashboards"]["tensorboard"]["event_files"] and report["checkpoint"].endswith("last.pt")

    trace = tmp_path / "done" / "profile" / "trace.json"  # what --profile leaves (the trainer writes it)
    trace.parent.mkdir()
    trace.write_text("{}")
    code, text, _ = run_report(str(tmp_path / "done"))  # a folder works as well as a name
    assert code == 0
    assert "status: finished" in text and "steps: 6/6" in text and "findings: none" in text
    assert "time per step:" in text and "TensorBoard: " in text and "peak memory: rss" in text
    assert f"profile: {trace}" in text and report_json(tmp_path, "done")["profile"] == [str(trace)]
    assert len(text.splitlines()) <= 25  # one screen

    monkeypatch.setenv("RUNNER_RUN_DIR", str(tmp_path))
    assert run_report("done", "--json")[0] == 0
    code, _, err = run_report("nope")
    assert code == 2 and err.count("\n") == 1 and "no run 'nope'" in err


def test_report_does_not_import_torch(cli, tmp_path: Path) -> None:
    cli("train", *TINY, "--batch-size", "4", "--samples", "16", "--steps", "2", "--log-every", "1", "--viz", "none",
        "--run-dir", str(tmp_path), "--name", "light")
    code = ("import sys\nfrom runner.cli import main\nsys.argv = ['runner', 'report', 'light', '--json', '--run-dir', "
            f"{str(tmp_path)!r}]\ntry:\n    main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
            "print('torch imported' if 'torch' in sys.modules else 'no torch', file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().endswith("no torch")
    assert json.loads(proc.stdout)["status"] == "finished"


def wait_for(predicate, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("timed out")


def summary_at_step(path: Path) -> dict | None:
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return summary if summary.get("step", 0) >= 1 else None


def test_live_then_sigkilled_run(tmp_path: Path) -> None:
    """A real `runner train` (supervisor + trainer): live while it trains; after SIGKILL of the trainer,
    'killed', with the signal from the supervisor's record in the registry."""
    env = dict(os.environ, PYTHONPATH=child_pythonpath())
    proc = subprocess.Popen([sys.executable, "-m", "runner", "train", *TINY, "--data", "tests.support.models:slow_data",
                             "--batch-size", "2", "--steps", "500", "--log-every", "1", "--viz", "none",
                             "--run-dir", str(tmp_path), "--name", "live"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        summary = wait_for(lambda: summary_at_step(tmp_path / "live" / "summary.json"))
        report = report_json(tmp_path, "live")
        assert report["status"] == "live" and report["reason"].startswith("training, step")
        os.kill(summary["process"]["pid"], signal.SIGKILL)
        assert proc.wait(timeout=60) == 128 + signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    report = report_json(tmp_path, "live")
    assert report["status"] == "killed" and "SIGKILL" in report["reason"]
    assert report["exit_code"] == 128 + signal.SIGKILL and report["step"] >= 1
    code, text, _ = run_report("live", "--run-dir", str(tmp_path))
    assert code == 0 and "status: killed" in text
