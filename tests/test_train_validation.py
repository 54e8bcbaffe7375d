"""Issue 20 through the trainer: evaluation and best.pt, clipping and accumulation in the loop,
the schedule across a resume, the overfitting finding, a user's own task, --compile, the flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from runner.diagnosis.report import build_report, render
from runner.diagnosis.rules import Rules
from runner.diagnosis.summary import RunSummary
from runner.telemetry import tags
from runner.telemetry.events import Event, Finding, ImageGrid, Scalar, Sink, Text
from runner.telemetry.hub import Hub

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SMALL = dict(model="mlp", image_size=8, channels=1, batch_size=8, samples=64, lr=0.01)


class Recorder(Sink):
    def __init__(self) -> None:
        self.events: list[Event] = []

    def write(self, event: Event) -> None:
        self.events.append(event)

    def scalars(self, tag: str) -> list[tuple[int, float]]:
        return [(e.step, e.value) for e in self.events if isinstance(e, Scalar) and e.tag == tag]


def _trainer(tmp_path: Path, should_stop=lambda: None, **overrides: object):
    from runner.config import resolve
    from runner.train.loop import Trainer
    from runner.train.strategy import make_strategy

    values = dict(SMALL, device="cpu", graph=False, run_dir=str(tmp_path), name="run", resume="never",
                  progress=False, checkpoint_every=1000, viz="tensorboard")
    values.update(overrides)
    cfg = resolve(None, values)
    cfg.run_path.mkdir(parents=True, exist_ok=True)
    return Trainer(cfg, make_strategy(cfg), should_stop=should_stop)


def _fit(trainer, recorder: Recorder | None = None) -> tuple[int, Recorder]:
    recorder = recorder or Recorder()
    hub = Hub([recorder])
    try:
        if trainer.cfg.resume != "never":
            trainer.resume()
        return trainer.fit(hub), recorder
    finally:
        trainer.close()
        assert hub.close(timeout=30)


def _state(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def test_evaluation_streams_val_values_and_best_pt_follows_the_monitor(tmp_path: Path) -> None:
    code, rec = _fit(_trainer(tmp_path, val_split=0.25, eval_every=3, steps=12, log_every=3))
    assert code == 0
    val = rec.scalars("val/loss")
    assert [s for s, _ in val] == [3, 6, 9, 12] and rec.scalars("val/accuracy")
    assert [s for s, _ in rec.scalars(tags.EVAL_S)] == [3, 6, 9, 12]
    assert any(isinstance(e, ImageGrid) and e.tag == tags.VAL_IMAGES for e in rec.events)
    best_step, best_value = min(val, key=lambda point: point[1])
    checkpoints = tmp_path / "run" / "checkpoints"
    assert _state(checkpoints / "best.pt")["step"] == best_step
    assert _state(checkpoints / "last.pt")["best"] == [pytest.approx(best_value), best_step]
    notes = [e.text for e in rec.events if isinstance(e, Text) and e.tag == tags.BEST]
    assert notes[-1] == f"best.pt: val/loss {best_value:.6g} at step {best_step}"
    summary = RunSummary("run", str(tmp_path / "run"))
    for event in rec.events:
        summary.add(event)
    (tmp_path / "run" / "summary.json").write_text(json.dumps(summary.to_dict([])))
    assert f"best: val/loss {best_value:.6g} at step {best_step}" in render(build_report(tmp_path / "run"))
    # the evaluation's time stays out of the step's: the parts still add up to the step time
    step_ms = rec.scalars(tags.STEP_MS)[-1][1]
    parts = sum(rec.scalars(tags.time_ms(p))[-1][1] for p in tags.TIME_PARTS)
    assert parts == pytest.approx(step_ms, rel=0.05)


def test_monitor_max_of_a_training_tag(tmp_path: Path) -> None:
    code, rec = _fit(_trainer(tmp_path, val_split=0.25, eval_every=2, steps=8, log_every=2,
                              monitor="val/accuracy", monitor_mode="max"))
    assert code == 0
    acc = rec.scalars("val/accuracy")
    first_best = max(acc, key=lambda point: (point[1], -point[0]))  # the earliest of equal maxima
    assert _state(tmp_path / "run" / "checkpoints" / "best.pt")["step"] == first_best[0]


def test_clipping_is_logged(tmp_path: Path) -> None:
    code, rec = _fit(_trainer(tmp_path, clip_grad_norm=1e-4, steps=4, log_every=2))
    assert code == 0
    assert [v for _, v in rec.scalars(tags.CLIPPED_SHARE)] == [1.0, 1.0]
    assert all(v > 1e-4 for _, v in rec.scalars(tags.CLIP_NORM))
    code, rec = _fit(_trainer(tmp_path, clip_grad_norm=1e6, steps=2, log_every=2, name="loose"))
    assert rec.scalars(tags.CLIPPED_SHARE) == [(2, 0.0)]


def test_accumulation_counts_optimizer_steps(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, accumulate=2, steps=6, log_every=3, samples=40)
    assert trainer.per_epoch == 40 // 8 // 2  # optimizer steps per epoch: 2 batches each
    code, rec = _fit(trainer)
    assert code == 0 and _state(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 6
    assert [s for s, _ in rec.scalars(tags.LOSS)] == [3, 6]
    speed = rec.scalars(tags.SAMPLES_PER_S)[-1][1]
    step_ms = rec.scalars(tags.STEP_MS)[-1][1]
    assert speed == pytest.approx(2 * 8 / (step_ms / 1000), rel=0.01)  # 16 samples per optimizer step


def test_resume_mid_schedule_continues_the_same_lr_curve(tmp_path: Path) -> None:
    schedule = dict(lr_schedule="cosine", warmup_steps=3, min_lr=1e-4, steps=12, log_every=1)
    _, straight = _fit(_trainer(tmp_path, name="straight", **schedule))
    first = _trainer(tmp_path, name="split", **schedule)
    first.should_stop = lambda: "SIGTERM" if first.step >= 5 else None
    code, before = _fit(first)
    assert code == 143 and first.step == 5
    _, after = _fit(_trainer(tmp_path, name="split", resume="auto", **schedule))
    lrs = before.scalars(tags.LR) + after.scalars(tags.LR)
    assert [s for s, _ in lrs] == list(range(1, 13))
    assert [v for _, v in lrs] == pytest.approx([v for _, v in straight.scalars(tags.LR)], rel=1e-9)


def random_labels(image_size: int, channels: int, seed: int) -> Dataset:
    """Noise images with random labels: nothing to learn but the training samples themselves."""
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(32, channels, image_size, image_size, generator=g),
                         torch.randint(0, 4, (32,), generator=g))


def test_overfitting_is_found(tmp_path: Path) -> None:
    code, rec = _fit(_trainer(tmp_path, data=f"{__name__}:random_labels", num_classes=4, val_split=0.5,
                              steps=150, eval_every=10, log_every=10, batch_size=8, lr=0.01, viz="none"))
    assert code == 0
    rules = Rules()
    found = [f for event in rec.events for f in rules.observe(event)]
    kinds = {f.kind: f for f in found if isinstance(f, Finding)}
    assert "overfitting" in kinds, [s for s in rec.scalars("val/loss")]
    evidence = kinds["overfitting"].evidence
    assert evidence["val_loss"] == sorted(evidence["val_loss"])
    assert evidence["train_loss"][1] < evidence["train_loss"][0]


def test_own_task_through_the_cli(tmp_path: Path, cli, monkeypatch: pytest.MonkeyPatch) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.syspath_prepend(str(EXAMPLES))
    out = cli("train", "--data", "segmentation:shapes", "--model", "segmentation:model", "--task", "segmentation:task",
              "--image-size", "8", "--channels", "1", "--batch-size", "8", "--steps", "4", "--log-every", "2",
              "--val-split", "0.25", "--eval-every", "2", "--viz", "tensorboard", "--no-graph", "--no-progress",
              "--run-dir", str(tmp_path), "--name", "seg")
    assert out.code == 0, out.stderr
    events = EventAccumulator(str(tmp_path / "seg"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/miou", "val/miou", "train/pixel_accuracy", "val/pixel_accuracy", "val/loss"} <= scalars
    assert all(0 <= e.value <= 1 for e in events.Scalars("val/miou"))
    assert {"images/samples", "images/val_samples"} <= set(events.Tags()["images"])


def test_a_task_without_metrics_is_a_one_line_usage_error(tmp_path: Path, cli) -> None:
    out = cli("train", "--task", "collections:OrderedDict", "--model", "mlp", "--steps", "1",
              "--run-dir", str(tmp_path))
    assert out.code == 2 and "has no loss or metrics(output, target) method" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("flags, message", [
    (["--val-split", "1.5"], "val-split is the held-out fraction"),
    (["--accumulate", "0"], "accumulate must be at least 1"),
    (["--val-split", "0.2", "--val-data", "imagefolder:x"], "either --val-data or --val-split"),
    (["--lr-schedule", "cosin"], "did you mean 'cosine'"),
    (["--min-lr", "1"], "min-lr must lie between 0 and lr"),
    (["--monitor", "loss"], "monitor names a train/ or val/ tag"),
])
def test_new_flags_are_checked(cli, flags: list[str], message: str) -> None:
    out = cli("train", *flags, "--print-config")
    assert out.code == 2 and message in out.stderr


def test_new_flags_round_trip_through_toml(tmp_path: Path, cli) -> None:
    out = cli("train", "--accumulate", "2", "--lr-schedule", "onecycle", "--warmup-steps", "5", "--clip-grad-norm",
              "1.5", "--val-split", "0.1", "--eval-every", "7", "--monitor", "val/accuracy", "--monitor-mode", "max",
              "--channels-last", "--print-config")
    assert out.code == 0
    config = tmp_path / "run.toml"
    config.write_text(out.stdout)
    again = cli("train", "--config", str(config), "--print-config")
    assert again.stdout == out.stdout
    for line in ("accumulate = 2", 'lr_schedule = "onecycle"', "clip_grad_norm = 1.5", "val_split = 0.1",
                 'monitor_mode = "max"', "channels_last = true", "compile = false"):
        assert line in out.stdout


@pytest.mark.slow
def test_compile_trains_the_mlp(tmp_path: Path) -> None:
    """inductor on CPU compiles C++ with g++ (about 20 s for the MLP here)."""
    code, rec = _fit(_trainer(tmp_path, compile=True, steps=3, log_every=3))
    assert code == 0
    (compile_s,) = rec.scalars(tags.COMPILE_S)
    assert compile_s[1] > 0
    assert rec.scalars(tags.STEP_MS)[-1][1] < 1000 * compile_s[1]  # the compile is not in the steps' time


@pytest.mark.slow
def test_ddp_run_accumulates_and_validates(tmp_path: Path) -> None:
    """Real torchrun, 2 gloo ranks: --accumulate 2 (no_sync on the first micro-batch) with a held-out
    validation set; both ranks finish the same optimizer steps, best.pt is written."""
    from tests.support.runs import run_runner

    out = run_runner("train", "--strategy", "ddp", "--nproc", "2", "--model", "mlp", "--image-size", "8",
                     "--channels", "1", "--samples", "64", "--batch-size", "4", "--accumulate", "2", "--steps", "6",
                     "--log-every", "3", "--val-split", "0.25", "--eval-every", "3", "--lr-schedule", "cosine",
                     "--no-progress", "--device", "cpu", "--viz", "none", "--run-dir", str(tmp_path), "--name", "d",
                     timeout=240)
    assert out.code == 0, out.stderr
    assert "finished at step 6" in out.stderr and "val loss" in out.stderr
    assert _state(tmp_path / "d" / "checkpoints" / "best.pt")["step"] in (3, 6)
