"""The console sink: a progress bar on a terminal, one line per log point otherwise, and each finding once."""

from __future__ import annotations

import sys

from runner.telemetry import tags
from runner.telemetry.events import Event, Finding, LogPoint, Scalar, Sink, Text

_SHOWN = {tags.LOSS: "loss {:.4f}", tags.train("accuracy"): "acc {:.3f}", tags.train("psnr"): "psnr {:.2f} dB",
          tags.val("loss"): "val loss {:.4f}", tags.val("accuracy"): "val acc {:.3f}",
          tags.val("psnr"): "val psnr {:.2f} dB", tags.SAMPLES_PER_S: "{:.0f} samples/s"}


class ConsoleSink(Sink):
    """Shows progress and the latest loss/metric; status texts and findings are printed as they come."""

    accepts = (Scalar, Text, Finding, LogPoint)

    def __init__(self, total_steps: int, run_name: str, live: bool | None = None) -> None:
        self.total, self.name = total_steps, run_name
        self.live = sys.stderr.isatty() if live is None else live
        self.latest: dict[str, float] = {}
        self.step = 0
        self.shown: set[tuple[str, str]] = set()  # findings already printed (kind, message)
        self._progress = None
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeRemainingColumn(), TextColumn("{task.fields[stats]}"), transient=False)
            self._task = self._progress.add_task(run_name, total=total_steps or None, stats="")
            self._progress.start()

    def _stats(self) -> str:
        return "  ".join(fmt.format(self.latest[tag]) for tag, fmt in _SHOWN.items() if tag in self.latest)

    def write(self, event: Event) -> None:
        self.step = max(self.step, event.step)
        if isinstance(event, Scalar) and event.tag in _SHOWN:
            self.latest[event.tag] = float(event.value)
        elif isinstance(event, LogPoint) and not self.live:
            of = f"/{self.total}" if self.total else ""  # an own loop may not know its steps (runner.observe)
            print(f"[{self.name}] step {event.step}{of}  {self._stats()}", file=sys.stderr, flush=True)
        elif isinstance(event, Text) and event.tag == tags.STATUS:
            self._print(f"[{self.name}] {event.text}")
        elif isinstance(event, Finding) and event.tag == tags.STALL_FINDINGS:
            pass  # the stall watch printed it on this terminal itself (it must work while we are stuck)
        elif isinstance(event, Finding) and (event.kind, event.message) not in self.shown:
            self.shown.add((event.kind, event.message))
            self._print(finding_line(self.name, event))
        if self._progress is not None:
            self._progress.update(self._task, completed=self.step, stats=self._stats())

    def _print(self, line: str) -> None:
        if self._progress is not None:
            self._progress.console.print(line)
        else:
            print(line, file=sys.stderr, flush=True)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()


def finding_line(name: str, finding: Finding) -> str:
    """One line: `[run] WARNING input_bound at step 40: message; advice: ...`."""
    advice = f"; advice: {finding.advice}" if finding.advice else ""
    return f"[{name}] {finding.severity.upper()} {finding.kind} at step {finding.step}: {finding.message}{advice}"
