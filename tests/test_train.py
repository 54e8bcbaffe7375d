"""Training end to end: the spine's done-means, resume, NaN handling, checkpoints, bad input."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

from runner.train import checkpoint
from tests.conftest import TINY, run_runner


def _state(run: Path) -> dict:
    return checkpoint.load(run / "checkpoints" / "last.pt")


@pytest.mark.slow
def test_done_means_command_then_resume(tmp_path: Path) -> None:
    base = ["train", "--model", "tinyunet", "--data", "synthetic", "--batch-size", "4", "--image-size", "64",
            "--viz", "none", "--run-dir", str(tmp_path), "--name", "demo"]
    first = run_runner(*base, "--steps", "30")
    assert first.code == 0, first.stderr
    assert (tmp_path / "demo" / "config.toml").is_file()
    assert _state(tmp_path / "demo")["step"] == 30
    second = run_runner(*base, "--resume", "auto", "--steps", "60")
    assert second.code == 0, second.stderr
    assert "at step 30" in second.stderr
    assert _state(tmp_path / "demo")["step"] == 60


def test_resume_continues_exactly(tmp_path: Path, cli) -> None:
    common = ["--model", "mlp", "--lr", "0.05", "--optimizer", "momentum", "--samples", "24", "--run-dir",
              str(tmp_path), "--checkpoint-every", "100", *TINY]
    assert cli("train", *common, "--name", "straight", "--steps", "14").code == 0
    assert cli("train", *common, "--name", "split", "--steps", "5").code == 0
    out = cli("train", *common, "--name", "split", "--steps", "14")
    assert out.code == 0 and "resumed" in out.stderr
    a, b = _state(tmp_path / "straight"), _state(tmp_path / "split")
    assert a["step"] == b["step"] == 14
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=1e-6)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path, cli) -> None:
    out = cli("train", "--model", "spine_helpers:nan_model", "--steps", "20", "--log-every", "2",
              "--checkpoint-every", "5", "--run-dir", str(tmp_path), "--name", "n", *TINY)
    assert out.code == 1
    assert "NaN" in out.stderr and "--on-nan skip" in out.stderr and "Traceback" not in out.stderr
    state = _state(tmp_path / "n")
    assert state["step"] == 5
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_nan_skip_skips_the_step(tmp_path: Path, cli) -> None:
    out = cli("train", "--model", "spine_helpers:nan_once_model", "--steps", "8", "--on-nan", "skip",
              "--run-dir", str(tmp_path), "--name", "s", *TINY)
    assert out.code == 0, out.stderr
    assert "step skipped" in out.stderr
    state = _state(tmp_path / "s")
    assert state["step"] == 8
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_corrupt_checkpoint_is_a_one_line_error(tmp_path: Path, cli) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    out = cli("train", "--model", "mlp", "--steps", "2", "--resume", str(bad), "--run-dir", str(tmp_path), *TINY)
    assert out.code == 2
    assert "corrupt" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_unwritable_run_dir(tmp_path: Path, cli) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = cli("train", "--model", "mlp", "--steps", "2", "--run-dir", str(blocker / "runs"), *TINY)
    assert out.code == 2 and "cannot write to run dir" in out.stderr


def test_non_numeric_flag_is_a_one_line_usage_error() -> None:
    out = run_runner("train", "--steps", "many")
    assert out.code == 2 and "'--steps'" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_debug_shows_the_traceback(cli) -> None:
    out = cli("train", "--model", "vgg", "--debug")
    assert out.code == 2 and "Traceback" in out.stderr and "unknown model" in out.stderr


def test_checkpoint_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pt"
    checkpoint.save({"model": {"w": torch.ones(2)}, "step": 1}, path)

    def torn_write(obj: object, fh) -> None:
        fh.write(b"PK partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_write)
    with pytest.raises(OSError):
        checkpoint.save({"model": {"w": torch.zeros(2)}, "step": 2}, path)
    assert checkpoint.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_help_is_fast_and_does_not_import_torch() -> None:
    import subprocess

    code = ("import sys, runner.cli as c\n"
            "for args in (['--help'], ['train', '--help'], ['cleanup', '--help'], ['memory', '--help'],"
            " ['dashboards', '--help'], ['runs', '--help']):\n"
            "    try: c.app(args)\n"
            "    except SystemExit as e: assert e.code == 0, (args, e.code)\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "--batch-size" in proc.stdout
    assert time.perf_counter() - started < 5  # generous: a torch import alone takes longer here
