"""The GPU acceptance's own code on real CPU runs (slow): read-back of a real run, the in-process helpers
(memory, estimates, overhead) on CPU, the checks' runs and read-back on CPU, the bundle installing
offline. What only a GPU can give fails here in known ways; anything else is the checks' own bug."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.gpu_checks import judge, readback
from tests.support.runs import ROOT

pytestmark = pytest.mark.slow


def _helper(tmp_path: Path, kind: str, *args: str) -> dict:
    target = tmp_path / f"{kind}.json"
    subprocess.run([sys.executable, "-m", "scripts.gpu_checks.inprocess", kind, str(target), "--device", "cpu",
                    *args], check=True, cwd=ROOT, timeout=300)
    return json.loads(target.read_text())


def test_readback_and_judging_of_a_real_cpu_run(tmp_path: Path) -> None:
    from tests.support.runs import run_runner

    out = run_runner("train", "--model", "cnn", "--image-size", "16", "--samples", "32", "--batch-size", "4",
                     "--steps", "4", "--log-every", "2", "--images-every", "2", "--hist-every", "2", "--no-progress",
                     "--device", "cpu", "--run-dir", str(tmp_path), "--name", "cpu")
    assert out.code == 0, out.stderr
    board = readback.board(tmp_path / "cpu")
    assert not board.error and board.steps("train/loss") == [2, 4] and board.images and board.graph
    result = judge.streams("cpu", 0, {t: board.steps(t) for t in board.scalars}, board.images, board.histograms,
                           board.graph, {"plot": 3, "image": 1}, 4, 2, None)
    assert result.status == "PASS", result.reason
    records, error = readback.findings(tmp_path / "cpu")
    assert error == "" and isinstance(records, list)


def test_inprocess_memory_helper_runs_on_cpu(tmp_path: Path) -> None:
    data = _helper(tmp_path, "memory", "--steps", "4", "--size", "16", "--batch", "4", "--log-every", "2")
    assert data["exit_code"] == 0 and data["reference"] == [0.0] * 4  # one reading per optimizer update
    assert sorted(int(s) for s in data["series"]["memory/rss"]) == [1, 2, 3, 4]


def test_inprocess_estimates_helper_writes_each_row_on_cpu(tmp_path: Path) -> None:
    data = _helper(tmp_path, "estimates", "--rows", "tinyunet,16,2,amp;mlp,16,2,fp32")
    rows = data["rows"]
    assert [(r["model"], r["precision"]) for r in rows] == [("tinyunet", "amp"), ("mlp", "fp32")]
    assert all(r["estimate"] > 0 and "no peak to measure on cpu" in r["error"] for r in rows)
    assert set(rows[0]["parts"]) == {"parameters", "gradients", "optimizer_state", "input_batch", "activations"}


def test_inprocess_overhead_helper_times_steady_steps_on_cpu(tmp_path: Path) -> None:
    data = _helper(tmp_path, "overhead", "--steps", "12", "--size", "16", "--batch", "4", "--pairs", "1",
                   "--seconds", "300")
    assert data["window"] == [2, 10] and len(data["pairs"]) == 1 and all(t > 0 for t in data["pairs"][0])
    assert judge.overhead("o", [tuple(p) for p in data["pairs"]]).summary.startswith("runner ")


@pytest.mark.timeout(600)
def test_checks_rehearse_on_cpu(tmp_path: Path) -> None:
    """The GPU checks' runs and read-back, on CPU with small images: each verdict is what CPU can give, so
    any failure left is in the checks' code (run, parse, read back), not in the GPU."""
    from scripts.gpu_checks import checks_train, runs
    from tests.support.visdom_server import VisdomServer

    with VisdomServer(tmp_path / "visdom") as server:
        ctx = runs.Context(work=tmp_path / "work", gpus=0, total_memory=0, visdom_url=server.url, device="cpu",
                           size=32, batch=4)
        fp16, syncs, nvml = checks_train.fp16(ctx, 300)
    # everything but what only CUDA has: CPU autocast is bf16 without a GradScaler, no sync debug, no NVML
    assert fp16.status == "FAIL" and fp16.reason.startswith("no train/amp_scale under fp16 + GradScaler"), fp16.reason
    assert fp16.numbers["visdom"].get("image", 0) >= 1 and fp16.numbers["scalar_tags"] > 10
    assert syncs.reason.startswith("the trainer wrote no sync report")
    assert "memory/gpu_total never logged" in nvml.reason
    dp = checks_train.data_parallel(ctx, 300)[0]
    assert dp.status == "PASS", dp.reason
    stop = checks_train.interrupt(ctx, 300)[0]
    assert stop.numbers["pids"] >= 6  # supervisor, trainer, 4 workers
    assert "NVML unavailable" in stop.summary and "exit 130" in stop.summary, stop.summary
    # (whether all were gone within 5 s is not asserted here: this machine's load decides that)
    assert sorted(p.name for p in ctx.logs.iterdir())[:3] == ["01-streams-fp16.cmd", "01-streams-fp16.stderr",
                                                              "01-streams-fp16.stdout"]
