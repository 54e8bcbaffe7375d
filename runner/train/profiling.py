"""--profile START:STOP: `torch.profiler` over those training steps only, the rest of the run untouched.

Writes `<run>/profile/trace[_rank<r>].json`, a Chrome trace that opens in Perfetto (ui.perfetto.dev)
or chrome://tracing (TensorBoard's profiler plugin is deprecated). On CUDA it also records the
allocator's history over the window and dumps `memory_snapshot[_rank<r>].pickle`, whose "Active
Memory Timeline" opens at pytorch.org/memory_viz: torch 2.14 deprecates the profiler's
`export_memory_timeline` in favour of these allocator snapshots.
"""

from __future__ import annotations

from pathlib import Path

import torch


def parse(spec: str) -> tuple[int, int]:
    """`START:STOP` → (START, STOP); the config validated the format."""
    start, stop = spec.split(":")
    return int(start), int(stop)


class StepProfiler:
    """Starts the profiler before step START, stops it after step STOP (or when the run ends first)."""

    def __init__(self, spec: str, folder: Path, device: torch.device, rank: int, world_size: int,
                 keep_memory_history: bool) -> None:
        self.start, self.stop = parse(spec)
        self.folder, self.device = folder, device
        self.suffix = f"_rank{rank}" if world_size > 1 else ""
        self.keep_memory_history = keep_memory_history  # --memory-snapshot records for the whole run
        self.profiler: torch.profiler.profile | None = None
        self.written: list[Path] = []

    def before_step(self, step: int) -> None:
        """Called with the number of the step about to run."""
        if self.profiler is not None or self.written or not self.start <= step <= self.stop:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            if not self.keep_memory_history:
                torch.cuda.memory._record_memory_history(max_entries=100_000)
        self.profiler = torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True)
        self.profiler.start()

    def after_step(self, step: int) -> list[Path]:
        """Called with the number of the step just taken; the files written when the window ends here."""
        return self.finish() if self.profiler is not None and step >= self.stop else []

    def finish(self) -> list[Path]:
        """Stop and write the trace (and the CUDA memory snapshot); the files written (none when the
        profiler was not running)."""
        if self.profiler is None:
            return []
        profiler, self.profiler = self.profiler, None
        profiler.stop()
        self.folder.mkdir(parents=True, exist_ok=True)
        trace = self.folder / f"trace{self.suffix}.json"
        profiler.export_chrome_trace(str(trace))
        self.written.append(trace)
        if self.device.type == "cuda":
            snapshot = self.folder / f"memory_snapshot{self.suffix}.pickle"
            torch.cuda.memory._dump_snapshot(str(snapshot))
            if not self.keep_memory_history:
                torch.cuda.memory._record_memory_history(enabled=None)
            self.written.append(snapshot)
        return self.written
