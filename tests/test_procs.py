"""Process hygiene with real processes: graceful stops (Ctrl+C, SIGTERM, a second Ctrl+C, DDP) and the
supervisor's reaping when the trainer, the supervisor or the torchrun agent is killed.

Every test acts only on processes it started: each test's processes carry its own PROCS_TEST_MARKERS
folder in their environment, by which the teardown (tests/proc_runs.py `markers`) kills whatever a
failing test left.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runner.procs import proc_table
from runner.procs.run_tag import TAG_ENV
from tests.support.proc_runs import (
    BLOCKING,
    EXIT,
    STARTUP,
    TINY,
    child_env,
    only_run,
    roles,
    runner_cli,
    running,
    start_run,
    tagged,
    wait_exit,
    wait_for,
    wait_trained,
)
from tests.support.procs import MARKERS_ENV, SLOW_STEP_ENV, marked

# --- graceful stop ------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_stop_signal_with_workers_blocked_in_getitem(tmp_path: Path, markers: Path, sig: int, code: int) -> None:
    """Ctrl+C (or SIGTERM) to the terminal's group: stop now, checkpoint, no process left, quiet workers."""
    from runner.train import checkpoint

    env = child_env(tmp_path)
    sup = start_run(tmp_path, env, *TINY, *BLOCKING, "--workers", "2", "--checkpoint-every", "1", "--name", "stop")
    last = wait_trained(tmp_path, "stop", sup)
    run = only_run()
    members = tagged(TAG_ENV, run.id)
    assert len(members) >= 3  # trainer and two workers (the supervisor carries no tag of its own)

    started = time.monotonic()
    os.killpg(sup.pid, sig)
    assert wait_exit(sup, tmp_path) == code
    print(f"exit {time.monotonic() - started:.2f} s after {signal.Signals(sig).name}")

    assert not [pid for pid, start in members.items() if running(pid, start)]
    assert not tagged(TAG_ENV, run.id)
    assert checkpoint.load(last)["step"] >= 1
    log = (tmp_path / "run.log").read_text()
    assert f"stopped by {signal.Signals(sig).name}" in log
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log
    assert "leftover" not in log  # the trainer shut its workers down itself; the supervisor had nothing to do
    _, listed = runner_cli(env, "runs")
    assert listed[0]["status"] == f"stopped by {signal.Signals(sig).name}"


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_stop_signal_to_the_workers_too(tmp_path: Path, markers: Path, sig: int, code: int) -> None:
    """A trainer without the supervisor, signalled with its whole group, workers included: Ctrl+C in a
    terminal (`python -m runner.train`), or torchrun's SIGTERM to a rank's group. The workers ignore it
    (no KeyboardInterrupt, no "worker killed by signal" in the trainer); the trainer stops them itself."""
    from runner.train import checkpoint

    env = child_env(tmp_path)
    with open(tmp_path / "run.log", "ab") as log:
        trainer = subprocess.Popen([sys.executable, "-m", "runner.train", *TINY, *BLOCKING, "--workers", "2",
                                    "--worker-start-method", "spawn", "--checkpoint-every", "1", "--name", "bare",
                                    "--run-dir", str(tmp_path / "runs")],
                                   env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    last = wait_trained(tmp_path, "bare", trainer)
    members = tagged(MARKERS_ENV, str(markers))

    os.killpg(trainer.pid, sig)
    assert wait_exit(trainer, tmp_path) == code
    # No supervisor reaps here: spawn's resource tracker leaves by itself once the trainer is gone, a moment later.
    wait_for(lambda: not [pid for pid, start in members.items() if running(pid, start)], EXIT, "the run's processes")
    assert checkpoint.load(last)["step"] >= 1
    log = (tmp_path / "run.log").read_text()
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log


@pytest.mark.slow
def test_second_ctrl_c_kills_the_run_at_once(tmp_path: Path, markers: Path) -> None:
    """A slow step keeps the graceful path from finishing; the second Ctrl+C ends everything now."""
    from runner.train import checkpoint

    env = child_env(tmp_path, **{SLOW_STEP_ENV: "3"})
    sup = start_run(tmp_path, env, *TINY, "--model", "tests.support.procs:slow_step_model",
                    "--samples", "64", "--no-graph", "--checkpoint-every", "1", "--workers", "2", "--name", "slow")
    wait_for(lambda: marked(markers, "slow"), STARTUP, "the slow step", sup)
    run = only_run()
    members = tagged(TAG_ENV, run.id)

    os.killpg(sup.pid, signal.SIGINT)
    wait_for(lambda: "stopping after this step" in (tmp_path / "run.log").read_text(), 10, "the first stop")
    time.sleep(0.5)
    assert sup.poll() is None  # still in the slow step
    os.killpg(sup.pid, signal.SIGINT)
    assert wait_exit(sup, tmp_path) == 130

    assert not [pid for pid, start in members.items() if running(pid, start)]
    assert checkpoint.load(tmp_path / "runs" / "slow" / "checkpoints" / "last.pt")["step"] == 2


@pytest.mark.slow
def test_one_ctrl_c_ends_a_ddp_run_whose_rank_is_blocked_in_data_loading(tmp_path: Path, markers: Path) -> None:
    """Rank 1's `__getitem__` blocks for good, so the ranks can never agree on a step to stop after:
    one SIGINT to the supervisor ends every process of the run (exit 130), no second Ctrl+C needed."""
    env = child_env(tmp_path, RUNNER_TEST_BLOCK_AFTER="12")
    sup = start_run(tmp_path, env, *TINY, "--model", "mlp", "--data", "tests.support.ddp:rank_blocking_dataset",
                    "--strategy", "ddp", "--nproc", "2", "--name", "blocked")
    wait_for(lambda: marked(markers, "blocked"), STARTUP, "rank 1 to block in __getitem__", sup)
    time.sleep(0.5)  # rank 0 goes on into the step's collective, where it waits for rank 1
    run = only_run()
    members = tagged(TAG_ENV, run.id)
    assert len(members) >= 3  # torchrun and both ranks

    started = time.monotonic()
    os.kill(sup.pid, signal.SIGINT)
    assert wait_exit(sup, tmp_path) == 130
    print(f"exit {time.monotonic() - started:.2f} s after one SIGINT")
    assert not [pid for pid, start in members.items() if running(pid, start)]
    assert not tagged(TAG_ENV, run.id)
    assert "did not all go on" in (tmp_path / "run.log").read_text()


# --- the supervisor ------------------------------------------------------------------------------

@pytest.mark.slow
def test_supervisor_reaps_workers_when_the_trainer_is_killed(tmp_path: Path, markers: Path) -> None:
    """Guard off (so only the supervisor can help): SIGKILL the trainer, the workers still go."""
    env = child_env(tmp_path, RUNNER_WORKER_GUARD="0")
    sup = start_run(tmp_path, env, *TINY, *BLOCKING, "--workers", "2", "--name", "reap")
    wait_for(lambda: len(marked(markers, "blocked")) == 2, STARTUP, "both workers to block", sup)
    run = only_run()
    workers = {pid: proc_table.start_ticks(pid) for pid in marked(markers, "blocked")}
    (trainer,) = roles(run.id)["trainer"]

    os.kill(trainer, signal.SIGKILL)
    assert wait_exit(sup, tmp_path) == 137
    assert not [pid for pid, start in workers.items() if running(pid, start)]
    assert "ended 2 leftover process(es)" in (tmp_path / "run.log").read_text()


@pytest.mark.slow
def test_trainer_stops_gracefully_when_the_supervisor_is_killed(tmp_path: Path, markers: Path) -> None:
    """PR_SET_PDEATHSIG: the supervisor's death is a SIGTERM to the trainer, which stops as for Ctrl+C."""
    from runner.train import checkpoint

    env = child_env(tmp_path)
    sup = start_run(tmp_path, env, *TINY, *BLOCKING, "--workers", "2", "--checkpoint-every", "1", "--name", "orphan")
    last = wait_trained(tmp_path, "orphan", sup)
    members = tagged(TAG_ENV, only_run().id)

    sup.kill()
    sup.wait()
    wait_for(lambda: not [pid for pid, start in members.items() if running(pid, start)], EXIT, "the run to end")
    assert "stopped by SIGTERM" in (tmp_path / "run.log").read_text()
    assert checkpoint.load(last)["step"] >= 1


@pytest.mark.slow
def test_supervisor_reaps_ranks_when_the_torchrun_agent_is_killed(tmp_path: Path, markers: Path) -> None:
    env = child_env(tmp_path)
    sup = start_run(tmp_path, env, *TINY, *BLOCKING, "--strategy", "ddp", "--nproc", "2", "--workers", "1",
                    "--name", "agent")
    wait_for(lambda: len(marked(markers, "blocked")) == 2, STARTUP, "a worker per rank to block", sup)
    run = only_run()
    members = tagged(TAG_ENV, run.id)
    (agent,) = roles(run.id)["agent"]

    os.kill(agent, signal.SIGKILL)
    assert wait_exit(sup, tmp_path, EXIT + 10) == 137  # ranks get SIGTERM, then SIGKILL after the reaping grace
    assert not [pid for pid, start in members.items() if running(pid, start)]


