"""Each rank's heartbeat: its step, its phase and since when, in a small record another process reads.

Why: a rank that stopped progressing (a blocked read, a deadlocked worker, a peer that skipped a
collective) says nothing; its interpreter may be stuck. The supervisor, another process, reads these
records to see it (runner/procs/stall_watch.py) and to say where each rank is.

How it costs nothing: the record (`RECORD`, 64 bytes) lives in a memory-mapped file, one per rank,
under the run's folder in the run registry (`folder_for(run_id)`: local disk, never a shared
filesystem). Publishing a phase is one `struct.pack_into` into shared memory and a `time.time()`
(vDSO): no system call, no host-device sync, so it happens at every boundary of every step.
A sequence number written first and last lets a reader tell a record caught mid-write.

Phases (`PHASES`): start-up, data, h2d, forward, backward, optimizer, collective, checkpoint,
evaluation, telemetry, other (the loop between steps), ended. Who publishes what:
- runner/train/step_clock.py `StepClock.enter(part)`: the parts of a step (data_wait → data, h2d,
  forward, backward, optimizer, telemetry, other) and `clock.phase(name)` around what lies outside
  steps;
- runner/train/strategy.py: `collective` around its all-reduce, gather, broadcast and barrier;
- the loop: `checkpoint` around a checkpoint; the trainer's setup is `start-up`; `ended` after training.

To mark a new phase from anywhere in a rank (e.g. evaluation):

    from runner.procs import heartbeat
    with heartbeat.phase("evaluation"):   # a no-op where no heartbeat is installed
        ...

Start-up, checkpoint and evaluation, and the first `WARMUP_STEPS` steps, are *long* phases: the stall
watch gives them a longer allowance, and `on_regime(callback)` tells the strategy when a rank enters
or leaves them (it lengthens the collective timeout meanwhile). Torch-free.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import statistics
import struct
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from runner.procs import proc_table, registry

PHASES = ("start-up", "data", "h2d", "forward", "backward", "optimizer", "collective", "checkpoint", "evaluation",
          "telemetry", "other", "ended")
CODE = {name: code for code, name in enumerate(PHASES)}
CODE["data_wait"] = CODE["data"]  # the step clock's name for it
LONG_PHASES = frozenset({"start-up", "checkpoint", "evaluation"})
WARMUP_STEPS = 3  # the first steps (compilation, cudnn autotuning, the graph trace) count as long phases
STEP_TIMES = 33  # step durations kept for `median_step`
MAGIC = b"RHB1"
# begin seq, magic, pid, process start (clock ticks), rank, world size, step, phase, long, since (wall time), end seq
RECORD = struct.Struct("<Q4sIQiiqiidQ")


def folder_for(run_id: str) -> Path:
    """Where a run's heartbeats live: beside its process records in the registry (local disk)."""
    return registry.runs_dir() / run_id / "heartbeat"


@dataclass(frozen=True)
class Beat:
    """One rank's record as read: who, which step (optimizer steps done), which phase since when."""

    rank: int
    world: int
    pid: int
    start: int  # the process's start time in clock ticks: (pid, start) names it
    step: int
    phase: str
    since: float  # time.time() when the phase was entered
    long: bool  # a long phase, or one of this process's first WARMUP_STEPS steps

    def alive(self) -> bool:
        return proc_table.is_running(self.pid, self.start)


class Heartbeat:
    """This rank's record, written in place. `enter(phase)`, `set_step(step)`, `phase(name)`."""

    def __init__(self, path: Path, rank: int, world: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.ftruncate(fd, RECORD.size)
            self._map = mmap.mmap(fd, RECORD.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.path, self.rank, self.world = path, rank, world
        self.pid = os.getpid()
        self._start = proc_table.start_ticks(self.pid) or 0
        self._seq = 0
        self.step = 0
        self._steps_here = 0  # steps this process took (a resumed run warms up again)
        self._step_times: deque[float] = deque(maxlen=STEP_TIMES)  # seconds of the latest steps
        self._stepped_at = 0.0
        self.phase_name = "start-up"
        self._code = CODE["start-up"]
        self._long = True
        self._on_regime: list[Callable[[bool], None]] = []
        self._write()

    def _write(self) -> None:
        long = self.phase_name in LONG_PHASES or self._steps_here < WARMUP_STEPS
        self._seq += 1
        self.since = time.time()
        RECORD.pack_into(self._map, 0, self._seq, MAGIC, self.pid, self._start, self.rank, self.world, self.step,
                         self._code, long, self.since, self._seq)
        if long is not self._long:
            self._regime(long)

    def enter(self, phase: str) -> None:
        """From now on this rank is in `phase` (a name of PHASES, or the step clock's `data_wait`)."""
        code = CODE.get(phase, CODE["other"])
        self._code, self.phase_name = code, PHASES[code]
        self._write()

    def set_step(self, step: int) -> None:
        """Optimizer steps done so far (the loop calls it after each update)."""
        self.step = step
        self._steps_here += 1
        self._write()
        if self._steps_here > WARMUP_STEPS:
            self._step_times.append(self.since - self._stepped_at)
        self._stepped_at = self.since

    def median_step(self) -> float | None:
        """Median seconds per step over the latest steps after warm-up (None before)."""
        return statistics.median(self._step_times) if self._step_times else None

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """`name` for the duration of the block, then the phase it interrupted again (entered anew)."""
        before = self.phase_name
        self.enter(name)
        try:
            yield
        finally:
            self.enter(before)

    def on_regime(self, callback: Callable[[bool], None]) -> None:
        """`callback(long)` whenever this rank enters (True) or leaves (False) the long phases."""
        self._on_regime.append(callback)
        callback(self._long)

    def _regime(self, long: bool) -> None:
        self._long = long
        for callback in self._on_regime:
            callback(long)

    def close(self) -> None:
        """Say `ended` (the watch then leaves this rank alone) and release the mapping."""
        with contextlib.suppress(ValueError):
            self.enter("ended")
            self._map.close()


def read(path: Path) -> Beat | None:
    """A rank's record; None when missing, unreadable or caught mid-write a few times in a row."""
    for _ in range(5):
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                first, second = os.pread(fd, RECORD.size, 0), os.pread(fd, RECORD.size, 0)
            finally:
                os.close(fd)
        except OSError:
            return None
        if len(first) != RECORD.size or first != second:
            continue
        seq, magic, pid, start, rank, world, step, code, long, since, end = RECORD.unpack(first)
        if magic != MAGIC or seq != end or not 0 <= code < len(PHASES):
            continue
        return Beat(rank=rank, world=world, pid=pid, start=start, step=step, phase=PHASES[code], since=since,
                    long=bool(long))
    return None


def read_all(folder: Path) -> list[Beat]:
    """Every rank's record in `folder`, by rank (the newest process per rank after a restart)."""
    beats: dict[int, Beat] = {}
    try:
        paths = sorted(folder.glob("rank*"))
    except OSError:
        return []
    for path in paths:
        beat = read(path)
        if beat is not None and (beat.rank not in beats or beat.start > beats[beat.rank].start):
            beats[beat.rank] = beat
    return [beats[rank] for rank in sorted(beats)]


# --- this process's heartbeat (one per rank process) --------------------------------------------------

_current: Heartbeat | None = None


def install(run_id: str | None, rank: int, world: int) -> Heartbeat | None:
    """Open this rank's record under the run's registry folder (None without a run id or when the folder
    cannot be written: the run then goes on unwatched)."""
    global _current
    if run_id is None:
        return None
    try:
        _current = Heartbeat(folder_for(run_id) / f"rank{rank}", rank, world)
    except OSError:
        return None
    return _current


def current() -> Heartbeat | None:
    return _current


def uninstall() -> None:
    """Close this process's heartbeat (the run's training is over here)."""
    global _current
    if _current is not None:
        _current.close()
        _current = None


def enter(name: str) -> None:
    """`Heartbeat.enter` on this process's heartbeat, if any."""
    if _current is not None:
        _current.enter(name)


def set_step(step: int) -> None:
    """`Heartbeat.set_step` on this process's heartbeat, if any."""
    if _current is not None:
        _current.set_step(step)


@contextlib.contextmanager
def collective() -> Iterator[None]:
    """`collective` for the block, unless the rank is in a long phase: a checkpoint's barrier, or an
    evaluation's reduction, stays the checkpoint's or the evaluation's (and keeps its long allowance)."""
    if _current is None or _current.phase_name in LONG_PHASES:
        yield
        return
    with _current.phase("collective"):
        yield


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """`Heartbeat.phase` on this process's heartbeat; a plain block where there is none."""
    if _current is None:
        yield
        return
    with _current.phase(name):
        yield
