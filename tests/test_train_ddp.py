"""The trainer under DDP (real torchrun, gloo, CPU): ranks stay in step when one rank's batch is unreadable."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.train import checkpoint
from tests.support.runs import run_runner


@pytest.mark.slow
def test_a_rank_whose_whole_batch_is_unreadable_keeps_step_with_the_others(tmp_path: Path) -> None:
    """Half the samples are unreadable and each batch holds one, so on most steps some rank has nothing
    to train on while another has a sample. That rank takes a zero-weighted step instead of skipping it,
    so every rank takes one step per batch: one epoch is 16 steps on each rank, and the run reports
    exactly the 16 unreadable samples of that epoch (a rank that skipped would run into a second epoch
    to make up its steps, out of step with the others' data)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = run_runner("train", "--strategy", "ddp", "--nproc", "2", "--data", "tests.support.models:half_unreadable",
                     "--model", "mlp", "--image-size", "8", "--channels", "1", "--batch-size", "1", "--epochs", "1",
                     "--log-every", "4", "--no-progress", "--device", "cpu", "--viz", "tensorboard",
                     "--run-dir", str(tmp_path), "--name", "half", timeout=240)
    assert out.code == 0, out.stderr
    assert "finished at step 16" in out.stderr
    assert checkpoint.load(tmp_path / "half" / "checkpoints" / "last.pt")["step"] == 16
    events = EventAccumulator(str(tmp_path / "half"), size_guidance={"scalars": 0})
    events.Reload()
    skipped = events.Scalars("train/skipped")
    assert [e.step for e in skipped] == [4, 8, 12, 16]
    assert skipped[-1].value == 16  # every sample once over both ranks, half of them unreadable
    assert [e.step for e in events.Scalars("time/skew")] == [4, 8, 12, 16]
    for rank in (0, 1):
        assert [e.step for e in events.Scalars(f"time/step_ms/rank{rank}")] == [4, 8, 12, 16]
