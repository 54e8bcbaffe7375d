"""Where each step's time goes: data wait, host→device copy, forward, backward, optimizer, telemetry.

The loop calls `enter(part)` at each boundary of a step; the time since the previous boundary is
charged to the part that was running, so over a log window the parts add up to the wall-clock time
(`other` holds what lies outside the named parts: checkpoints, the loop's own bookkeeping).

On CUDA the compute runs asynchronously: the host's time between two boundaries is only the time to
launch the kernels. There each step records CUDA events at the boundaries of the copy, forward,
backward and optimizer step, and they are read only once complete (`Event.query()`, never a wait):
at a log point, which follows the log point's one sync, every event of the window has completed. A
small ring of event sets bounds what is pending; a step that finds no free set is not timed on the
device (the device parts are averaged over the timed steps). Data wait and telemetry stay the host's
times (telemetry: building events and launching their kernels); `other` is then the rest of the wall
time, which includes the log point's wait for the device.
"""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import Iterator

import torch

from runner.procs import heartbeat
from runner.telemetry import tags

DEVICE_PARTS = ("h2d", "forward", "backward", "optimizer")  # timed with CUDA events on CUDA
_EVENT_AT = {"h2d": 0, "forward": 1, "backward": 2, "optimizer": 3, "telemetry": 4}  # event recorded on entry
RING = 32  # event sets: the GPU runs at most a few steps behind the host, and sets are harvested when short


class _EventRing:
    """Sets of five CUDA events (the four device parts' boundaries), recorded on the device's stream."""

    def __init__(self, device: torch.device, size: int = RING) -> None:
        self.device = device
        self.free = [self._new_set() for _ in range(size)]
        self.pending: collections.deque[list[torch.cuda.Event]] = collections.deque()
        self.current: list[torch.cuda.Event] | None = None
        self.sums = [0.0] * len(DEVICE_PARTS)
        self.timed = 0

    @staticmethod
    def _new_set() -> list[torch.cuda.Event]:
        return [torch.cuda.Event(enable_timing=True) for _ in _EVENT_AT]

    def record(self, index: int) -> None:
        if index == 0 and self.current is None:  # a step that ended early (skipped) reuses its set
            if not self.free:
                self.harvest()
            self.current = self.free.pop() if self.free else None
        if self.current is None:
            return
        self.current[index].record(torch.cuda.current_stream(self.device))
        if index == len(_EVENT_AT) - 1:
            self.pending.append(self.current)
            self.current = None

    def harvest(self) -> None:
        """Read the sets whose last event has completed (in order: the earlier ones have too)."""
        while self.pending and self.pending[0][-1].query():
            events = self.pending.popleft()
            for i in range(len(DEVICE_PARTS)):
                self.sums[i] += events[i].elapsed_time(events[i + 1])  # milliseconds
            self.timed += 1
            self.free.append(events)

    def take(self) -> dict[str, float] | None:
        """Milliseconds per timed step since the last take, or None when no step completed."""
        self.harvest()
        if not self.timed:
            return None
        out = {part: total / self.timed for part, total in zip(DEVICE_PARTS, self.sums, strict=True)}
        self.sums, self.timed = [0.0] * len(DEVICE_PARTS), 0
        return out


class StepClock:
    """Charges the time between boundaries to the running part; `window()` reads and restarts it."""

    def __init__(self, device: torch.device) -> None:
        self.events = _EventRing(device) if device.type == "cuda" else None
        self.sums = dict.fromkeys(tags.TIME_PARTS, 0.0)
        self.part = "other"
        self.last = self.window_start = time.perf_counter()
        self.beat = heartbeat.current()  # this rank's heartbeat: every boundary is also its phase

    def enter(self, part: str) -> None:
        """From now on the time is `part`'s (one of tags.TIME_PARTS), and so is this rank's phase for the
        stall watch (runner/procs/heartbeat.py: a write into shared memory, no system call)."""
        now = time.perf_counter()
        self.sums[self.part] += now - self.last
        self.part, self.last = part, now
        if self.events is not None and part in _EVENT_AT:
            self.events.record(_EVENT_AT[part])
        if self.beat is not None:
            self.beat.enter(part)

    @contextlib.contextmanager
    def apart(self, phase: str = "evaluation") -> Iterator[None]:
        """Time inside is no part's and not the window's (an evaluation, reported on its own): the
        step breakdown and samples/s stay those of training. The heartbeat says `phase` meanwhile."""
        self.enter(self.part)  # the running part's time up to here still counts
        start = time.perf_counter()
        try:
            with heartbeat.phase(phase):
                yield
        finally:
            spent = time.perf_counter() - start
            self.last += spent
            self.window_start += spent

    def window(self, steps: int) -> dict[str, float]:
        """Milliseconds per step of each part since the last call, and `step` (the whole). The part
        running now goes on (its time so far counts in this window)."""
        now = time.perf_counter()
        self.sums[self.part] += now - self.last
        wall, self.last, self.window_start = now - self.window_start, now, now
        steps = max(steps, 1)
        ms = {part: 1000 * seconds / steps for part, seconds in self.sums.items()}
        self.sums = dict.fromkeys(tags.TIME_PARTS, 0.0)
        ms["step"] = 1000 * wall / steps
        device = self.events.take() if self.events is not None else None
        if device is not None:  # host launch times replaced by device times; the rest is `other`
            ms.update(device)
            ms["other"] = max(0.0, ms["step"] - sum(ms[p] for p in tags.TIME_PARTS if p != "other"))
        return ms
