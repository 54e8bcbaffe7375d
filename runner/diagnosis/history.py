"""What the rules have seen of a run: recent scalar series, memory at log points, and the run's facts.

Fed from the event stream on the diagnosis sink's thread; bounded, so a long run costs no more
memory than a short one.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from runner.telemetry import tags
from runner.telemetry.events import Event, MemorySample, Scalar, Text

KEEP = 512  # points kept per series: the rules look at recent windows, never at a whole long run
# Tags the rules read; everything else (weights, per-layer weight norms, metrics) passes by.
_WATCHED_GROUPS = (tags.TIME, tags.TELEMETRY, tags.NORMS_GRADS, tags.ESTIMATE, tags.VAL)
_WATCHED_TAGS = (tags.SKIPPED, tags.GRAD_NORM, tags.LOSS, tags.LOSS_MAX, tags.LOSS_MAX_STEP, tags.LOSS_MIN,
                 tags.INPUT_PSNR, tags.GRAD_GLOBAL, tags.GRAD_GLOBAL_MAX, tags.GRAD_GLOBAL_MIN, tags.GRAD_LAYER_MAX,
                 tags.train("accuracy"), tags.train("psnr"))
WATCHED = re.compile("^(" + "|".join(map(re.escape, _WATCHED_GROUPS)) + "|"
                     + "|".join(map(re.escape, _WATCHED_TAGS)) + "$)")
START_TEXT = re.compile(r" on (?P<device>\S+), (?P<strategy>\w+) x(?P<world>\d+), batch (?P<batch>\d+), "
                        r"steps (?P<first>\d+)→(?P<total>\d+)(, (?P<classes>\d+) classes)?")


@dataclass
class Facts:
    """The run as configured and started: what the advice talks about."""

    config: dict[str, Any] = field(default_factory=dict)
    device: str = ""
    world: int = 1
    batch: int = 0
    total_steps: int = 0
    cuda: bool = False
    classes: int = 0  # classify: the number of classes (the start text's, else the config's)

    @property
    def workers(self) -> int:
        return int(self.config.get("workers", 0))

    @property
    def log_every(self) -> int:
        return max(1, int(self.config.get("log_every", 10)))

    @staticmethod
    def cores() -> int:
        """CPU cores this process may run on (its affinity), not the machine's count."""
        return len(os.sched_getaffinity(0))


class History:
    """Series of the watched scalars, rank 0's memory at each log point, and the log points themselves."""

    def __init__(self) -> None:
        self.facts = Facts()
        self.scalars: dict[str, deque[tuple[int, float]]] = {}
        self.latest_memory: dict[int, dict[str, float]] = {}  # rank → its latest sample
        self.log_points: deque[int] = deque(maxlen=KEEP)
        self.steady: deque[int] = deque(maxlen=KEEP)  # the log points after warm-up
        # rank 0's latest sample at each log point after warm-up; the first one stays (the baseline)
        self.memory: deque[tuple[int, dict[str, float]]] = deque(maxlen=KEEP)
        self.memory_baseline: tuple[int, dict[str, float]] | None = None
        self.unreadable: list[str] = []  # file names the trainer reported as unreadable (first few)
        self.grad_layers: deque[tuple[int, str]] = deque(maxlen=KEEP)  # (step, the largest gradient's parameter)

    def add(self, event: Event) -> None:
        if isinstance(event, Scalar):
            if WATCHED.match(event.tag):
                series = self.scalars.setdefault(event.tag, deque(maxlen=KEEP))
                series.append((event.step, float(event.value)))
        elif isinstance(event, MemorySample):
            self.latest_memory[event.rank] = event.values
            if "allocated" in event.values:
                self.facts.cuda = True
        elif isinstance(event, Text):
            self._text(event)

    def _text(self, event: Text) -> None:
        if event.tag == tags.CONFIG:
            try:
                parsed = tomllib.loads(event.text)
            except tomllib.TOMLDecodeError:
                return
            self.facts.config = parsed.get("train", parsed)
            batch = self.facts.config.get("batch_size")
            self.facts.batch = batch if isinstance(batch, int) else self.facts.batch
            classes = self.facts.config.get("num_classes")
            self.facts.classes = self.facts.classes or (classes if isinstance(classes, int) else 0)
        elif event.tag == tags.STATUS and (found := START_TEXT.search(event.text)):
            self.facts.device, self.facts.world = found["device"], int(found["world"])
            self.facts.batch, self.facts.total_steps = int(found["batch"]), int(found["total"])
            self.facts.cuda = found["device"].startswith("cuda")
            self.facts.classes = int(found["classes"]) if found["classes"] else self.facts.classes
        elif event.tag == tags.GRAD_LAYER_MAX_NAME:
            self.grad_layers.append((event.step, event.text))
        elif event.tag == tags.UNREADABLE:
            self.unreadable.extend(line for line in event.text.splitlines() if line.strip())
            del self.unreadable[20:]

    def mark_log_point(self, step: int, steady: bool) -> None:
        """A log point ended at `step`; after warm-up (`steady`), rank 0's latest memory sample is its reading."""
        self.log_points.append(step)
        if steady:
            self.steady.append(step)
            if 0 in self.latest_memory:
                self.memory.append((step, self.latest_memory[0]))
                self.memory_baseline = self.memory_baseline or self.memory[0]

    def grad_layer(self, step: int) -> str:
        """The parameter with the largest gradient norm in the window of `step` (sent when it changes)."""
        return next((name for at, name in reversed(self.grad_layers) if at <= step), "")

    def series(self, tag: str) -> list[tuple[int, float]]:
        return list(self.scalars.get(tag, ()))

    def values(self, tag: str, steps: list[int]) -> list[float] | None:
        """The values of `tag` logged at each of `steps`; None when one of them is missing."""
        found = [self.value(tag, step) for step in steps]
        return [v for v in found if v is not None] if None not in found else None

    def value(self, tag: str, step: int) -> float | None:
        """The value of `tag` logged at `step`, if any."""
        for at, value in reversed(self.scalars.get(tag, ())):
            if at == step:
                return value
            if at < step:
                return None
        return None

    def latest(self, prefix: str) -> dict[str, float]:
        """The latest value of every watched tag that starts with `prefix`."""
        return {tag: series[-1][1] for tag, series in self.scalars.items() if tag.startswith(prefix) and series}

    def ranked(self, part: str, step: int) -> dict[int, float]:
        """`time/<part>_ms/rank<r>` at `step`, by rank (empty when the run is not distributed)."""
        out = {}
        prefix = tags.time_ms(part) + "/rank"
        for tag in self.scalars:
            if tag.startswith(prefix):
                value = self.value(tag, step)
                if value is not None and math.isfinite(value):
                    out[int(tag.rsplit("rank", 1)[1])] = value
        return out
