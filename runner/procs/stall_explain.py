"""What a stall finding says: each rank's state with its key frame, the rank that stopped first, and
the sentence and advice the stall watch (runner/procs/stall_watch.py) writes. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from runner.procs import stacks
from runner.procs.heartbeat import Beat
from runner.procs.stacks import Stacks

DOING = {"start-up": "start-up", "data": "data loading", "h2d": "the host-to-device copy", "forward": "forward",
         "backward": "backward", "optimizer": "the optimizer step", "collective": "a collective",
         "checkpoint": "checkpointing", "evaluation": "evaluation", "telemetry": "telemetry",
         "other": "the loop between steps"}
IN_STEP = ("data", "h2d", "forward", "backward", "optimizer")  # phases of step N+1 (the others come after step N)
_COLLECTIVE, _DDP = "/torch/distributed/", "torch/nn/parallel/distributed.py"  # a frame there waits for peers



@dataclass
class RankState:
    """What a finding says about one rank."""

    rank: int
    pid: int
    phase: str
    step: int  # optimizer steps done
    seconds: float  # in this phase so far
    file: str = ""
    line: int = 0
    function: str = ""
    where: str = ""  # "DataLoader worker 0 (pid 123)" when the frame is a worker's
    waits_in: str = ""  # the torch.distributed function the main thread waits in, if any (a collective)

    def frame_text(self) -> str:
        if not self.file:
            return ""
        frame = stacks.Frame(self.function, self.file, self.line)
        return f"at {frame.short()} in `{self.function}`" + (f" ({self.where})" if self.where else "")

    def doing(self) -> str:
        """`data loading of step 41`, `a collective after step 40`."""
        what = DOING.get(self.phase, self.phase)
        if self.phase in IN_STEP:
            return f"{what} of step {self.step + 1}"
        return f"{what} after step {self.step}" if self.step else what



# --- ranks and sentences ------------------------------------------------------------------------------

def explain_ranks(beats: list[Beat], captured: list[Stacks], now: float) -> list[RankState]:
    """Every rank's state with its key frame, the rank that stopped first first: the others usually wait
    for it. Ranks waiting for peers come last (in a collective, or with their main thread inside
    torch.distributed or DDP's collectives, or, under DDP, in backward: its gradient all-reduce); then
    fewer steps first, then the longest in its phase. Which rank entered its phase first alone does not
    tell: the ranks leave a collective a fraction of a millisecond apart."""
    states = []
    for beat in beats:
        state = RankState(beat.rank, beat.pid, beat.phase, beat.step, now - beat.since)
        own = next((s for s in captured if s.pid == beat.pid), None)
        frame = stacks.key_frame(own.main.frames) if own is not None and own.main is not None else None
        if beat.phase == "data" and (frame is None or stacks.origin(frame.file) != "user"):
            for worker in (s for s in captured if s.role == "worker" and s.rank == beat.rank and s.main):
                found = stacks.key_frame(worker.main.frames) if worker.main else None
                if found is not None and stacks.origin(found.file) == "user":
                    frame, state.where = found, f"DataLoader worker {worker.worker_id}, pid {worker.pid}"
                    break
        if frame is not None:
            state.file, state.line, state.function = frame.file, frame.line, frame.function
        if own is not None and own.main is not None:
            state.waits_in = _waits_in(own.main.frames)
        states.append(state)
    world = max((b.world for b in beats), default=1)
    return sorted(states, key=lambda s: (_waiting(s, world), s.step, -s.seconds, s.rank))


def _waits_in(frames: list[stacks.Frame]) -> str:
    """The torch.distributed (or DDP) function the thread waits in: one reached from the innermost frame
    before any frame of the user's or runner's code (DDP's forward wrapper around a sleeping model is not)."""
    for frame in frames:
        if _COLLECTIVE in frame.file or frame.file.endswith(_DDP):
            return frame.function
        if stacks.origin(frame.file) != "library":
            return ""
    return ""


def _waiting(state: RankState, world: int) -> int:
    """2: waits for peers (a collective); 1: under DDP, in backward (probably its gradient all-reduce); 0: not."""
    if state.phase == "collective" or state.waits_in:
        return 2
    return 1 if world > 1 and state.phase == "backward" else 0


def _ranks_text(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(str(r) for r in ranks)


def stall_message(states: list[RankState], world: int) -> str:
    """One sentence: who stopped, where, for how long, and what the others do."""
    culprit = states[0]
    where = f", {culprit.frame_text()}" if culprit.file else ""
    if world == 1:
        return f"no progress for {culprit.seconds:.0f} s: the run is in {culprit.doing()}{where}"
    stopped = [s.rank for s in states if (s.phase, s.step) == (culprit.phase, culprit.step)]
    text = (f"no rank has made progress for {min(s.seconds for s in states):.0f} s: {_ranks_text(stopped)} "
            f"{'has' if len(stopped) == 1 else 'have'} been in {culprit.doing()} for {culprit.seconds:.0f} s{where}")
    others: dict[tuple[str, int], list[RankState]] = {}
    for state in states:
        if state.rank not in stopped:
            others.setdefault((state.phase, state.step), []).append(state)
    for group in others.values():
        first = group[0]
        verb = "waits" if len(group) == 1 else "wait"
        extra = f" (`{first.waits_in}`)" if first.waits_in else ""
        if not extra and first.phase == "backward":
            extra = " (DDP's gradient all-reduce)"
        frame = f", {first.frame_text()}" if first.file else ""
        text += f"; {_ranks_text([s.rank for s in group])} {verb} in {first.doing()}{extra}{frame}"
    return text


def stall_advice(culprit: RankState, folder: Path) -> str:
    if culprit.phase == "data":
        what = ("look at the dataset at that line: a read that never returns (a network filesystem, a lock), "
                "or a DataLoader worker that deadlocked")
    elif culprit.phase in ("forward", "backward", "optimizer", "h2d"):
        what = "look at that line of the model's code, or at a device that stopped answering (nvml.json)"
    elif culprit.phase == "collective":
        what = "the ranks disagree on the collectives: one took another branch and skipped or added one"
    else:
        what = f"look at what {DOING.get(culprit.phase, culprit.phase)} does at that line"
    return (f"{what}; every process's stacks are in {folder / 'stacks.txt'}; while it is alive, "
            f"`runner stacks` or `py-spy dump --pid {culprit.pid}` shows it again; --on-stall stop ends such runs")
