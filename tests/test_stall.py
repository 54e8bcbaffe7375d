"""A stalled or hung run is seen, located and explained while it is alive.

Fast: the heartbeat record, the hub's timed flush, stack capture and parsing, the stall watch's
decisions and sentences on heartbeats of this very process, the report's merge, collective timeouts,
the DDP stand-in with every built-in normalised model. Slow (real runs through the CLI, gloo on CPU):
one process whose dataset blocks (its last step on disk within seconds, a `stalled` finding naming the
line, `runner stacks`), one that recovers, two ranks with one blocked in data (`--on-stall stop`: exit 1,
nothing left) or asleep in its forward, no false alarm on slow first steps and checkpoints, and the
stand-in batch with the built-in cnn under DDP.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from runner.config import resolve
from runner.diagnosis import stall_report
from runner.diagnosis.stall_feed import StallFeed
from runner.errors import RunnerError
from runner.procs import heartbeat, registry, stacks, stall_explain, stall_watch
from runner.telemetry.events import Event, Finding, Scalar, Sink
from runner.telemetry.hub import Hub
from tests.support.proc_runs import child_env, start_run, tagged, wait_exit, wait_for
from tests.support.procs import MARKERS_ENV
from tests.support.stalls import stall_line

STALL = "3"  # seconds: small, so that the tests stay fast
RUN = ["--image-size", "16", "--batch-size", "4", "--log-every", "1", "--no-progress", "--device", "cpu",
       "--resume", "never", "--stall-timeout", STALL, "--no-graph"]
FIND = 60.0  # seconds a loaded 2-core machine may take to start a run and reach its stall


# --- the heartbeat --------------------------------------------------------------------------------------

def test_a_heartbeat_is_read_back_as_written_and_says_when_a_rank_is_in_a_long_phase(tmp_path: Path) -> None:
    beat = heartbeat.Heartbeat(tmp_path / "rank1", rank=1, world=2)
    regimes: list[bool] = []
    beat.on_regime(regimes.append)
    first = heartbeat.read(tmp_path / "rank1")
    assert first is not None and (first.rank, first.world, first.pid, first.phase, first.long) == (1, 2, os.getpid(),
                                                                                                "start-up", True)
    for step in (1, 2, 3):
        beat.enter("data_wait")
        beat.enter("forward")
        beat.set_step(step)
    steady = heartbeat.read(tmp_path / "rank1")
    assert (steady.step, steady.phase, steady.long) == (3, "forward", False)  # warm-up over after 3 steps
    with beat.phase("checkpoint"):
        assert heartbeat.read(tmp_path / "rank1").phase == "checkpoint"
        assert heartbeat.read(tmp_path / "rank1").long
    assert heartbeat.read(tmp_path / "rank1").phase == "forward"
    assert regimes == [True, False, True, False]
    beat.enter("no such phase")
    assert heartbeat.read(tmp_path / "rank1").phase == "other"
    assert [b.rank for b in heartbeat.read_all(tmp_path)] == [1]
    beat.close()
    assert heartbeat.read(tmp_path / "rank1").phase == "ended"


def test_a_record_caught_mid_write_is_not_read(tmp_path: Path) -> None:
    heartbeat.Heartbeat(tmp_path / "rank0", rank=0, world=1).close()
    data = bytearray((tmp_path / "rank0").read_bytes())
    data[0] ^= 1  # the sequence number written first no longer matches the one written last
    (tmp_path / "rank0").write_bytes(bytes(data))
    assert heartbeat.read(tmp_path / "rank0") is None
    (tmp_path / "rank0").write_bytes(b"short")
    assert heartbeat.read(tmp_path / "rank0") is None


def test_a_collective_inside_a_long_phase_keeps_the_long_phase(tmp_path: Path, monkeypatch) -> None:
    beat = heartbeat.Heartbeat(tmp_path / "rank0", rank=0, world=2)
    monkeypatch.setattr(heartbeat, "_current", beat)
    for step in (1, 2, 3):
        beat.set_step(step)
    beat.enter("other")
    with heartbeat.collective():
        assert heartbeat.read(tmp_path / "rank0").phase == "collective"
    with heartbeat.phase("checkpoint"), heartbeat.collective():
        assert heartbeat.read(tmp_path / "rank0").phase == "checkpoint"


# --- files current by time ---------------------------------------------------------------------------

class _Recording(Sink):
    flush_every = 0.2

    def __init__(self) -> None:
        self.written: list[Event] = []
        self.flushes: list[float] = []

    def write(self, event: Event) -> None:
        self.written.append(event)

    def flush(self) -> None:
        self.flushes.append(time.monotonic())


def test_a_sink_is_flushed_flush_every_after_a_write_even_when_nothing_follows() -> None:
    sink = _Recording()
    hub = Hub([sink])
    try:
        start = time.monotonic()
        hub.emit(Scalar(tag="train/loss", step=1, value=1.0))
        wait_for(lambda: sink.flushes, 5, "a timed flush")
        assert 0.15 <= sink.flushes[0] - start < 3
        time.sleep(0.6)
        assert len(sink.flushes) == 1  # nothing new was written: no flush
        hub.emit(Scalar(tag="train/loss", step=2, value=1.0))
        wait_for(lambda: len(sink.flushes) == 2, 5, "the second timed flush")
    finally:
        hub.close(5)


def test_the_step_being_accumulated_reaches_tensorboard_without_a_later_event(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dashboards.tensorboard import TensorBoardSink

    sink = TensorBoardSink(tmp_path, flush_secs=0.3)
    sink.flush_every = 0.3
    hub = Hub([sink])
    try:
        for step in (1, 2):
            hub.emit(Scalar(tag="train/loss", step=step, value=float(step)))

        def logged() -> list[int]:
            events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
            events.Reload()
            return [e.step for e in events.Scalars("train/loss")] if "train/loss" in events.Tags()["scalars"] else []

        wait_for(lambda: logged() == [1, 2], 10, "step 2 in the event file")
    finally:
        hub.close(5)


# --- stacks ------------------------------------------------------------------------------------------

_CHILD = """
import sys, threading, time
from runner.procs import stacks
stacks.register(sys.argv[1], "trainer", 0)
threading.Thread(target=lambda: time.sleep(600), name="helper", daemon=True).start()

def blocked_here():
    print("ready", flush=True); time.sleep(600)

blocked_here()
"""


@pytest.fixture
def sleeper(tmp_path: Path):
    """A Python process blocked in `blocked_here`, its faulthandler file registered for run `r1`."""
    script = tmp_path / "sleeper.py"
    script.write_text(_CHILD)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    proc = subprocess.Popen([sys.executable, str(script), "r1"], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "ready"
    yield proc, script
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("method", ["faulthandler", "py-spy"])
def test_every_thread_of_a_blocked_process_is_captured_from_outside(sleeper, method: str) -> None:
    proc, script = sleeper
    if method == "py-spy" and stacks.py_spy() is None:
        pytest.skip("py-spy is not installed")
    from runner.procs import proc_table

    target = stacks.Target(proc.pid, proc_table.start_ticks(proc.pid), "trainer", 0)
    [found] = stacks.capture([target], stacks.folder_for("r1"), method=method)
    assert found.method == method, found.error
    assert proc.poll() is None  # the signal did not end it
    main = found.main
    assert main is not None and main.main
    frame = stacks.key_frame(main.frames)
    assert frame is not None and frame.file == str(script) and frame.function.endswith("blocked_here")
    assert frame.line == _CHILD.splitlines().index('    print("ready", flush=True); time.sleep(600)') + 1
    assert len(found.threads) == 2
    text = stacks.render([found], {0: "data loading"})
    assert "=== rank 0: data loading" in text and "blocked_here" in text


def test_a_process_without_a_dump_file_is_never_signalled(sleeper) -> None:
    proc, _ = sleeper
    from runner.procs import proc_table

    target = stacks.Target(proc.pid, proc_table.start_ticks(proc.pid), "trainer", 0)
    [found] = stacks.capture([target], stacks.folder_for("another-run"), method="faulthandler")
    assert not found.threads and "no faulthandler file" in found.error
    assert proc.poll() is None


def test_frames_are_told_apart_by_whose_code_they_are() -> None:
    root = Path(__file__).resolve().parent.parent
    assert stacks.origin(str(root / "runner" / "train" / "loop.py")) == "runner"
    assert stacks.origin(str(root / "tests" / "support" / "stalls.py")) == "user"
    assert stacks.origin(torch.__file__) == "library"
    assert stacks.origin(threading.__file__) == "library"
    assert stacks.origin("<frozen runpy>") == "library"
    frames = [stacks.Frame("sleep_in_c", threading.__file__, 1), stacks.Frame("_fetch", str(root / "runner/x.py"), 2),
              stacks.Frame("__getitem__", "/home/me/mydata.py", 42)]
    assert stacks.key_frame(frames).function == "__getitem__"
    assert stacks.key_frame(frames[:2]).function == "_fetch"


def test_faulthandler_output_is_parsed_main_thread_first() -> None:
    text = ('Thread 0x00007f0000000002 (most recent call first):\n'
            '  File "/usr/lib/python3.11/threading.py", line 331 in wait\n\n'
            'Current thread 0x00007f0000000001 (most recent call first):\n'
            '  File "/home/me/mydata.py", line 42 in __getitem__\n'
            '  File "/home/me/train.py", line 7 in <module>\n')
    threads = stacks.parse_faulthandler(text, "0x00007f0000000001")
    assert [t.main for t in threads] == [True, False]
    assert [(f.file, f.line, f.function) for f in threads[0].frames][0] == ("/home/me/mydata.py", 42, "__getitem__")


# --- the stall watch, on heartbeats of this process ----------------------------------------------------

def _beat(run_id: str, rank: int = 0, world: int = 1, steps: int = 5, phase: str = "data") -> heartbeat.Heartbeat:
    beat = heartbeat.Heartbeat(heartbeat.folder_for(run_id) / f"rank{rank}", rank, world)
    for step in range(1, steps + 1):
        beat.set_step(step)
    beat.enter(phase)
    return beat


def test_the_watch_reports_one_stall_then_the_recovery_then_a_new_stall(tmp_path: Path) -> None:
    out = tmp_path / "console.txt"
    with open(out, "w") as console:
        watch = stall_watch.StallWatch("w1", tmp_path / "run", timeout=3.0, name="run", out=console)
        beat = _beat("w1")
        now = time.time()
        assert not watch.poll(now + 2)  # within the timeout
        assert not watch.poll(now + 4)  # stalled: reported, the run stays (report)
        assert not watch.poll(now + 8)  # still the same stall: no second finding
        beat.enter("h2d")
        watch.poll(time.time())  # it moved
        beat.enter("data")
        watch.poll(time.time() + 4)  # and stalls again
    records = stall_report.stall_findings(tmp_path / "run")
    assert [r["kind"] for r in records] == ["stalled", "stall_recovered", "stalled"]
    first = records[0]
    assert first["message"].startswith("no progress for 4 s: the run is in data loading of step 6")
    assert first["evidence"]["ranks"][0]["phase"] == "data" and first["step"] == 5
    capture = Path(first["evidence"]["stall_dir"])
    assert {p.name for p in capture.iterdir()} >= {"stacks.txt", "stacks.json", "heartbeats.json", "nvml.json"}
    assert "test_the_watch_reports_one_stall" in (capture / "stacks.txt").read_text()  # this very test's frame
    assert "went on after" in records[1]["message"]
    lines = out.read_text().splitlines()
    assert lines[0].startswith("[run] ERROR stalled at step 5: no progress for 4 s")
    assert lines[1].startswith("[run] INFO stall_recovered at step 5")
    beat.close()


def test_long_phases_get_a_longer_allowance_and_auto_follows_the_median_step(tmp_path: Path) -> None:
    watch = stall_watch.StallWatch("w2", tmp_path / "run", timeout="auto", name="run", out=io.StringIO())
    assert watch.timeout() == stall_watch.AUTO_FLOOR
    watch.rates.extend([20.0] * 5)
    assert watch.timeout() == 200.0  # 10 median steps
    fixed = stall_watch.StallWatch("w2", tmp_path / "run", timeout=3.0, out=io.StringIO())
    beat = _beat("w2", steps=1, phase="forward")  # the first steps are long
    assert not fixed.poll(time.time() + 20)
    beat.set_step(2)
    beat.set_step(3)
    beat.enter("checkpoint")
    assert not fixed.poll(time.time() + 20)
    beat.enter("telemetry")
    fixed.poll(time.time() + 4)
    assert fixed.stall is not None
    off = stall_watch.StallWatch("w2", tmp_path / "other", timeout=0.0)
    assert not off.enabled and not off.poll(time.time() + 1000)
    beat.close()


def test_a_hang_names_the_rank_that_stopped_first_and_what_the_others_wait_in() -> None:
    blocked = stall_explain.RankState(1, 11, "data", 117, 74.2, "/home/me/mydata.py", 42, "__getitem__")
    waiting = [stall_explain.RankState(r, 10 + r, "backward", 117, 73.9, "/x/runner/train/step.py", 97, "compute")
               for r in (0, 2, 3)]
    text = stall_explain.stall_message([blocked, *waiting], world=4)
    assert text.startswith("no rank has made progress for 74 s: rank 1 has been in data loading of step 118 for 74 s, "
                           "at /home/me/mydata.py:42 in `__getitem__`; ranks 0, 2, 3 wait in backward of step 118 "
                           "(DDP's gradient all-reduce)")
    waiting[0].waits_in = "DistributedDataParallel._distributed_broadcast_coalesced"
    assert "(`DistributedDataParallel._distributed_broadcast_coalesced`)" in stall_explain.stall_message(
        [blocked, waiting[0]], world=2)


def test_the_rank_named_first_is_the_one_not_waiting_for_its_peers_whoever_entered_first() -> None:
    """Ranks leave a collective a fraction of a millisecond apart: rank 0 may enter its forward (and wait
    there in DDP's buffer broadcast) before rank 1 enters the data loading it never leaves."""
    now = time.time()
    beats = [heartbeat.Beat(0, 2, 100, 1, 4, "forward", now - 10.001, False),
             heartbeat.Beat(1, 2, 101, 1, 4, "data", now - 10.0, False)]
    ddp = "/x/site-packages/torch/nn/parallel/distributed.py"
    captured = [stacks.Stacks(100, "rank", 0, method="py-spy", threads=[stacks.Thread("MainThread", "100", True, [
                    stacks.Frame("DistributedDataParallel._distributed_broadcast_coalesced", ddp, 2364),
                    stacks.Frame("StepRunner.compute", "/x/runner/train/step.py", 88)])]),
                stacks.Stacks(101, "rank", 1, method="py-spy", threads=[stacks.Thread("MainThread", "101", True, [
                    stacks.Frame("Shards.__getitem__", "/home/me/mydata.py", 20)])])]
    states = stall_explain.explain_ranks(beats, captured, now)
    assert [s.rank for s in states] == [1, 0]
    assert states[0].frame_text() == "at /home/me/mydata.py:20 in `Shards.__getitem__`"
    assert states[1].waits_in == "DistributedDataParallel._distributed_broadcast_coalesced"
    text = stall_explain.stall_message(states, world=2)
    assert "rank 1 has been in data loading of step 5" in text and "rank 0 waits in forward of step 5 (`" in text


def test_the_watch_in_its_own_process_ends_with_its_parent(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "runner.procs.stall_watch", "--run-id", "none", "--run-path",
                             str(tmp_path), "--stall-timeout", "3", "--poll", "0.1"], stdin=subprocess.PIPE,
                            env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent)))
    time.sleep(1.0)
    assert proc.poll() is None  # watching (nothing yet)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0


# --- the trainer's side and the report -----------------------------------------------------------------

def test_the_feed_emits_each_new_stall_finding_once_and_counts_them(tmp_path: Path) -> None:
    folder = tmp_path / "stall"
    folder.mkdir()
    (folder / "findings.jsonl").write_text(json.dumps({"kind": "stalled", "message": "old"}) + "\n")
    got: list[Finding] = []
    flushed: list[float] = []
    feed = StallFeed(tmp_path, got.append, flush=flushed.append)
    assert feed.check() == 0  # an earlier attempt's: already in findings.json
    with open(folder / "findings.jsonl", "a") as fh:
        fh.write(json.dumps({"kind": "hang_suspected", "severity": "error", "message": "m", "step": 7, "rank": 1,
                             "evidence": {"ranks": []}, "advice": "a"}) + "\n")
        fh.write('{"kind": "half a li')
    assert feed.check() == 1
    assert (got[0].kind, got[0].step, got[0].rank, got[0].tag) == ("hang_suspected", 7, 1, "findings/stall")
    assert flushed and (folder / ".fed").read_text() == "1"
    assert feed.check() == 0


def test_the_report_folds_in_the_watchs_findings_and_says_a_stop_was_a_stall(tmp_path: Path) -> None:
    from runner.diagnosis.report import build_report, render

    run = tmp_path / "r"
    (run / "stall").mkdir(parents=True)
    (run / "config.toml").write_text("")
    known = {"kind": "input_bound", "severity": "warning", "message": "slow data", "step": 3, "evidence": {}}
    (run / "findings.json").write_text(json.dumps([known]))
    stalled = {"kind": "stalled", "severity": "error", "message": "no progress for 9 s", "step": 5, "evidence": {},
               "time": 1.0}
    (run / "stall" / "findings.jsonl").write_text(json.dumps(stalled) + "\n" + json.dumps(known) + "\n")
    (run / "stall" / "stopped.json").write_text(json.dumps({"message": "no progress for 9 s"}))
    report = build_report(run)
    assert [f["kind"] for f in report["findings"]] == ["input_bound", "stalled"]
    assert report["status"] == "failed" and report["reason"].startswith("stalled: no progress for 9 s")
    assert "ERROR stalled at step 5" in render(report)


def test_collective_timeouts_are_long_in_long_phases_and_never_beat_the_stall_watch() -> None:
    from runner.train.strategy import LONG_COLLECTIVE_S, STALL_MARGIN_S, collective_timeouts

    assert collective_timeouts(resolve(None, {"stall_timeout": "0"}), None) == (300.0, LONG_COLLECTIVE_S)
    assert collective_timeouts(resolve(None, {}), None) == (300.0, LONG_COLLECTIVE_S)
    steady, slow = collective_timeouts(resolve(None, {}), median_step=40.0)  # auto: 400 s allowance
    assert steady == 400.0 + STALL_MARGIN_S and slow == 4000.0 + STALL_MARGIN_S
    assert collective_timeouts(resolve(None, {"collective_timeout": 20, "stall_timeout": 3}), None)[0] == 63.0


def test_the_process_groups_timeout_follows_the_ranks_phase(tmp_path: Path, monkeypatch) -> None:
    """One gloo rank in this process: 30 min while starting up, --collective-timeout once warmed up, 30 min
    again during a checkpoint (read back from the backend: the public set_timeout reached it)."""
    import socket

    import torch.distributed as dist

    from runner.train.strategy import LONG_COLLECTIVE_S, DistributedStrategy

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    beat = heartbeat.Heartbeat(tmp_path / "rank0", rank=0, world=1)
    monkeypatch.setattr(heartbeat, "_current", beat)
    strategy = DistributedStrategy(resolve(None, {"strategy": "ddp", "device": "cpu", "name": "t",
                                                  "collective_timeout": 200, "stall_timeout": 3}))
    try:
        def seconds() -> float:
            return dist.group.WORLD._get_backend(torch.device("cpu")).options._timeout.total_seconds()

        assert seconds() == LONG_COLLECTIVE_S
        for step in (1, 2, 3):
            beat.enter("forward")
            beat.set_step(step)
        assert seconds() == 200.0
        with heartbeat.phase("checkpoint"):
            strategy.barrier()
            assert seconds() == LONG_COLLECTIVE_S
        assert seconds() == 200.0
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(("flags", "message"), [
    ({"stall_timeout": "-1"}, "stall-timeout must be auto, 0"),
    ({"stall_timeout": "soon"}, "stall-timeout"),
    ({"flush_secs": 0}, "flush-secs must be positive"),
    ({"on_stall": "panic"}, "unknown on-stall"),
])
def test_bad_stall_flags_are_usage_errors(flags: dict, message: str) -> None:
    with pytest.raises(RunnerError, match=message):
        resolve(None, flags)


# --- the DDP stand-in batch with normalisation layers -------------------------------------------------------

@pytest.mark.parametrize(("model", "shape"), [("cnn", (2, 3, 16, 16)), ("resnet18", (2, 3, 32, 32)),
                                              ("tinyunet", (2, 3, 16, 16))])
def test_a_stand_in_step_trains_through_batchnorm_and_leaves_its_statistics(model: str, shape: tuple) -> None:
    """The stand-in's forward updates BatchNorm's running statistics; putting them back in place before the
    backward broke it ("modified by an inplace operation", issue 18). Now the backward runs, the gradients
    are zero and the statistics are what they were."""
    from runner.models import build_model
    from runner.train.stand_in import buffers_kept

    net = build_model(model, shape[1], shape[-1], 10).train()
    before = {name: b.clone() for name, b in net.named_buffers()}
    x = torch.rand(shape)
    with buffers_kept(net):
        out = net(x)
    loss = (out.float().mean() if model == "tinyunet" else torch.nn.functional.cross_entropy(out, torch.zeros(2,
            dtype=torch.long))) * 0.0
    loss.backward()
    assert all(torch.equal(before[name], b) for name, b in net.named_buffers())
    assert all(p.grad is None or not p.grad.any() for p in net.parameters())


# --- end to end ---------------------------------------------------------------------------------------------

def _run_id() -> str:
    wait_for(lambda: registry.load_runs(), FIND, "the run in the registry")
    return registry.load_runs()[-1].id


def _beats(run_id: str) -> list[heartbeat.Beat]:
    return stall_watch.live_beats(run_id)


def _findings(run: Path) -> list[dict]:
    return stall_report.stall_findings(run)


def _kinds(run: Path) -> list[str]:
    return [f["kind"] for f in _findings(run)]


def _tb_steps(run: Path) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    return [e.step for e in events.Scalars("train/loss")] if "train/loss" in events.Tags()["scalars"] else []


def _report(env: dict[str, str], run: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "runner", "report", str(run), "--json"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _nothing_left(tmp_path: Path) -> None:
    wait_for(lambda: not tagged(MARKERS_ENV, str(tmp_path / "markers")), 15, "every process of the run to be gone")


@pytest.mark.slow
def test_a_blocked_dataset_is_on_disk_within_seconds_reported_with_its_line_and_its_stacks_shown(
        tmp_path: Path, markers: Path) -> None:
    """(a) and (e): one process whose dataset blocks at step 5 for good."""
    env = child_env(tmp_path, STALL_AT="5")
    run = tmp_path / "runs" / "blocked"
    sup = start_run(tmp_path, env, "--name", "blocked", "--model", "cnn", "--data",
                    "tests.support.stalls:stalling_data", "--steps", "40", "--viz", "both", "--visdom-url",
                    "http://127.0.0.1:9", *RUN)  # no Visdom server: every call still goes to visdom.log
    run_id = _run_id()
    wait_for(lambda: any(b.step == 4 and b.phase == "data" for b in _beats(run_id)), FIND, "the block at step 5", sup)
    blocked_since = _beats(run_id)[0].since
    wait_for(lambda: _tb_steps(run)[-1:] == [4], 15, "step 4 in TensorBoard", sup)
    wait_for(lambda: _report(env, run)["step"] == 4, 15, "step 4 in runner report", sup)
    assert time.time() - blocked_since <= 10 + 2  # 10 s, plus the reads' own time on a loaded machine
    wait_for(lambda: "stalled" in _kinds(run), 30, "the stalled finding", sup)
    assert time.time() - blocked_since <= float(STALL) + 10 + 5
    [finding] = _findings(run)
    assert f"stalls.py:{stall_line('data')}" in finding["message"] and "data loading of step 5" in finding["message"]
    assert "__getitem__" in finding["message"]
    report = _report(env, run)
    assert report["status"] == "live" and report["ranks"][0]["phase"] == "data"
    wait_for(lambda: any(f["kind"] == "stalled" for f in json.loads((run / "findings.json").read_text())), 15,
             "the finding in findings.json (the trainer's feed)", sup)
    wait_for(lambda: "findings/stall" in _tb_text_tags(run), 15, "the finding in TensorBoard", sup)
    wait_for(lambda: "stalled" in (run / "visdom.log").read_text(), 15, "the finding in Visdom's findings pane", sup)

    shown = subprocess.run([sys.executable, "-m", "runner", "stacks", "blocked", "--run-dir", str(tmp_path / "runs")],
                           env=env, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "=== rank 0: data loading of step 5" in shown.stdout
    assert f"stalls.py:{stall_line('data')}" in shown.stdout and "MainThread" in shown.stdout

    sup.send_signal(signal.SIGTERM)  # one process: the stop ends the wait for data at once
    assert wait_exit(sup, tmp_path, 30) == 143
    _nothing_left(tmp_path)


def _tb_text_tags(run: Path) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"tensors": 0})
    events.Reload()
    return [tag.removesuffix("/text_summary") for tag in events.Tags()["tensors"]]


@pytest.mark.slow
def test_a_dataset_that_blocks_for_a_while_recovers_and_the_run_finishes(tmp_path: Path, markers: Path) -> None:
    """In a DataLoader worker this time, its stacks taken by the faulthandler signal (py-spy's stand-in)."""
    env = child_env(tmp_path, STALL_AT="5", STALL_FOR="7", RUNNER_STACK_METHOD="faulthandler")
    sup = start_run(tmp_path, env, "--name", "pause", "--model", "cnn", "--data", "tests.support.stalls:stalling_data",
                    "--steps", "8", "--viz", "none", "--workers", "1", *RUN)
    assert wait_exit(sup, tmp_path, 180) == 0, (tmp_path / "run.log").read_text()
    run = tmp_path / "runs" / "pause"
    assert _kinds(run) == ["stalled", "stall_recovered"]
    stalled = _findings(run)[0]
    assert stalled["evidence"]["stacks"] == "faulthandler"
    assert f"stalls.py:{stall_line('data')} in `__getitem__` (DataLoader worker 0" in stalled["message"]
    findings = json.loads((run / "findings.json").read_text())
    assert "stalled" in [f["kind"] for f in findings]  # the recovery too, unless the run ended within a poll of it
    report = _report(child_env(tmp_path), run)  # which the report folds in from stall/findings.jsonl
    assert [f["kind"] for f in report["findings"] if f["kind"].startswith("stall")] == ["stalled", "stall_recovered"]
    log = (tmp_path / "run.log").read_text()
    assert "finished at step 8" in log and log.count("ERROR stalled") == 1 and log.count("INFO stall_recovered") == 1


@pytest.mark.slow
def test_a_rank_blocked_in_data_is_named_and_on_stall_stop_ends_the_run(tmp_path: Path, markers: Path) -> None:
    """(b) and (d): two ranks, rank 1 blocks in __getitem__ at step 5; --on-stall stop."""
    env = child_env(tmp_path, STALL_AT="5", STALL_RANK="1")
    sup = start_run(tmp_path, env, "--name", "hang", "--strategy", "ddp", "--nproc", "2", "--model", "cnn", "--data",
                    "tests.support.stalls:stalling_data", "--steps", "40", "--viz", "tensorboard", "--on-stall", "stop",
                    *RUN)
    assert wait_exit(sup, tmp_path, 180) == 1
    run = tmp_path / "runs" / "hang"
    [finding] = _findings(run)
    message = finding["message"]
    assert finding["kind"] == "hang_suspected" and finding["rank"] == 1
    assert "rank 1 has been in data loading of step 5" in message and f"stalls.py:{stall_line('data')}" in message
    assert "rank 0 waits in" in message and "of step 5" in message
    ranks = {r["rank"]: r for r in finding["evidence"]["ranks"]}
    assert ranks[1]["phase"] == "data" and ranks[0]["phase"] in ("forward", "backward", "collective")
    log = (tmp_path / "run.log").read_text()
    assert "runner: error: stalled: no rank has made progress" in log
    capture = Path(finding["evidence"]["stall_dir"])
    stacks_text = (capture / "stacks.txt").read_text()
    assert "=== rank 0" in stacks_text and "=== rank 1" in stacks_text
    report = _report(child_env(tmp_path), run)
    assert report["status"] == "failed" and report["reason"].startswith("stalled: ")
    assert report["step"] == 4  # the last step reached summary.json before the end
    _nothing_left(tmp_path)


@pytest.mark.slow
def test_a_rank_asleep_in_its_forward_is_named_and_its_stacks_shown_live(tmp_path: Path, markers: Path) -> None:
    """(c) and (e) under DDP: rank 1 sleeps in its model's forward at step 5; the run stays (report)."""
    env = child_env(tmp_path, STALL_AT="5", STALL_RANK="1")
    run = tmp_path / "runs" / "sleepy"
    sup = start_run(tmp_path, env, "--name", "sleepy", "--strategy", "ddp", "--nproc", "2", "--model",
                    "tests.support.stalls:sleepy_cnn", "--steps", "40", "--viz", "none", *RUN)
    wait_for(lambda: "hang_suspected" in _kinds(run), FIND + 30, "the hang_suspected finding", sup)
    [finding] = _findings(run)
    message = finding["message"]
    assert "rank 1 has been in forward of step 5" in message and f"stalls.py:{stall_line('forward')}" in message
    assert "SleepyCNN.forward" in message or "`forward`" in message
    assert "rank 0 waits in backward of step 5" in message
    shown = subprocess.run([sys.executable, "-m", "runner", "stacks", "sleepy", "--run-dir", str(tmp_path / "runs")],
                           env=env, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "=== rank 0: backward of step 5" in shown.stdout and "=== rank 1: forward of step 5" in shown.stdout
    sup.send_signal(signal.SIGTERM)  # rank 1 never reaches the step's end: the supervisor ends the run
    assert wait_exit(sup, tmp_path, 60) == 143
    _nothing_left(tmp_path)


@pytest.mark.slow
def test_slow_first_steps_and_slow_checkpoints_raise_no_stall(tmp_path: Path, markers: Path) -> None:
    """No false alarm: each rank's first step takes 7 s and each checkpoint 7 s (a large state), with a
    stall timeout of 5 s: both are long phases (10x the timeout)."""
    env = child_env(tmp_path, SLOW_FIRST="7", SLOW_SAVE="7")
    sup = start_run(tmp_path, env, "--name", "calm", "--strategy", "ddp", "--nproc", "2", "--model",
                    "tests.support.stalls:slow_start_heavy", "--optimizer", "sgd", "--steps", "6",
                    "--checkpoint-every", "3", "--viz", "none", *RUN[:-3], "--stall-timeout", "5")
    assert wait_exit(sup, tmp_path, 240) == 0, (tmp_path / "run.log").read_text()
    assert _kinds(tmp_path / "runs" / "calm") == []
    log = (tmp_path / "run.log").read_text()
    assert "finished at step 6" in log and "ERROR stalled" not in log and "hang_suspected" not in log


@pytest.mark.slow
def test_the_stand_in_batch_trains_the_builtin_cnn_under_ddp(tmp_path: Path) -> None:
    """(f): two ranks, the built-in cnn (BatchNorm), half the samples unreadable, one per batch."""
    from tests.support.runs import run_runner

    out = run_runner("train", "--strategy", "ddp", "--nproc", "2", "--data", "tests.support.models:half_unreadable",
                     "--model", "cnn", "--image-size", "8", "--channels", "1", "--batch-size", "1", "--epochs", "1",
                     "--log-every", "4", "--no-progress", "--device", "cpu", "--viz", "none", "--run-dir",
                     str(tmp_path), "--name", "bn", timeout=240)
    assert out.code == 0, out.stderr
    assert "finished at step 16" in out.stderr and "inplace operation" not in out.stderr
