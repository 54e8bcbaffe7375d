"""Starting, waiting for and ending the real processes of the process-hygiene tests (tests/test_procs.py,
tests/test_cleanup.py); the `markers` fixture (tests/conftest.py) kills at teardown whatever a failing test left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from runner.procs import proc_table, registry
from tests.support.procs import MARKERS_ENV, marked
from tests.support.runs import child_pythonpath

TINY = ["--image-size", "8", "--batch-size", "4", "--steps", "1000", "--viz", "none",
        "--no-progress", "--resume", "never", "--device", "cpu"]
BLOCKING = ["--model", "mlp", "--data", "tests.support.procs:blocking_dataset"]
STARTUP = 90.0  # seconds a run may take to reach its blocked state on a loaded 2-core machine
EXIT = 10.0  # bound on a stop; measured ~2-3 s here. torch's own worker shutdown would take 20 s+


def child_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of the processes a test starts (its registry, its markers, no inherited tag)."""
    markers = tmp_path / "markers"
    markers.mkdir(exist_ok=True)
    env = dict(os.environ, PYTHONPATH=child_pythonpath(), **{MARKERS_ENV: str(markers)})
    for name in ("RUNNER_RUN_ID", "RUNNER_RUN_ROOT", "RUNNER_WORKER_GUARD"):
        env.pop(name, None)
    env.update(extra)
    return env


def tagged(key: str, value: str) -> dict[int, int]:
    """pid → start of the running processes whose exec-time environment has key=value."""
    found = {}
    for pid, proc in proc_table.snapshot().items():
        if not proc.is_zombie and proc.environ.get(key) == value:
            found[pid] = proc.start
    return found


def running(pid: int, start: int | None = None) -> bool:
    start = start if start is not None else proc_table.start_ticks(pid)
    return start is not None and proc_table.is_running(pid, start)


def wait_for(condition, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited ({proc.returncode}) first")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def start_run(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.Popen:
    """`python -m runner train ...` in its own session (its pgid is its pid, like a terminal's job)."""
    with open(tmp_path / "run.log", "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "runner", "train", "--run-dir", str(tmp_path / "runs"), *args],
                                env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_exit(sup: subprocess.Popen, tmp_path: Path, timeout: float = EXIT) -> int:
    """The supervisor's exit code; on a timeout, an error that shows the run's output."""
    try:
        return sup.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running after {timeout} s:\n{(tmp_path / 'run.log').read_text()}") from None


def wait_trained(tmp_path: Path, name: str, sup: subprocess.Popen) -> Path:
    """Wait for a first step (checkpoint every step) and both workers blocked; returns last.pt's path."""
    last = tmp_path / "runs" / name / "checkpoints" / "last.pt"
    wait_for(last.exists, STARTUP, "a first checkpoint", sup)
    wait_for(lambda: len(marked(tmp_path / "markers", "blocked")) == 2, STARTUP, "both workers to block", sup)
    return last


def only_run() -> registry.RunRecord:
    runs = registry.load_runs()
    assert len(runs) == 1, runs
    return runs[0]


def roles(run_id: str) -> dict[str, list[int]]:
    """role → pids of the run's running registered processes."""
    run = registry.load_run(registry.runs_dir() / run_id)
    out: dict[str, list[int]] = {}
    for record in run.procs:
        if running(record.pid, record.start):
            out.setdefault(record.role, []).append(record.pid)
    return out


def runner_cli(env: dict[str, str], *args: str) -> tuple[int, dict]:
    proc = subprocess.run([sys.executable, "-m", "runner", *args, "--json"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.strip(), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def kill_hard(sup: subprocess.Popen, child: int) -> None:
    """SIGKILL the run's child and then its supervisor, with the supervisor frozen meanwhile (so it
    neither reaps nor signals anything: the orphans stay for `runner cleanup`)."""
    os.kill(sup.pid, signal.SIGSTOP)
    os.kill(child, signal.SIGKILL)
    wait_for(lambda: not running(child), 10, "the child to die")
    os.kill(sup.pid, signal.SIGKILL)
    sup.wait(10)
