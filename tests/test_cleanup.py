"""`runner cleanup` and `runner runs` with real processes: what a SIGKILLed run leaves, orphans of plain
scripts (the worker guard), the never-rules, pid reuse, /dev/shm, and small parts that need no torch.

Every test acts only on processes it started: `--yes` is always scoped with --run or --only, and each
test's processes carry its own PROCS_TEST_MARKERS folder (see tests/proc_runs.py `markers`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from runner.procs import proc_table, registry
from runner.procs.gpu_memory import gpu_memory_by_pid
from runner.procs.run_tag import TAG_ENV
from tests.support.proc_runs import (
    BLOCKING,
    EXIT,
    STARTUP,
    TINY,
    child_env,
    kill_hard,
    only_run,
    roles,
    runner_cli,
    running,
    start_run,
    tagged,
    wait_for,
)
from tests.support.procs import MARKERS_ENV, marked
from tests.support.runs import ROOT

# --- runner cleanup after the worst: supervisor and trainer SIGKILLed -----------------------------

@pytest.fixture(scope="module")
def bystanders(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[int, int]]:
    """An unrelated `sleep` and a live run (its own registry: known to cleanup by its tag alone)."""
    tmp = tmp_path_factory.mktemp("bystanders")
    env = child_env(tmp, XDG_STATE_HOME=str(tmp / "state"))
    sleeper = subprocess.Popen(["sleep", "300"], env=env)
    live = start_run(tmp, env, *TINY, *BLOCKING, "--workers", "1", "--name", "live")
    wait_for(lambda: marked(tmp / "markers", "blocked"), STARTUP, "the live run's worker to block", live)
    pids = tagged(MARKERS_ENV, str(tmp / "markers"))
    assert sleeper.pid in pids and live.pid in pids and len(pids) >= 4  # sleep, supervisor, trainer, worker
    yield pids
    os.killpg(live.pid, signal.SIGINT)
    live.wait(EXIT)
    sleeper.kill()
    sleeper.wait()


def assert_untouched(pids: dict[int, int], listed: list[dict]) -> None:
    assert not set(pids) & {row["pid"] for row in listed}
    assert all(running(pid, start) for pid, start in pids.items())


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_cleanup_ends_what_a_killed_run_left(tmp_path: Path, markers: Path, bystanders: dict[int, int],
                                             method: str) -> None:
    env = child_env(tmp_path, RUNNER_WORKER_GUARD="0")  # orphans that survive, to clean up
    sup = start_run(tmp_path, env, *TINY, *BLOCKING, "--workers", "2", "--worker-start-method", method,
                    "--name", f"killed-{method}")
    wait_for(lambda: len(marked(markers, "blocked")) == 2, STARTUP, "both workers to block", sup)
    run = only_run()
    (trainer,) = roles(run.id)["trainer"]
    kill_hard(sup, trainer)
    left = tagged(TAG_ENV, run.id)  # workers; forkserver and resource tracker where the method has them
    assert set(marked(markers, "blocked")) <= set(left)
    if method == "forkserver":
        assert len(left) == 4

    code, everything = runner_cli(env, "cleanup")
    assert code == 1
    rows = {row["pid"]: row for row in everything["processes"]}
    assert set(left) <= set(rows)
    assert all(run.id in rows[pid]["reason"] and rows[pid]["role"] for pid in left)
    assert_untouched(bystanders, everything["processes"])
    _, scoped = runner_cli(env, "cleanup", "--run", run.id)
    assert {row["pid"] for row in scoped["processes"]} == set(left)
    _, listed = runner_cli(env, "runs")
    assert "left over" in listed[0]["status"]

    code, done = runner_cli(env, "cleanup", "--yes", "--run", run.id, "--grace", "1")
    assert code == 0, done
    assert not [pid for pid, start in left.items() if running(pid, start)]
    assert_untouched(bystanders, done["processes"])


@pytest.mark.slow
def test_cleanup_ends_ranks_and_workers_after_the_torchrun_agent_is_killed(
        tmp_path: Path, markers: Path, bystanders: dict[int, int]) -> None:
    env = child_env(tmp_path)
    sup = start_run(tmp_path, env, *TINY, *BLOCKING, "--strategy", "ddp", "--nproc", "2", "--workers", "1",
                    "--name", "ddp")
    wait_for(lambda: len(marked(markers, "blocked")) == 2, STARTUP, "a worker per rank to block", sup)
    run = only_run()
    (agent,) = roles(run.id)["agent"]
    kill_hard(sup, agent)
    ranks = roles(run.id)["rank"]
    workers = marked(markers, "blocked")
    assert len(ranks) == 2 and all(running(pid) for pid in ranks + workers)

    code, dry = runner_cli(env, "cleanup", "--run", run.id)
    rows = {row["pid"]: row for row in dry["processes"]}
    assert code == 1 and set(rows) == set(ranks) | set(workers)
    assert {rows[pid]["role"] for pid in ranks} == {"rank"} and {rows[pid]["role"] for pid in workers} == {"worker"}
    code, _ = runner_cli(env, "cleanup", "--yes", "--run", run.id, "--grace", "2")
    assert code == 0
    assert not [pid for pid in ranks + workers if running(pid)]
    _, everything = runner_cli(env, "cleanup")
    assert_untouched(bystanders, everything["processes"])


# --- orphans of a plain script (no runner around it): the guard, and the orphan rules ---------------

def start_bare_loader(env: dict[str, str], method: str, guard: bool) -> subprocess.Popen:
    args = [sys.executable, "-m", "tests.support.procs", "--start-method", method] + (["--guard"] if guard else [])
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_worker_guard_ends_workers_whose_trainer_dies(tmp_path: Path, markers: Path, method: str) -> None:
    main = start_bare_loader(child_env(tmp_path), method, guard=True)
    wait_for(lambda: len(marked(markers, "blocked")) == 2, STARTUP, "both workers to block", main)
    workers = {pid: proc_table.start_ticks(pid) for pid in marked(markers, "blocked")}
    main.kill()
    main.wait()
    wait_for(lambda: not [p for p, s in workers.items() if running(p, s)], 5, "the guarded workers to exit")


@pytest.mark.slow
def test_cleanup_finds_untracked_orphans_by_their_missing_parent(tmp_path: Path, markers: Path) -> None:
    """No guard, no tag, no registry: forkserver workers of a SIGKILLed script, their forkserver and tracker."""
    main = start_bare_loader(child_env(tmp_path), "forkserver", guard=False)
    wait_for(lambda: len(marked(markers, "blocked")) == 2, STARTUP, "both workers to block", main)
    main.kill()
    main.wait()
    time.sleep(1.0)  # long enough for torch's own parent check, had it been able to help
    left = {pid: s for pid, s in tagged(MARKERS_ENV, str(markers)).items() if pid != main.pid}
    workers = marked(markers, "blocked")
    assert set(workers) <= set(left) and len(left) == 4  # two workers, forkserver, resource tracker

    code, dry = runner_cli(child_env(tmp_path), "cleanup")
    rows = {row["pid"]: row for row in dry["processes"]}
    assert code == 1 and set(left) <= set(rows)
    assert all(rows[pid]["reason"].startswith("DataLoader worker whose trainer is gone") for pid in workers)
    assert {rows[pid]["role"] for pid in left} == {"worker", "forkserver", "tracker"}

    only = ",".join(str(pid) for pid in left)
    code, _ = runner_cli(child_env(tmp_path), "cleanup", "--yes", "--only", only, "--grace", "1")
    assert code == 0
    assert not [pid for pid, start in left.items() if running(pid, start)]


# --- never-rules and pid reuse (no torch needed) ----------------------------------------------------

def dead_pid() -> tuple[int, int]:
    """A pid and start time of a process that has exited."""
    proc = subprocess.Popen(["true"])
    start = proc_table.start_ticks(proc.pid)
    proc.wait()
    return proc.pid, start or 1


def record(run_id: str, pid: int, start: int, role: str = "worker") -> None:
    data = registry.ProcRecord(pid=pid, start=start, boot=proc_table.boot_id(), role=role, rank=0, run_id=run_id,
                               cmdline="test")
    registry.write_json(registry.runs_dir() / run_id / "procs" / f"{pid}-{start}.json", data.__dict__)


def test_stale_record_whose_pid_was_reused_is_skipped(tmp_path: Path, markers: Path) -> None:
    env = child_env(tmp_path)
    sleeper = subprocess.Popen(["sleep", "60"], env=env)
    start = proc_table.start_ticks(sleeper.pid)
    registry.create_run("dead-run", "dead", str(tmp_path), dead_pid())
    record("dead-run", sleeper.pid, start - 7)  # the recorded process started earlier: the pid was reused

    code, dry = runner_cli(env, "cleanup", "--run", "dead-run")
    assert code == 0 and not dry["processes"]
    code, _ = runner_cli(env, "cleanup", "--yes", "--only", str(sleeper.pid), "--grace", "1")
    assert code == 0 and sleeper.poll() is None

    record("dead-run", sleeper.pid, start)  # the same process, recorded rightly: now it is a candidate
    code, dry = runner_cli(env, "cleanup", "--run", "dead-run")
    assert code == 1 and [row["pid"] for row in dry["processes"]] == [sleeper.pid]
    code, _ = runner_cli(env, "cleanup", "--yes", "--only", str(sleeper.pid), "--grace", "1")
    assert code == 0 and sleeper.wait(5) == -signal.SIGTERM


def test_never_rules(tmp_path: Path, markers: Path) -> None:
    """Records of a dead run naming the caller's ancestors, PID 1, another user's process, a process of
    a live run, and a `pt_data_worker` whose parent is alive (a name alone): none is listed."""
    env = child_env(tmp_path)
    nobody = subprocess.Popen(["sleep", "60"], env=env, user=65534) if os.getuid() == 0 else None
    live_root = subprocess.Popen(["sleep", "60"], env=env)
    live_member = subprocess.Popen(["sleep", "60"], env=env)
    named = subprocess.Popen([sys.executable, "-c", "import ctypes, time; "
                              "ctypes.CDLL(None).prctl(15, b'pt_data_worker', 0, 0, 0); time.sleep(60)"], env=env)
    wait_for(lambda: proc_table.Proc.read(named.pid).comm == "pt_data_worker", 10, "the rename")
    try:
        registry.create_run("dead", "dead", str(tmp_path), dead_pid())
        for pid in [os.getpid(), os.getppid(), 1] + ([nobody.pid] if nobody else []):
            record("dead", pid, proc_table.start_ticks(pid))
        registry.create_run("live", "live", str(tmp_path), (live_root.pid, proc_table.start_ticks(live_root.pid)))
        record("live", live_member.pid, proc_table.start_ticks(live_member.pid))

        code, dry = runner_cli(env, "cleanup")
        listed = {row["pid"] for row in dry["processes"]}
        protected = {os.getpid(), os.getppid(), 1, live_root.pid, live_member.pid, named.pid}
        assert not listed & (protected | ({nobody.pid} if nobody else set()))
        ours = [live_root, live_member, named] + ([nobody] if nobody else [])  # --yes only on what we started
        code, _ = runner_cli(env, "cleanup", "--yes", "--grace", "1", "--only", ",".join(str(p.pid) for p in ours))
        assert code == 0 and all(p.poll() is None for p in ours)
    finally:
        for p in (live_root, live_member, named) + ((nobody,) if nobody else ()):
            p.kill()
            p.wait()


def test_registry_forgets_old_ended_runs(tmp_path: Path) -> None:
    now = time.time()
    for run_id, age_days, ended in (("old", 30, True), ("recent", 1, True), ("old-killed", 30, False)):
        run = registry.create_run(run_id, run_id, str(tmp_path), dead_pid())
        run.created = now - age_days * 86400
        run.ended = run.created + 60 if ended else None
        registry.write_run(run)
    registry.prune(now=now)
    assert [run.id for run in registry.load_runs()] == ["recent"]


# --- /dev/shm ---------------------------------------------------------------------------------------

def test_shm_only_the_true_leak_is_removed(tmp_path: Path, markers: Path) -> None:
    env = child_env(tmp_path)
    dead, _ = dead_pid()
    tag = f"{os.getpid()}{time.monotonic_ns() % 10**9}"
    shm = Path("/dev/shm")
    old = time.time() - 120
    holder = subprocess.Popen(["sleep", "60"], env=env)  # started after `old`: not the creator of a file that old
    files = {
        "leak": shm / f"torch_{dead}_{tag}_0",
        "young": shm / f"torch_{dead}_{tag}_1",
        "creator_alive": shm / f"torch_1_{tag}_2",  # PID 1 started long before `old`
        "creator_pid_reused": shm / f"torch_{holder.pid}_{tag}_7",
        "open": shm / f"torch_{dead}_{tag}_3",
        "mapped": shm / f"torch_{dead}_{tag}_4",
        "other_user": shm / f"torch_{dead}_{tag}_5",
        "not_torch": shm / f"procs_test_{dead}_{tag}_6",
    }
    users = []
    try:
        for name, path in files.items():
            path.write_bytes(b"\0" * 4096)
            if name != "young":
                os.utime(path, (old, old))
        if os.getuid() == 0:
            os.chown(files["other_user"], 65534, 65534)
        else:
            files.pop("other_user").unlink()
        fd = os.open(files["open"], os.O_RDONLY)
        users.append(subprocess.Popen(["sleep", "60"], pass_fds=(fd,), env=env))
        os.close(fd)
        users.append(subprocess.Popen([sys.executable, "-c", "import mmap, sys, time\n"
                                       "f = open(sys.argv[1], 'r+b'); m = mmap.mmap(f.fileno(), 0); f.close()\n"
                                       "print('mapped', flush=True); time.sleep(60)", str(files["mapped"])],
                                      env=env, stdout=subprocess.PIPE, text=True))
        assert users[-1].stdout.readline().strip() == "mapped"

        only = ",".join(path.name for path in files.values())
        leaks = {str(files["leak"]), str(files["creator_pid_reused"])}
        code, dry = runner_cli(env, "cleanup", "--only", only)
        assert code == 1 and {row["path"] for row in dry["shm"]} == leaks
        code, done = runner_cli(env, "cleanup", "--yes", "--only", only)
        assert code == 0 and set(done["removed_shm"]) == leaks
        assert all(path.exists() != (str(path) in leaks) for path in files.values())
    finally:
        for p in [holder, *users]:
            p.kill()
            p.wait()
        for path in files.values():
            path.unlink(missing_ok=True)


# --- small parts --------------------------------------------------------------------------------------

def test_procs_and_cleanup_do_not_import_torch() -> None:
    code = ("import sys, runner.procs.cleanup, runner.procs.commands, runner.procs.supervisor, "
            "runner.procs.run_status, runner.procs.worker_guard, runner.procs.signals, runner.procs.control, "
            "runner.procs.rank_exit\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_rank_notes_reach_only_the_recorded_supervisor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """control.tell: the note is written whole and SIGUSR1 reaches the supervisor named by pid and start
    time; with no supervisor, or one whose pid now names another process, nothing is sent."""
    from runner.procs import control

    got: list[int] = []
    previous = signal.signal(control.NOTICE, lambda signum, _frame: got.append(signum))
    try:
        assert not control.tell("alive-0")  # no supervisor in the environment
        monkeypatch.setenv(control.DIR_ENV, str(tmp_path))
        me = os.getpid()
        monkeypatch.setenv(control.SUPERVISOR_ENV, f"{me}:{proc_table.start_ticks(me)}")
        assert control.tell("alive-0") and control.tell("failed-123", "rank 1 failed: RuntimeError: boom")
        assert control.tell("alive-1")
        wait_for(lambda: len(got) == 3, 5, "three notices")
        notes = control.Notes.read(tmp_path)
        assert notes.alive == {0, 1} and notes.failed == {123: "rank 1 failed: RuntimeError: boom"}
        monkeypatch.setenv(control.SUPERVISOR_ENV, f"{me}:{proc_table.start_ticks(me) - 1}")  # pid reused
        assert not control.tell("alive-2")
        assert len(got) == 3
    finally:
        signal.signal(control.NOTICE, previous)


def test_gpu_memory_per_process() -> None:
    """The real NVML path (here: no driver, so nothing) and a stand-in NVML with two devices."""
    assert isinstance(gpu_memory_by_pid(), dict)

    class NVMLError(Exception):
        pass

    def running_on(index: int) -> list[types.SimpleNamespace]:
        return [types.SimpleNamespace(pid=10, usedGpuMemory=1 << 20), types.SimpleNamespace(pid=11, usedGpuMemory=None)]

    calls = []
    fake = types.SimpleNamespace(
        NVMLError=NVMLError, nvmlInit=lambda: calls.append("init"), nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlDeviceGetCount=lambda: 2, nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetComputeRunningProcesses=running_on, nvmlDeviceGetGraphicsRunningProcesses=lambda h: [])
    assert gpu_memory_by_pid(fake) == {10: 2 << 20}
    assert calls == ["init", "shutdown"]
