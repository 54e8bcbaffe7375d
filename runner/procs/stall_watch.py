"""The stall watch: sees a run stop progressing while its processes are alive, captures why, and says so.

Another process than the trainer, so it works when the trainer's interpreter is stuck: the supervisor
polls it from its wait loop (runner/procs/supervisor.py); a process without a supervisor (a user's
own loop) starts it as a small watcher process of its own:

    python -m runner.procs.stall_watch --run-id ID --run-path runs/NAME [--stall-timeout auto|S]
        [--on-stall report|stop] [--name NAME]      # ends when its parent process does

It reads every local rank's heartbeat (runner/procs/heartbeat.py). The run is stalled when no rank has
entered a new phase for longer than its allowance: `--stall-timeout` seconds (auto: the larger of 60 s
and 10x the median step time after warm-up), LONG_FACTOR times that in long phases (start-up, the
first steps, checkpoints, evaluation). Then, while the ranks are alive, it writes under
`runs/<name>/stall/<time>/`:
- stacks.txt / stacks.json: every rank's Python stacks, all threads, and its DataLoader workers'
  (runner/procs/stacks.py: py-spy, else the faulthandler signal);
- heartbeats.json: every rank's step, phase and for how long;
- nccl_trace_rank_<r>: NCCL's flight recorder, dumped through the pipe each rank opened (CUDA only; the
  supervisor enables the recorder with a bounded buffer, see `nccl_environment`);
- nvml.json: the GPUs' state (utilisation, memory, power, the processes on them), where NVML exists.
Then one finding, `stalled` (one process) or `hang_suspected` (DDP): the rank(s) that stopped, their
phase and for how long, the innermost frame in user code or in runner (file:line, function), and
what the other ranks do. It goes to the console (printed here: the trainer may be stuck), to
`stall/findings.jsonl` (which `runner report` folds in), and, through the trainer's stall feed
(runner/diagnosis/stall_feed.py, on its hub's threads, alive while the training thread is stuck), to
both dashboards and findings.json. One finding per stall; when any rank moves again an info finding
`stall_recovered` says so, and the run may stall again later. `--on-stall stop`: `poll` returns True
after the capture, and the caller ends the run (exit 1, reason `stalled`). Torch-free.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import sys
import time
from collections import deque
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

from runner.procs import heartbeat, proc_table, registry, stacks
from runner.procs.heartbeat import Beat
from runner.procs.stacks import Stacks
from runner.procs.stall_capture import nvml_state, trigger_flight_recorder
from runner.procs.stall_explain import RankState, explain_ranks, stall_advice, stall_message

AUTO_FLOOR = 60.0  # seconds: the auto timeout is at least this...
AUTO_STEPS = 10.0  # ...and at least this many median steps
LONG_FACTOR = 10.0  # long phases get this many timeouts
RATE_SAMPLES = 64  # step-time samples the median is taken over
FEED_WAIT = 5.0  # --on-stall stop: seconds the trainer's feed gets to deliver (and flush) the finding first
NCCL_BUFFER = "2000"  # flight recorder entries per rank (the PyTorch tutorial's advice)
FINDINGS = "findings.jsonl"
STOPPED = "stopped.json"
FED = ".fed"  # the trainer's feed counts the findings it delivered here

def stall_dir(run_path: Path) -> Path:
    return Path(run_path) / "stall"


def nccl_environment(run_id: str, run_path: Path) -> dict[str, str]:
    """Environment for the ranks: NCCL's flight recorder on, with a bounded buffer, dumped on a collective
    timeout and on demand (a named pipe per rank), into `runs/<name>/stall/`. Only what the user has not set.

    TORCH_NCCL_ASYNC_ERROR_HANDLING=3 (tear down without aborting the communicator): with 1 the watchdog
    aborts before the dump is written (pytorch#121055). The names are torch >= 2.8's (TORCH_FR_*; the old
    TORCH_NCCL_TRACE_BUFFER_SIZE / TORCH_NCCL_DEBUG_INFO_TEMP_FILE print a deprecation warning in every rank,
    NCCL or not): on an older torch, set those two yourself. A rank that creates a NCCL process group makes the
    dumps' folder (runner/train/strategy.py). Untested here (no GPU on the development machine).
    """
    prefix = str(stall_dir(run_path).resolve() / "nccl_trace_rank_")
    wanted = {"TORCH_FR_BUFFER_SIZE": NCCL_BUFFER, "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
              "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3", "TORCH_FR_DUMP_TEMP_FILE": prefix,
              "TORCH_NCCL_DEBUG_INFO_PIPE_FILE": str(heartbeat.folder_for(run_id) / "nccl_pipe_")}
    return {key: value for key, value in wanted.items() if key not in os.environ}


class StallWatch:
    """Polled every fraction of a second; `poll()` is True when --on-stall stop wants the run ended now."""

    def __init__(self, run_id: str, run_path: Path, timeout: float | str = "auto", on_stall: str = "report",
                 name: str = "", out: IO[str] | None = None) -> None:
        self.run_id, self.run_path, self.on_stall = run_id, Path(run_path), on_stall
        self.name = name or self.run_path.name
        self.fixed = None if timeout == "auto" else float(timeout)
        self.out = out if out is not None else sys.stderr
        self.folder = heartbeat.folder_for(run_id)
        self.rates: deque[float] = deque(maxlen=RATE_SAMPLES)
        self._last_step: tuple[int, float] | None = None  # (min step, when it was first seen)
        self.stall: dict[str, Any] | None = None  # the stall being reported: signature, culprit, its record
        self.findings = 0  # written to findings.jsonl by this watch
        self.stopped = ""  # --on-stall stop: the finding's message once the run is to end
        with contextlib.suppress(OSError):  # a new attempt of the run: an earlier stop is not this one's
            (stall_dir(self.run_path) / STOPPED).unlink()

    @property
    def enabled(self) -> bool:
        return self.fixed != 0.0

    def timeout(self) -> float:
        """The steady allowance: --stall-timeout, or auto from the median step time."""
        if self.fixed is not None:
            return self.fixed
        median = statistics.median(self.rates) if self.rates else 0.0
        return max(AUTO_FLOOR, AUTO_STEPS * median)

    def allowance(self, beat: Beat) -> float:
        return self.timeout() * (LONG_FACTOR if beat.long else 1.0)

    # --- polling ---

    def poll(self, now: float | None = None) -> bool:
        if not self.enabled:
            return False
        now = time.time() if now is None else now
        if self.stall is not None:  # a stall was reported: has any rank moved since (ended, even)?
            moved = [b for b in heartbeat.read_all(self.folder)
                     if (b.pid, b.step, b.phase, b.since) not in self.stall["signature"]
                     and any(b.pid == pid for pid, *_ in self.stall["signature"])]
            if moved:
                self._recovered(moved)
            return False
        beats = live_beats(self.run_id)
        if not beats:
            return False
        self._observe_rate(beats, now)
        if all(now - b.since > self.allowance(b) for b in beats):
            return self._stalled(beats, now, [(b.pid, b.step, b.phase, b.since) for b in beats])
        return False

    def _observe_rate(self, beats: list[Beat], now: float) -> None:
        """Seconds per step, from the slowest rank's step count as it goes up (after warm-up)."""
        step = min(b.step for b in beats)
        if self._last_step is None or step < self._last_step[0]:
            self._last_step = (step, now)
        elif step > self._last_step[0]:
            before, since = self._last_step
            if before >= heartbeat.WARMUP_STEPS:
                self.rates.append((now - since) / (step - before))
            self._last_step = (step, now)

    # --- a stall ---

    def _stalled(self, beats: list[Beat], now: float, signature: list) -> bool:
        folder = self._capture_folder()
        targets = self._targets(beats)
        captured = stacks.capture(targets, stacks.folder_for(self.run_id))
        states = explain_ranks(beats, captured, now)
        notes = {s.rank: f"{s.doing()} for {s.seconds:.0f} s (pid {s.pid})" for s in states}
        _write(folder / "stacks.txt", stacks.render(captured, notes))
        _write(folder / "stacks.json", json.dumps([s.to_dict() for s in captured], indent=1))
        _write(folder / "heartbeats.json", json.dumps([asdict(b) for b in beats], indent=1))
        nccl = trigger_flight_recorder(self.folder, [b.rank for b in beats], stall_dir(self.run_path), folder)
        _write(folder / "nvml.json", json.dumps(nvml_state(), indent=1))
        record = self._finding(states, beats, captured, folder, nccl)
        self.stall = {"signature": signature, "culprit": states[0], "record": record,
                      "world": max(b.world for b in beats), "last_progress": max(b.since for b in beats)}
        self._raise(record)
        if self.on_stall != "stop":
            return False
        self._wait_fed()
        _write(stall_dir(self.run_path) / STOPPED, json.dumps({"time": time.time(), "message": record["message"]}))
        self.stopped = record["message"]
        return True

    def _capture_folder(self) -> Path:
        base = stall_dir(self.run_path) / time.strftime("%Y%m%d-%H%M%S")
        folder, n = base, 1
        while folder.exists():
            n += 1
            folder = base.with_name(f"{base.name}-{n}")
        folder.mkdir(parents=True)
        return folder

    def _targets(self, beats: list[Beat]) -> list[stacks.Target]:
        """The ranks (from their heartbeats) and their DataLoader workers (from the run registry)."""
        found = {(b.pid, b.start): stacks.Target(b.pid, b.start, "rank" if b.world > 1 else "trainer", b.rank)
                 for b in beats}
        run = registry.load_run(registry.runs_dir() / self.run_id)
        for target in stacks.targets_of(run) if run is not None else []:
            found.setdefault((target.pid, target.start), target)
        return sorted(found.values(), key=lambda t: (t.rank or 0, t.role == "worker", t.worker_id or 0, t.pid))

    def _finding(self, states: list[RankState], beats: list[Beat], captured: list[Stacks], folder: Path,
                 nccl: list[str]) -> dict[str, Any]:
        culprit, world = states[0], max(b.world for b in beats)
        methods = sorted({s.method for s in captured if s.method}) or ["none"]
        ranks = [{"rank": s.rank, "pid": s.pid, "phase": s.phase, "step": s.step, "seconds": round(s.seconds, 1),
                  "frame": f"{s.file}:{s.line}" if s.file else "", "function": s.function,
                  **({"in": s.where} if s.where else {})} for s in states]
        evidence = {"stall_dir": str(folder), "timeout_s": round(self.timeout(), 1),
                    "allowance_s": round(self.allowance(next(b for b in beats if b.rank == culprit.rank)), 1),
                    "stacks": ", ".join(methods), "ranks": ranks}
        if nccl:
            evidence["nccl_flight_recorder"] = nccl
        kind = "hang_suspected" if world > 1 else "stalled"
        return {"kind": kind, "severity": "error", "message": stall_message(states, world),
                "evidence": evidence, "advice": stall_advice(culprit, folder), "step": culprit.step,
                "rank": culprit.rank, "time": time.time()}

    def _recovered(self, moved: list[Beat]) -> None:
        """Some rank entered a new phase (or ended) after the stall: say for how long the run was stuck."""
        stall, self.stall = self.stall, None
        assert stall is not None
        culprit: RankState = stall["culprit"]
        beat = next((b for b in moved if b.rank == culprit.rank), moved[0])
        lasted = min(b.since for b in moved) - stall["last_progress"]
        now_doing = "now in " + RankState(beat.rank, beat.pid, beat.phase, beat.step, 0.0).doing()
        if beat.phase == "ended":
            now_doing = f"it has finished training, step {beat.step}"
        who = f"rank {culprit.rank} left" if stall["world"] > 1 else "it left"
        self._raise({"kind": "stall_recovered", "severity": "info",
                     "message": f"the run went on after {lasted:.0f} s without progress: {who} {culprit.doing()} "
                                f"({now_doing})",
                     "evidence": {"seconds": round(lasted, 1), "stall_dir": stall["record"]["evidence"]["stall_dir"]},
                     "advice": "", "step": beat.step, "rank": culprit.rank, "time": time.time()})

    def _raise(self, record: dict[str, Any]) -> None:
        """To stall/findings.jsonl (the trainer's feed and `runner report` read it) and to the console."""
        path = stall_dir(self.run_path) / FINDINGS
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, default=str) + "\n")
        self.findings += 1
        advice = f"; advice: {record['advice']}" if record.get("advice") else ""
        with contextlib.suppress(OSError, ValueError):
            print(f"[{self.name}] {record['severity'].upper()} {record['kind']} at step {record['step']}: "
                  f"{record['message']}{advice}", file=self.out, flush=True)

    def _wait_fed(self) -> None:
        """--on-stall stop: give a live trainer's feed a moment to deliver the finding to its dashboards."""
        deadline = time.monotonic() + FEED_WAIT
        while time.monotonic() < deadline:
            try:
                if int((stall_dir(self.run_path) / FED).read_text() or 0) >= self.findings:
                    time.sleep(0.5)  # the sinks write findings at once, on their own threads
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.1)


def live_beats(run_id: str) -> list[Beat]:
    """The heartbeats of the run's ranks that are alive and training (not ended)."""
    return [b for b in heartbeat.read_all(heartbeat.folder_for(run_id)) if b.phase != "ended" and b.alive()]


def find_live_run(run: str, run_dir: str) -> registry.RunRecord:
    """A live run of the registry by id, name, or folder (as a path or a name under `run_dir`); the newest
    when several match. A usage error when none does."""
    from runner.errors import usage_error

    boot = proc_table.boot_id()
    folders = {str(Path(run).resolve()), str((Path(run_dir) / run).resolve())}
    live = [r for r in registry.load_runs() if r.root_alive(boot)]
    matches = [r for r in live if run in (r.id, r.name) or r.run_path in folders]
    if not matches:
        names = ", ".join(sorted({r.name for r in live})) or "none"
        raise usage_error(f"no live run {run!r} (live runs: {names}); `runner runs` lists every run")
    return matches[-1]


def _write(path: Path, text: str) -> None:
    with contextlib.suppress(OSError):
        path.write_text(text, encoding="utf-8")


# --- the stand-alone watcher --------------------------------------------------------------------------

def end_run(run_id: str, beats: list[Beat]) -> None:
    """SIGKILL the run's ranks and workers (a stand-alone watcher is nobody's parent)."""
    from runner.procs.termination import Target, kill_now

    run = registry.load_run(registry.runs_dir() / run_id)
    targets = {(t.pid, t.start) for t in (stacks.targets_of(run) if run is not None else [])}
    targets |= {(b.pid, b.start) for b in beats}
    kill_now([Target(pid, start, "rank") for pid, start in targets])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner.procs.stall_watch", description=__doc__.split("\n")[0])
    parser.add_argument("--run-id", required=True, help="the run's id in the run registry (RUNNER_RUN_ID)")
    parser.add_argument("--run-path", required=True, help="the run's folder (stall/ is written there)")
    parser.add_argument("--stall-timeout", default="auto", help="seconds, auto, or 0 (off)")
    parser.add_argument("--on-stall", choices=("report", "stop"), default="report")
    parser.add_argument("--name", default="")
    parser.add_argument("--poll", type=float, default=0.5, help="seconds between looks")
    args = parser.parse_args(argv)
    timeout = args.stall_timeout if args.stall_timeout == "auto" else float(args.stall_timeout)
    watch = StallWatch(args.run_id, Path(args.run_path), timeout, args.on_stall, args.name)
    parent = os.getppid()
    parent_start = proc_table.start_ticks(parent)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while parent_start is not None and proc_table.is_running(parent, parent_start):
        if watch.poll():
            end_run(args.run_id, heartbeat.read_all(watch.folder))
            return 1
        time.sleep(args.poll)
    return 0


if __name__ == "__main__":
    sys.exit(main())
