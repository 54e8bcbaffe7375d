"""Training end to end: the spine's done-means, resume, NaN handling, checkpoints, bad input; what the
loop observes (time breakdown, GradScaler skips, HParams, the first non-finite value, --profile)."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from runner.errors import RunnerError
from runner.telemetry.events import Event, Finding, Histogram, HParams, Scalar, Sink
from runner.telemetry.hub import Hub
from runner.train import checkpoint
from tests.support.runs import TINY, run_runner


def _state(run: Path) -> dict:
    return checkpoint.load(run / "checkpoints" / "last.pt")


@pytest.mark.slow
def test_done_means_command_then_resume(tmp_path: Path) -> None:
    base = ["train", "--model", "tinyunet", "--data", "synthetic", "--batch-size", "4", "--image-size", "64",
            "--viz", "none", "--run-dir", str(tmp_path), "--name", "demo"]
    first = run_runner(*base, "--steps", "10")
    assert first.code == 0, first.stderr
    assert (tmp_path / "demo" / "config.toml").is_file()
    assert _state(tmp_path / "demo")["step"] == 10
    second = run_runner(*base, "--resume", "auto", "--steps", "20")
    assert second.code == 0, second.stderr
    assert "at step 10" in second.stderr
    assert _state(tmp_path / "demo")["step"] == 20


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
    out = cli("train", "--model", "tests.support.models:nan_model", "--steps", "20", "--log-every", "2",
              "--checkpoint-every", "5", "--run-dir", str(tmp_path), "--name", "n", *TINY)
    assert out.code == 1
    assert "NaN" in out.stderr and "--on-nan skip" in out.stderr and "Traceback" not in out.stderr
    state = _state(tmp_path / "n")
    assert state["step"] == 6  # NaN from step 7: no non-finite update was applied, the last finite state is kept
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_nan_skip_skips_the_step(tmp_path: Path, cli) -> None:
    out = cli("train", "--model", "tests.support.models:nan_once_model", "--steps", "8", "--on-nan", "skip",
              "--run-dir", str(tmp_path), "--name", "s", *TINY)
    assert out.code == 0, out.stderr
    assert "step skipped" in out.stderr
    state = _state(tmp_path / "s")
    assert state["step"] == 8
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_nan_skip_gives_up_when_every_batch_fails(tmp_path: Path, cli) -> None:
    """Skipping leaves the weights as they were: when every batch fails, the run stops instead of looping."""
    from runner.train.loop import MAX_NONFINITE_IN_A_ROW

    out = cli("train", "--model", "tests.support.models:nan_model", "--steps", "200", "--on-nan", "skip",
              "--run-dir", str(tmp_path), "--name", "g", *TINY)
    assert out.code == 1
    assert f"loss NaN/inf on {MAX_NONFINITE_IN_A_ROW} batches in a row at step 7" in out.stderr
    assert "Traceback" not in out.stderr
    assert json.loads((tmp_path / "g" / "summary.json").read_text())["status"] == "failed"


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


def test_help_does_not_import_torch() -> None:
    import subprocess

    code = ("import sys, runner.cli as c\n"
            "for args in (['--help'], ['train', '--help'], ['cleanup', '--help'], ['memory', '--help'],"
            " ['dashboards', '--help'], ['runs', '--help'], ['report', '--help']):\n"
            "    try: c.app(args)\n"
            "    except SystemExit as e: assert e.code == 0, (args, e.code)\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "--batch-size" in proc.stdout and "--json" in proc.stdout


# --- observing the run -------------------------------------------------------------------------

class Recorder(Sink):
    """Keeps every event, in order."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def write(self, event: Event) -> None:
        self.events.append(event)


def _trainer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **overrides: object):
    from runner.config import resolve
    from runner.train.loop import Trainer
    from runner.train.strategy import make_strategy

    values = dict(image_size=8, batch_size=4, samples=32, device="cpu", graph=False, run_dir=str(tmp_path),
                  name="run", resume="never", progress=False, checkpoint_every=100)
    values.update(overrides)
    cfg = resolve(None, values)
    cfg.run_path.mkdir(parents=True)
    return Trainer(cfg, make_strategy(cfg))


def _fit(trainer, recorder: Recorder) -> int:
    hub = Hub([recorder])
    try:
        return trainer.fit(hub)
    finally:
        trainer.close()
        assert hub.close(timeout=30)


def test_time_breakdown_adds_up_to_the_step_time(tmp_path: Path, cli) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = cli("train", "--model", "cnn", "--image-size", "16", "--batch-size", "8", "--samples", "64", "--steps", "24",
              "--log-every", "6", "--checkpoint-every", "1000", "--no-graph", "--no-progress", "--viz", "tensorboard",
              "--run-dir", str(tmp_path), "--name", "t")
    assert out.code == 0, out.stderr
    events = EventAccumulator(str(tmp_path / "t"), size_guidance={"scalars": 0})
    events.Reload()
    parts = {p: [e.value for e in events.Scalars(f"time/{p}_ms")]
             for p in ("data_wait", "h2d", "forward", "backward", "optimizer", "telemetry", "other")}
    step = events.Scalars("time/step_ms")
    assert [e.step for e in step] == [6, 12, 18, 24]
    for i, whole in enumerate(e.value for e in step):
        assert all(values[i] >= 0 for values in parts.values())
        assert parts["forward"][i] > 0 and parts["backward"][i] > 0 and parts["optimizer"][i] > 0
        total = sum(values[i] for values in parts.values())
        assert abs(total - whole) <= 0.05 * whole, (i, total, whole)
        # what the named parts leave out (the loop's bookkeeping) is small: they cover the step
        assert parts["other"][i] <= 0.05 * whole, (i, parts["other"][i], whole)
    for tag in ("telemetry/dropped", "telemetry/backlog", "telemetry/unreachable_s"):
        assert [e.step for e in events.Scalars(tag)] == [6, 12, 18, 24]


def test_a_gradscaler_skipped_update_is_counted_and_not_plotted(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """GradScaler on CPU, as --amp gives on CUDA: step 3's gradients are inf, so its update is skipped
    (the scale halves); the loop counts it without a per-step sync and plots no inf histogram."""
    trainer = _trainer(tmp_path, monkeypatch, model="tests.support.models:inf_gradient", steps=6, log_every=2,
                       hist_every=1)
    scaler = torch.amp.GradScaler("cpu")  # every part of a step that holds the scaler gets this one
    trainer.scaler = trainer.runner.scaler = trainer.health.scaler = scaler
    trainer.health.gates = False  # GradScaler gates its updates itself
    recorder = Recorder()
    assert _fit(trainer, recorder) == 0
    scalars = {(e.tag, e.step): float(e.value) for e in recorder.events if isinstance(e, Scalar)}
    assert [scalars[("train/amp_skipped", s)] for s in (2, 4, 6)] == [0, 1, 1]
    assert [scalars[("train/amp_scale", s)] for s in (2, 4, 6)] == [65536.0, 32768.0, 32768.0]
    grads = [e for e in recorder.events if isinstance(e, Histogram) and e.tag.startswith("grads/")]
    assert sorted({e.step for e in grads}) == [1, 2, 4, 5, 6]
    assert all(np.isfinite(e.unpack()[:2]).all() for e in grads)
    assert ("train/grad_norm", 3) not in scalars and ("weights/fc.weight", 3) not in scalars
    assert {e.step for e in recorder.events if e.tag == "weights/fc.weight"} == {1, 2, 3, 4, 5, 6}
    assert math.isfinite(scalars[("train/grad_norm", 4)])
    state = _state(tmp_path / "run")
    assert state["step"] == 6 and state["amp_skipped"] == 1


def test_hparams_open_at_the_start_and_close_with_the_status(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = Recorder()
    assert _fit(_trainer(tmp_path, monkeypatch, model="mlp", steps=3), recorder) == 0
    hparams = [e for e in recorder.events if isinstance(e, HParams)]
    assert [e.status for e in hparams] == ["", "finished"]
    assert sorted(hparams[0].metrics) == ["train/accuracy", "train/loss"]
    assert math.isfinite(hparams[1].metrics["train/loss"]) and hparams[1].hparams["model"] == "mlp"


@pytest.mark.parametrize("on_nan", ["skip", "stop"])
def test_the_first_nonfinite_value_is_located(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, on_nan: str) -> None:
    """skip: the failing step is re-run as it was; stop: the first failing step (5), on the weights it saw
    (no non-finite update was applied) with its batch."""
    model = "tests.support.models:" + ("nan_in_the_middle" if on_nan == "skip" else "nan_in_the_middle_from_5")
    trainer = _trainer(tmp_path, monkeypatch, model=model, steps=8, log_every=2, checkpoint_every=4, on_nan=on_nan)
    recorder = Recorder()
    if on_nan == "skip":
        assert _fit(trainer, recorder) == 0
    else:
        with pytest.raises(RunnerError, match="encoder.faulty"):
            _fit(trainer, recorder)
    findings = [e for e in recorder.events if isinstance(e, Finding)]
    assert len(findings) == 1
    assert findings[0].kind == "first_nonfinite" and findings[0].evidence["module"] == "encoder.faulty"
    assert findings[0].evidence["where"] == "forward"
    expected = ("the weights the step saw" if on_nan == "skip" else
                "the weights step 5 saw (no update from a non-finite step was applied)")
    assert findings[0].evidence["weights"] == expected


def test_profile_writes_a_chrome_trace_of_the_window(tmp_path: Path, cli) -> None:
    out = cli("train", "--model", "mlp", "--steps", "6", "--profile", "2:4", "--run-dir", str(tmp_path), "--name", "p",
              *TINY)
    assert out.code == 0, out.stderr
    trace = json.loads((tmp_path / "p" / "profile" / "trace.json").read_text())
    names = [e.get("name", "") for e in trace["traceEvents"]]
    assert any("addmm" in n for n in names)
    assert names.count("Optimizer.step#Adam.step") == 3  # steps 2, 3 and 4 only
    bad = cli("train", "--model", "mlp", "--profile", "4:2", "--run-dir", str(tmp_path), *TINY)
    assert bad.code == 2 and "START:STOP" in bad.stderr


class FakeCudaEvent:
    """Stands in for torch.cuda.Event where there is no GPU: every interval between two records takes
    7 ms on the "device", and an event completes when the test says so."""

    done = True

    def __init__(self, enable_timing: bool = False) -> None:
        assert enable_timing
        self.recorded = False

    def record(self, stream: object = None) -> None:
        self.recorded = True

    def query(self) -> bool:
        return self.recorded and FakeCudaEvent.done

    def elapsed_time(self, end: FakeCudaEvent) -> float:
        assert self.query() and end.query(), "read before it completed"
        return 7.0


def test_cuda_step_times_come_from_completed_events_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA path of the step clock, with events that complete late: none is waited for; the
    device parts come from completed event sets, and the rest of the step is `other`."""
    from runner.telemetry.tags import TIME_PARTS as PARTS
    from runner.train.step_clock import StepClock

    monkeypatch.setattr(torch.cuda, "Event", FakeCudaEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    clock = StepClock(torch.device("cuda", 0))

    def step() -> None:
        for part in ("data_wait", "h2d", "forward", "backward", "optimizer", "telemetry"):
            clock.enter(part)
            time.sleep(0.02 if part == "forward" else 0.0)  # the host's time: 20 ms

    FakeCudaEvent.done = False  # the device is behind: nothing to read yet, and nothing waits
    step()
    ms = clock.window(1)
    assert set(ms) == {*PARTS, "step"} and ms["forward"] >= 20 * 0.9  # the host's times, for want of better
    assert len(clock.events.pending) == 1
    FakeCudaEvent.done = True  # completed meanwhile: read with the next window's sets
    step()
    step()
    ms = clock.window(2)
    assert [ms[p] for p in ("h2d", "forward", "backward", "optimizer")] == [7.0] * 4
    assert not clock.events.pending and clock.events.timed == 0
    assert ms["other"] == pytest.approx(max(0.0, ms["step"] - sum(ms[p] for p in PARTS if p != "other")))


@pytest.mark.gpu
def test_no_host_device_sync_between_log_points_on_cuda(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """AMP with GradScaler, histograms and image grids off the log points: from step 2 on, any sync
    outside a log point or a checkpoint raises (torch's sync debug mode)."""
    from runner.train.loop import Trainer

    trainer = _trainer(tmp_path, monkeypatch, model="cnn", device="cuda", amp=True, steps=9, log_every=4,
                       hist_every=2, images_every=3)
    strict = [False]

    def allowed(method):
        def run(self, *args):
            torch.cuda.set_sync_debug_mode(0)
            try:
                return method(self, *args)
            finally:
                torch.cuda.set_sync_debug_mode("error" if strict[0] else 0)
        return run

    for name in ("_log_point", "save_checkpoint"):
        monkeypatch.setattr(Trainer, name, allowed(getattr(Trainer, name)))
    original_step = Trainer._step

    def step(self, batch, window, stand_in=False):
        strict[0] = self.step >= 1  # the first step measures memory and warms cuDNN up
        torch.cuda.set_sync_debug_mode("error" if strict[0] else 0)
        return original_step(self, batch, window, stand_in)

    monkeypatch.setattr(Trainer, "_step", step)
    recorder = Recorder()
    try:
        assert _fit(trainer, recorder) == 0
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert {e.step for e in recorder.events if isinstance(e, Histogram)} >= {2, 6}
    assert {e.step for e in recorder.events if e.tag == "images/samples"} == {1, 3, 6, 9}
    assert {e.step for e in recorder.events if e.tag == "time/forward_ms"} == {4, 8, 9}
