"""env.json from `runner train`, and `runner diff` on two runs that differ in a flag (without torch)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.support.report import run_report
from tests.support.runs import ROOT, Outcome, run_runner

TINY = ["--image-size", "16", "--no-progress", "--no-graph", "--resume", "never", "--model", "mlp", "--batch-size",
        "4", "--samples", "40", "--val-split", "0.2", "--eval-every", "3", "--steps", "6", "--log-every", "2",
        "--viz", "none"]


def _diff(*args: str) -> tuple[int, str, str]:
    from runner.cli import app

    result = CliRunner().invoke(app, ["diff", *args])
    return result.exit_code, result.stdout, result.stderr


def _two_runs(cli: Callable[..., Outcome], run_dir: Path, code: Path | None = None) -> None:
    """Runs a and b, differing in --lr; with `code` (a git work tree), b runs with an uncommitted change."""
    for name, lr in (("a", "0.001"), ("b", "0.01")):
        if code is not None and name == "b":
            (code / "train.py").write_text("print('changed')\n")
        out = cli("train", *TINY, "--lr", lr, "--run-dir", str(run_dir), "--name", name)
        assert out.code == 0, out.stderr


def _code_tree(folder: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A git work tree with one commit, as the code of the runs (this repository changes under the tests)."""
    from runner.diagnosis import provenance

    folder.mkdir()
    (folder / "train.py").write_text("print('train')\n")
    commit = ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c"]
    for cmd in (["init", "-q"], ["add", "train.py"], commit):
        subprocess.run(["git", "-C", str(folder), *cmd], check=True, capture_output=True, timeout=30)
    monkeypatch.setattr(provenance, "code_folder", lambda: folder)
    return folder


def test_train_writes_env_json_and_diff_shows_what_changed(cli, tmp_path: Path, monkeypatch) -> None:
    runs = tmp_path / "runs"
    _two_runs(cli, runs, _code_tree(tmp_path / "code", monkeypatch))
    env = json.loads((runs / "a" / "env.json").read_text())
    assert env["config"]["lr"] == 0.001 and env["world_size"] == 1
    assert env["packages"]["torch"] == env["devices"]["torch"].split("+")[0]
    assert env["python"]["version"] == ".".join(map(str, sys.version_info[:3]))
    assert env["host"]["name"] and len(env["git"]["commit"]) == 40 and env["git"]["dirty"] is False
    assert env["command"]["argv"] == sys.orig_argv  # the process's own command line (pytest's, in-process)

    findings = runs / "b" / "findings.json"  # B also raised a finding A did not
    findings.write_text(json.dumps([{"kind": "input_bound", "severity": "warning", "message": "waits for data",
                                     "evidence": {}, "advice": "", "step": 4, "rank": 0}]))
    code, out, err = _diff("a", "b", "--run-dir", str(runs), "--json")
    assert code == 0, err
    diff = json.loads(out)
    assert diff["config"] == {"lr": [0.001, 0.01]}  # the flag, and only it (the name is always different)
    assert diff["packages"] == {} and diff["hardware"] == {}  # same packages, same machine
    changed = json.loads((runs / "b" / "env.json").read_text())["git"]
    assert diff["code"] == {"git_dirty": [False, True], "git_diff_sha256": [None, changed["diff_sha256"]]}
    loss = diff["metrics"]["final"]["train/loss"]
    assert loss["diff"] == loss["b"] - loss["a"] and loss["a"] > 0
    assert set(diff["time_ms"]) >= {"step", "forward", "backward", "optimizer", "data_wait"}
    assert diff["findings"] == {"only_a": {}, "only_b": {"input_bound": {"severity": "warning", "step": 4,
                                                                         "message": "waits for data"}}}
    best = diff["metrics"]["best"]  # best.pt's --monitor value (val/loss) and step, side by side
    assert set(best) == {"val/loss", "val/loss (step)"} and best["val/loss"]["a"] > 0
    assert best["val/loss (step)"]["a"] in (3, 6) and diff["metrics"]["final"]["val/loss"]["b"] > 0

    code, text, _ = _diff(str(runs / "a"), str(runs / "b"))  # folders work as well as names
    assert code == 0
    assert "lr: 0.001 -> 0.01" in text and "packages: same" in text and "train/loss" in text
    assert "findings only in B: input_bound at step 4" in text and "git_dirty: False -> True" in text
    code, text, _ = run_report("b", "--run-dir", str(runs))
    assert code == 0 and "env: torch " in text and "+ uncommitted diff" in text  # env.json's short form
    code, _, err = _diff("a", "nope", "--run-dir", str(runs))
    assert code == 2 and "no run 'nope'" in err


def test_diff_does_not_import_torch(cli, tmp_path: Path, monkeypatch) -> None:
    runs = tmp_path / "runs"
    _two_runs(cli, runs, _code_tree(tmp_path / "code", monkeypatch))
    (runs / "b" / "env.json").unlink()  # a run from before env.json: the config comes from config.toml
    code = ("import sys, time\nstart = time.perf_counter()\nfrom runner.cli import main\n"
            f"sys.argv = ['runner', 'diff', 'a', 'b', '--json', '--run-dir', {str(runs)!r}]\n"
            "try:\n    main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
            "print('torch' in sys.modules, round(time.perf_counter() - start, 3), file=sys.stderr)")
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    imported, seconds = proc.stderr.split()[-2:]
    assert imported == "False", proc.stderr
    print(f"runner diff: {seconds} s in-process, {time.monotonic() - started:.2f} s with interpreter start")
    diff = json.loads(proc.stdout)
    assert diff["config"] == {"lr": [0.001, 0.01]} and diff["b"]["env"] is False and diff["code"] == {}


def test_supervised_run_records_the_users_command(tmp_path: Path) -> None:
    """Under the supervisor the trainer is a child started as `python -m runner.train --config ...`:
    env.json keeps that and the command that started the run."""
    out = run_runner("train", *TINY, "--run-dir", str(tmp_path), "--name", "sup", "--lr", "0.002")
    assert out.code == 0, out.stderr
    command = json.loads((tmp_path / "sup" / "env.json").read_text())["command"]
    assert command["argv"][1:3] == ["-m", "runner.train"]
    assert command["run_argv"][-4:] == ["--name", "sup", "--lr", "0.002"] and "train" in command["run_argv"]
