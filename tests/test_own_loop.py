"""`runner.observe` around a plain PyTorch loop (tests/support/own_loop.py), run as a real process: every
stream kind in TensorBoard and Visdom, findings and summary, the time breakdown adding up, env.json and the
registry; the same under a 2-rank torchrun; Ctrl+C; the options' precedence."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from runner.errors import RunnerError
from tests.support.runs import ROOT, child_pythonpath
from tests.support.visdom_server import VisdomServer, by_title, line

SCRIPT = ROOT / "tests" / "support" / "own_loop.py"


def _env(run_dir: Path, **extra: str) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=child_pythonpath(), RUNNER_RUN_DIR=str(run_dir), **extra)


def _own_loop(run_dir: Path, name: str, steps: int, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), name, str(steps)], capture_output=True, text=True,
                          env=_env(run_dir, **env), cwd=ROOT, timeout=180)


def _parts_add_up(summary: dict) -> None:
    parts, step = summary["time"]["parts_ms"], summary["time"]["step_ms"]
    assert set(parts) >= {"data_wait", "forward", "backward", "optimizer", "telemetry"}
    assert all(parts[p] > 0 for p in ("data_wait", "forward", "backward", "optimizer"))
    assert abs(sum(parts.values()) / step - 1) < 0.10


@pytest.mark.slow
def test_plain_loop_fills_tensorboard_visdom_and_the_run_files(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with VisdomServer(tmp_path / "envs") as server:
        done = _own_loop(tmp_path, "own", 24, RUNNER_VIZ="both", RUNNER_VISDOM_URL=server.url)
        assert done.returncode == 0, done.stderr
        windows = by_title(server.windows("t_own"))
    assert "loop ended at step 24" in done.stdout
    run = tmp_path / "own"

    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    found = acc.Tags()
    scalars = set(found["scalars"])
    assert {"train/loss", "train/accuracy", "train/doubled_loss", "val/loss", "time/step_ms", "time/forward_ms",
            "time/backward_ms", "time/optimizer_ms", "time/data_wait_ms", "memory/rss"} <= scalars
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(2, 25, 2))
    loss = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert {e.step: e.value for e in acc.Scalars("train/doubled_loss")}[24] == pytest.approx(2 * loss[24], rel=1e-4)
    assert len(acc.Scalars("memory/rss")) == 24  # every step
    assert "images/samples" in found["images"]
    assert any(tag.startswith("weights/") for tag in found["histograms"])
    assert any(tag.startswith("grads/") for tag in found["histograms"])
    assert found["graph"] and len(acc.Graph().node) > 3

    for title in ("loss", "metric", "images/samples", "model graph", "process RSS (MiB)"):
        assert title in windows, sorted(windows)
    assert line(windows["loss"])["loss"][0] == list(range(2, 25, 2))

    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["step"] == 24 and summary["total_steps"] == 24
    _parts_add_up(summary)
    assert summary["memory"]["peak_bytes"]["memory/workers_rss"] == 0  # no workers; the stall watcher is none
    findings = json.loads((run / "findings.json").read_text())
    assert "input_bound" in {f["kind"] for f in findings}  # the slow dataset: the same rules as runner train
    env = json.loads((run / "env.json").read_text())
    assert env["own_loop"]["optimizer"] == "SGD" and env["config"]["lr"] == 0.05 and env["world_size"] == 1
    assert env["packages"]["torch"] and env["git"]["commit"]  # this repository is a git work tree
    assert env["command"]["argv"][-2:] == ["own", "24"]

    from runner.procs import registry

    runs = registry.load_runs()  # what `runner runs` and `runner cleanup` go by
    assert [(r.run_path, r.exit_code) for r in runs] == [(str(run.resolve()), 0)]


@pytest.mark.slow
def test_torchrun_two_ranks(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(ROOT / "examples" / "own_loop_ddp.py"), "10"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(tmp_path, RUNNER_VIZ="tensorboard"),
                          cwd=ROOT, timeout=180)
    assert done.returncode == 0, done.stderr
    run = tmp_path / "own-loop-ddp"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["step"] == 10
    assert set(summary["time"]["step_ms_by_rank"]) == {"rank0", "rank1"}  # every rank's time reached rank 0
    assert {"memory/rss/rank0", "memory/rss/rank1"} <= set(summary["memory"]["peak_bytes"])  # and its memory
    _parts_add_up(summary)
    assert json.loads((run / "env.json").read_text())["world_size"] == 2
    assert len(list(run.glob("events.out.tfevents.*"))) == 1  # rank 0 writes


@pytest.mark.slow
def test_ctrl_c_stops_the_loop_cleanly(tmp_path: Path) -> None:
    env = _env(tmp_path, RUNNER_VIZ="none", RUNNER_WORKERS="2")
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "stopped", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            start_new_session=True)  # its own group, as a terminal's foreground job
    summary_path = tmp_path / "stopped" / "summary.json"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no log point"
            try:
                stepped = json.loads(summary_path.read_text()).get("step", 0) >= 4
            except (OSError, ValueError):
                stepped = False
            family = [proc.pid] + [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
            if stepped and len(family) >= 4:  # the loop, its stall watcher and its two DataLoader workers
                break
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl+C sends: the whole foreground group
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "stopping after this step" in err and "loop ended at step" in out
    assert json.loads(summary_path.read_text())["status"] == "stopped"
    from runner.procs import registry

    assert [r.exit_code for r in registry.load_runs()] == [130]  # `runner runs`: stopped by SIGINT
    time.sleep(0.5)
    assert not [pid for pid in family if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]


STUCK = """import time
import torch
import runner

model = torch.nn.Linear(4, 2)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
with runner.observe(model, optimizer, name="stuck", stall_timeout=1, log_every=2, viz="none", progress=False) as obs:
    for step in range(1, 11):
        loss = model(torch.rand(8, 4)).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        obs.step(loss=loss)
        if step == 6:
            time.sleep(4)  # stuck between steps for a while
"""


@pytest.mark.slow
def test_stall_watch_reports_a_stuck_own_loop(tmp_path: Path) -> None:
    script = tmp_path / "stuck.py"
    script.write_text(STUCK)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=_env(tmp_path),
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    findings = json.loads((tmp_path / "stuck" / "findings.json").read_text())
    stalled = [f for f in findings if f["kind"] == "stalled"]
    assert stalled, findings  # the watcher process saw it, the loop's hub wrote it
    line = STUCK.splitlines().index("            time.sleep(4)  # stuck between steps for a while") + 1
    assert stalled[0]["evidence"]["ranks"][0]["frame"] == f"{script}:{line}"
    assert "stalled at step 6" in done.stderr and (tmp_path / "stuck" / "stall").is_dir()


def test_options_mirror_the_train_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import torch

    from runner.own_loop import observe

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    monkeypatch.setenv("RUNNER_VIZ", "visdom")
    monkeypatch.setenv("RUNNER_RUN_DIR", str(tmp_path))
    cfg = observe(model, optimizer, name="x", log_every=5).cfg
    assert (cfg.viz, cfg.run_dir, cfg.log_every, cfg.hist_every) == ("visdom", str(tmp_path), 5, 100)
    assert (cfg.optimizer, cfg.lr, cfg.model) == ("momentum", 0.1, "torch.nn.modules.linear:Linear")
    assert observe(model, optimizer, name="x", viz="none").cfg.viz == "none"  # a keyword wins, as a flag does
    with pytest.raises(RunnerError, match="unknown option"):
        observe(model, optimizer, lr=0.1)
    with pytest.raises(RunnerError, match="log-every must be at least 1"):
        observe(model, optimizer, log_every=0)


def test_loss_only_loop_that_fails_in_process(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No task and no batch given: the loss and the time breakdown only; an exception ends the run as
    failed, and the hooks and signal handlers are gone afterwards."""
    import torch

    import runner

    monkeypatch.setenv("RUNNER_RUN_DIR", str(tmp_path))
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(ValueError, match="broken batch"), \
            runner.observe(model, optimizer, name="fails", viz="none", log_every=2, progress=False,
                           stall_timeout=0) as obs:
        for step in range(1, 6):
            loss = model(torch.rand(8, 4)).pow(2).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            obs.step(loss=loss.item(), samples=8)  # a float works too
            if step == 5:
                raise ValueError("broken batch")
    summary = json.loads((tmp_path / "fails" / "summary.json").read_text())
    assert summary["status"] == "failed" and "broken batch" in summary["status_text"]
    assert summary["step"] == 5 and set(summary["scalars"]) >= {"train/loss", "time/step_ms", "train/loss_max"}
    assert not any(k.startswith("train/acc") for k in summary["scalars"])  # no task, no metric
    assert not model._forward_pre_hooks and not model._forward_hooks and not optimizer._optimizer_step_pre_hooks
    assert signal.getsignal(signal.SIGINT) is handler
    from runner.procs import registry

    assert [r.exit_code for r in registry.load_runs()] == [1] and "RUNNER_RUN_ID" not in os.environ


def test_import_runner_stays_light() -> None:
    code = "import sys, runner; print('torch' in sys.modules, callable(runner.observe), 'torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.stdout.split() == ["False", "True", "True"], done.stderr


def test_hooks_enter_the_parts_in_the_order_cuda_events_need() -> None:
    """CUDA's event set per step is recorded at h2d, forward, backward, optimizer, telemetry in that
    order (runner/train/step_clock.py); the own loop's hooks must keep it, also when the output's
    gradient hook cannot fire, and stay out of forwards without autograd."""
    import torch

    from runner.own_loop.timing import StepTiming
    from runner.train.step_clock import StepClock

    class Recording(StepClock):
        def __init__(self) -> None:
            super().__init__(torch.device("cpu"))
            self.entered: list[str] = []

        def enter(self, part: str) -> None:
            self.entered.append(part)
            super().enter(part)

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    clock = Recording()
    updates: list[str] = []
    timing = StepTiming(model, optimizer, clock, lambda: updates.append("norms"), lambda: updates.append("hist"))
    evented = ("h2d", "forward", "backward", "optimizer", "telemetry")
    for detached in (False, True):
        clock.entered.clear()
        out = model(torch.rand(4, 3))
        loss = model.weight.sum() if detached else out.pow(2).mean()  # detached: the output's hook never fires
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model(torch.rand(4, 3))  # an evaluation's forward: no part of the step
        seen = [p for p in clock.entered if p in evented]
        assert seen[:5] == list(evented), clock.entered
    assert updates == ["norms", "hist"] * 2
    timing.remove()
    assert not model._forward_hooks and not optimizer._optimizer_step_post_hooks
