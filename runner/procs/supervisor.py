"""The supervisor: the `runner` process the user started, over the trainer (or torchrun).

- It is a child subreaper (`PR_SET_CHILD_SUBREAPER`): whatever its run leaves orphaned (DataLoader
  workers, forkservers, torchrun ranks in their own sessions) is reparented to it, not to PID 1.
- It tags the run (RUNNER_RUN_ID, RUNNER_RUN_ROOT) in the environment the child is exec'ed with and
  records itself and the child in the run registry.
- The child runs in its own process group (a terminal's Ctrl+C reaches the supervisor only) and
  gets SIGTERM if the supervisor dies (`PR_SET_PDEATHSIG`).
- The first SIGINT/SIGTERM/SIGHUP is forwarded to the child (which stops after its step); the
  second SIGKILLs every process of the run at once.
- When the child ends, for any reason, it ends and reaps every process the run left behind.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

from runner.config import TrainConfig
from runner.procs import proc_table, registry
from runner.procs.run_tag import ROOT_ENV, TAG_ENV, format_root, new_run_id
from runner.procs.signals import STOP_SIGNALS
from runner.procs.termination import Target, kill_now, phase_of, terminate, wait_gone

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
REAP_GRACE = 3.0  # seconds a leftover process gets between SIGTERM and SIGKILL
SETTLE = 0.5  # seconds leftovers get to exit by themselves before they are signalled
REAP_ROUNDS = 5  # each round may orphan more processes (grandchildren) to us
NEVER_KILL = ("torch_shm_manager",)  # exits by itself; killing it leaks /dev/shm/torch_*

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
    """Signal handler: the first stop signal goes to the child, the second kills the whole run."""

    def __init__(self) -> None:
        self.child: int | None = None
        self.received: list[int] = []

    def __call__(self, signum: int, _frame: object) -> None:
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
            try:
                os.kill(self.child, self.received[0])
            except ProcessLookupError:
                pass
        else:
            kill_now(_descendants(os.getpid()))


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
    env = dict(os.environ, RUNNER_IN_PROCESS="1", RUNNER_RUN_NAME=cfg.name)
    env[TAG_ENV], env[ROOT_ENV] = run_id, format_root(root)
    forwarder = _Forwarder()
    previous = {sig: signal.signal(sig, forwarder) for sig in STOP_SIGNALS}
    try:
        child = subprocess.Popen(cmd, env=env, process_group=0, preexec_fn=lambda: _die_with(me))
        if run is not None:
            try:
                registry.register_process(run_id, "agent" if cfg.strategy == "ddp" else "trainer", pid=child.pid,
                                          parent=root, cmdline=" ".join(cmd))
            except OSError:
                pass
        forwarder.attach(child.pid)
        while True:  # reap whatever is reparented to us meanwhile, until the child itself ends
            pid, status = os.waitpid(-1, 0)
            if pid == child.pid:
                break
        code = os.waitstatus_to_exitcode(status)
        child.returncode = code
        code = code if code >= 0 else 128 - code
        left = _reap_leftovers(me)
        if left:
            print(f"runner: could not end {', '.join(str(t.pid) for t in left)}; see `runner cleanup`",
                  file=sys.stderr)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if run is not None:
        try:
            registry.finish_run(run, code)
        except OSError:
            pass
    if forwarder.received and code != 0:
        return 128 + forwarder.received[0]
    return code
