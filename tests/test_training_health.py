"""Through the CLI: the README's divergence command raises a spike warning naming its step, the
healthy demo raises none, a layer that turns NaN before the first checkpoint is named under the
default --on-nan stop whatever --log-every, and a 1,200-tensor model keeps every histogram."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from runner.telemetry import tags
from tests.support.visdom_server import free_port

TINY = ["--image-size", "16", "--batch-size", "4", "--no-progress", "--no-graph", "--resume", "never"]


def _findings(run: Path) -> dict[str, dict]:
    return {f["kind"]: f for f in json.loads((run / "findings.json").read_text())}


def _accumulator(run: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_divergence_command_raises_a_spike_warning(cli, tmp_path: Path) -> None:
    """`runner train --model cnn --optimizer sgd --lr 3 --on-nan skip --viz both --steps 60` (Visdom away:
    its calls go to visdom.log)."""
    out = cli("train", "--model", "cnn", "--optimizer", "sgd", "--lr", "3", "--on-nan", "skip", "--viz", "both",
              "--steps", "60", "--visdom-url", f"http://127.0.0.1:{free_port()}", "--run-dir", str(tmp_path),
              "--name", "div", "--no-progress")
    assert out.code == 0, out.stderr
    spike = _findings(tmp_path / "div")["loss_spike"]
    assert spike["severity"] == "warning" and 1 <= spike["evidence"]["step"] <= 10
    assert f"at step {spike['evidence']['step']}" in spike["message"] and "--lr" in spike["advice"]
    assert "WARNING loss_spike" in out.stderr
    norms = _accumulator(tmp_path / "div").Scalars(tags.GRAD_GLOBAL)
    assert [e.step for e in norms] == [10, 20, 30, 40, 50, 60]  # every log point, not only histogram steps


@pytest.mark.slow
def test_healthy_demo_raises_no_warning(cli, tmp_path: Path) -> None:
    """`make demo`'s training at its real size: Tiny-UNet, synthetic, 200 steps, batch 8, 64 px."""
    out = cli("train", "--model", "tinyunet", "--data", "synthetic", "--steps", "200", "--batch-size", "8",
              "--image-size", "64", "--viz", "none", "--run-dir", str(tmp_path), "--name", "demo", "--no-progress")
    assert out.code == 0, out.stderr
    assert [f for f in _findings(tmp_path / "demo").values() if f["severity"] != "info"] == []


@pytest.mark.parametrize("log_every", ["1", "10"])
def test_nan_layer_named_before_the_first_checkpoint(cli, tmp_path: Path, log_every: str) -> None:
    """encoder.block2.1 turns NaN at step 6, long before the first checkpoint (step 50), under the default
    --on-nan stop: the step is re-run on the weights it saw, and the last finite state is kept."""
    out = cli("train", *TINY, "--model", "tests.support.models:nan_at_6", "--data", "tests.support.models:Shapes",
              "--steps", "30", "--log-every", log_every, "--viz", "none", "--run-dir", str(tmp_path), "--name", "nan")
    assert out.code == 1
    finding = _findings(tmp_path / "nan")["first_nonfinite"]
    assert finding["evidence"]["module"] == "encoder.block2.1" and finding["evidence"]["where"] == "forward"
    assert finding["evidence"]["weights"].startswith("the weights step 6 saw") and finding["step"] == 6
    state = torch.load(tmp_path / "nan" / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 5 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_every_histogram_of_1200_parameter_tensors(cli, tmp_path: Path) -> None:
    out = cli("train", *TINY, "--image-size", "4", "--model", "tests.support.models:many_layers",
              "--steps", "10", "--hist-every", "5", "--log-every", "5", "--images-every", "1000", "--viz",
              "tensorboard", "--run-dir", str(tmp_path), "--name", "wide")
    assert out.code == 0, out.stderr
    acc = _accumulator(tmp_path / "wide")
    histograms = acc.Tags()["histograms"]
    assert len(histograms) == 2 * 1200
    assert all([e.step for e in acc.Histograms(tag)] == [1, 5, 10] for tag in histograms)
    assert [e.value for e in acc.Scalars(tags.DROPPED)] == [0.0, 0.0]
