"""The supervisor: the `runner` process the user started, over the trainer (or torchrun).

- It is a child subreaper (`PR_SET_CHILD_SUBREAPER`): whatever its run leaves orphaned (DataLoader
  workers, forkservers, torchrun ranks in their own sessions) is reparented to it, not to PID 1.
- It tags the run (RUNNER_RUN_ID, RUNNER_RUN_ROOT) in the environment the child is exec'ed with and
  records itself and the child in the run registry.
- The child runs in its own process group (a terminal's Ctrl+C reaches the supervisor only) and
  gets SIGTERM if the supervisor dies (`PR_SET_PDEATHSIG`).
- The first SIGINT/SIGTERM/SIGHUP is forwarded to the child (which stops after its step); the
  second SIGKILLs every process of the run at once.
- DDP (notes from the ranks, control.py): after the first stop signal, unless every local rank says
  within STOP_GRACE seconds that it went on (began a step or a collective: none is blocked in data
  loading, so they will agree on a step to stop after), it ends the run itself, as a second signal would. When a rank
  fails and torchrun has no restart left, it ends torchrun at once (no restart, no waiting), gives
  the other ranks FAIL_GRACE seconds to end by themselves (those blocked in a collective the failed
  rank will never join cannot), ends the rest, and says in one line which rank failed and why.
- When the child ends, for any reason, it ends and reaps every process the run left behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from runner.config import TrainConfig
from runner.procs import control, proc_table, registry, stall_watch
from runner.procs.run_tag import ROOT_ENV, TAG_ENV, format_root, new_run_id
from runner.procs.signals import STOP_SIGNALS
from runner.procs.termination import Target, kill_now, phase_of, terminate, wait_gone

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
REAP_GRACE = 3.0  # seconds a leftover process gets between SIGTERM and SIGKILL
SETTLE = 0.5  # seconds leftovers get to exit by themselves before they are signalled
REAP_ROUNDS = 5  # each round may orphan more processes (grandchildren) to us
NEVER_KILL = ("torch_shm_manager",)  # exits by itself; killing it leaks /dev/shm/torch_*
STOP_GRACE = 2.5  # DDP: seconds after a stop signal for every rank to show it is not blocked
FAIL_GRACE = 2.0  # DDP: seconds after a rank failed for the others to end by themselves
FAILED_EXIT = 30.0  # seconds a failed rank gets to finish its teardown (flush its dashboards)
POLL = 0.5  # seconds between looks of the stall watch

_libc = ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, value: int) -> None:
    if _libc.prctl(option, value, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _die_with(parent: int) -> None:
    """In the child before exec: SIGTERM when the supervisor dies (and give up if it already has)."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        os._exit(1)


def _descendants(me: int) -> list[Target]:
    table = proc_table.snapshot()
    return [Target(pid, table[pid].start, phase_of(table[pid])) for pid in proc_table.descendants(table, me)
            if not table[pid].is_zombie and table[pid].comm not in NEVER_KILL]


def _reap_zombies() -> None:
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


class _Forwarder:
    """Signal handlers: stop signals (the first goes to the child, the second kills the whole run) and,
    for DDP, the ranks' notes and the alarm that bounds how long a stop or a failure may take."""

    def __init__(self, notes_dir: Path | None, local_ranks: int, restarts: int) -> None:
        self.child: int | None = None
        self.received: list[int] = []
        self.notes_dir, self.local_ranks, self.restarts = notes_dir, local_ranks, restarts
        self.failure: str | None = None  # the first failed rank's reason
        self.failed: set[int] = set()  # pids of ranks that said they failed: they end by themselves

    def __call__(self, signum: int, _frame: object) -> None:
        if signum == control.NOTICE:
            self._read_notes()
        elif signum == signal.SIGALRM:
            self._alarm()
        else:
            self.received.append(signum)
            self._act()

    def attach(self, child: int) -> None:
        self.child = child
        if self.received:
            self._act()

    def _act(self) -> None:
        if self.child is None:
            return
        if len(self.received) == 1:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.child, self.received[0])
            if self.notes_dir is not None and self.failure is None:
                signal.setitimer(signal.ITIMER_REAL, STOP_GRACE)
        else:
            kill_now(_descendants(os.getpid()))

    def _read_notes(self) -> None:
        if self.notes_dir is None:
            return
        notes = control.Notes.read(self.notes_dir)
        if len(notes.alive) >= self.local_ranks and self.failure is None:
            signal.setitimer(signal.ITIMER_REAL, 0)  # every rank is training on: they will agree
        new = {pid: why for pid, why in notes.failed.items() if pid not in self.failed}
        self.failed |= set(new)
        if new and self.failure is None and self.restarts == 0:
            self.failure = next(iter(new.values()))
            agents = [t for t in _descendants(os.getpid()) if t.pid == self.child]
            kill_now(agents)  # no restart to wait for; torchrun would only wait and print its own report
            signal.setitimer(signal.ITIMER_REAL, FAIL_GRACE)

    def _alarm(self) -> None:
        me = os.getpid()
        if self.failure is not None:  # ranks still here FAIL_GRACE after a failure wait on the failed one
            spared = set(self.failed)
            table = proc_table.snapshot()
            for pid in self.failed:
                spared.update(proc_table.descendants(table, pid))
            kill_now([t for t in _descendants(me) if t.pid not in spared])
            return
        print(f"runner: the ranks did not all go on within {STOP_GRACE:g} s of the stop signal (one is "
              "blocked, e.g. in data loading): ending the run now", file=sys.stderr, flush=True)
        kill_now(_descendants(me))


def _reap_leftovers(me: int) -> list[Target]:
    """End and reap every process still below us; returns what could not be ended."""
    ended: list[Target] = []
    left: list[Target] = []
    for _ in range(REAP_ROUNDS):
        _reap_zombies()
        # Helpers (resource tracker, forkserver) leave by themselves just after the trainer: let them.
        targets = wait_gone(_descendants(me), SETTLE)
        if not targets:
            break
        ended += targets
        left = terminate(targets, REAP_GRACE)
        _reap_zombies()
        if left:
            break
    if ended:
        pids = ", ".join(str(t.pid) for t in ended)
        print(f"runner: ended {len(ended)} leftover process(es) of the run: {pids}", file=sys.stderr, flush=True)
    return left


def _stall_watch(cfg: TrainConfig, run_id: str, registered: bool, env: dict[str, str]) -> stall_watch.StallWatch | None:
    """The run's stall watch (None when it is off, or without a registry: the ranks' heartbeats live
    there); under DDP, NCCL's flight recorder set up in the ranks' environment for its captures."""
    if cfg.strategy == "ddp":
        env.update(stall_watch.nccl_environment(run_id, cfg.run_path))
    if not registered or cfg.stall_timeout == 0:
        return None
    return stall_watch.StallWatch(run_id, cfg.run_path, cfg.stall_timeout, cfg.on_stall, cfg.name)


def _wait(child: int, watch: stall_watch.StallWatch | None) -> int:
    """Reap whatever is reparented to us meanwhile, until the child itself ends; returns its wait status.
    With a stall watch, poll it every POLL seconds in between (--on-stall stop: end the run at once)."""
    if watch is None:
        while True:
            pid, status = os.waitpid(-1, 0)
            if pid == child:
                return status
    child_fd = os.pidfd_open(child)
    try:
        while True:
            while (found := os.waitpid(-1, os.WNOHANG))[0] != 0:
                if found[0] == child:
                    if not watch.stopped:
                        _poll(watch)  # a last look: a run that recovered and ended at once says so
                    return found[1]
            if not watch.stopped and _poll(watch):
                kill_now(_descendants(os.getpid()))
            select.select([child_fd], [], [], POLL)
    finally:
        os.close(child_fd)


def _poll(watch: stall_watch.StallWatch) -> bool:
    """One look of the stall watch; True: --on-stall stop wants the run ended. A failing watch is turned
    off: it must never take the supervisor down."""
    try:
        return watch.poll()
    except Exception as exc:
        print(f"runner: warning: the stall watch failed ({type(exc).__name__}: {exc}); it is off",
              file=sys.stderr, flush=True)
        watch.fixed = 0.0
        return False


def supervise(cmd: list[str], cfg: TrainConfig) -> int:
    """Run `cmd` as the run's child, forward signals, reap what it leaves; return its exit code."""
    me = os.getpid()
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    root = (me, proc_table.start_ticks(me) or 0)
    run_id = new_run_id()
    run: registry.RunRecord | None = None
    try:
        run = registry.create_run(run_id, cfg.name, str(cfg.run_path.resolve()), root)
        registry.register_process(run_id, "supervisor")
        registry.prune()
    except OSError as exc:
        print(f"runner: warning: run registry {registry.state_dir()} not writable ({exc}); "
              "`runner cleanup` will go by process tags only", file=sys.stderr)
    env = dict(os.environ, RUNNER_RUN_NAME=cfg.name)
    env[TAG_ENV], env[ROOT_ENV] = run_id, format_root(root)
    watch = _stall_watch(cfg, run_id, run is not None, env)
    notes_dir = Path(tempfile.mkdtemp(prefix="runner-notes-")) if cfg.strategy == "ddp" else None
    if notes_dir is not None:
        env[control.DIR_ENV], env[control.SUPERVISOR_ENV] = str(notes_dir), format_root(root)
    forwarder = _Forwarder(notes_dir, cfg.nproc, cfg.max_restarts)
    handled = (*STOP_SIGNALS, control.NOTICE, signal.SIGALRM) if notes_dir is not None else STOP_SIGNALS
    previous = {sig: signal.signal(sig, forwarder) for sig in handled}
    try:
        child = subprocess.Popen(cmd, env=env, process_group=0, preexec_fn=lambda: _die_with(me))
        if run is not None:
            with contextlib.suppress(OSError):
                registry.register_process(run_id, "agent" if cfg.strategy == "ddp" else "trainer", pid=child.pid,
                                          parent=root, cmdline=" ".join(cmd))
        forwarder.attach(child.pid)
        status = _wait(child.pid, watch)
        code = os.waitstatus_to_exitcode(status)
        child.returncode = code
        code = code if code >= 0 else 128 - code
        if forwarder.failure is not None:  # failed ranks finish their teardown; the alarm ends the others
            wait_gone([t for t in _descendants(me) if t.pid in forwarder.failed], FAILED_EXIT)
        left = _reap_leftovers(me)
        if left:
            print(f"runner: could not end {', '.join(str(t.pid) for t in left)}; see `runner cleanup`",
                  file=sys.stderr)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if notes_dir is not None:
            shutil.rmtree(notes_dir, ignore_errors=True)
    if forwarder.failure is not None:
        print(f"runner: error: {forwarder.failure} (the other ranks were ended)", file=sys.stderr, flush=True)
        code = 1
    elif watch is not None and watch.stopped:
        print(f"runner: error: stalled: {watch.stopped} (--on-stall stop ended the run; see "
              f"{stall_watch.stall_dir(cfg.run_path)})", file=sys.stderr, flush=True)
        code = 1
    if run is not None:
        with contextlib.suppress(OSError):
            registry.finish_run(run, code)
    if forwarder.received and code != 0:
        return 128 + forwarder.received[0]
    return code
