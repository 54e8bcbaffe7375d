"""The one table of dashboard groups and panes that every sink derives its layout from.

TensorBoard's custom-scalars page (`dashboards.tensorboard.custom_scalars`), the order and grouping of
Visdom's panes and the console all read `GROUPS`, so a tag shown together in one is shown together in
all. Groups come in reading order: what the run is for first (loss, metric), then why it is fast or
slow (time), then its resources (memory, system), then the pictures and text.

Tags are matched whole (`re.fullmatch`) against the event's tag; for `MemorySample` events the tags are
those of `MemorySample.series()` (`memory/<key>`, `system/<key>`, `/rank<r>` under DDP). No torch and
no sink imports here: `runner report` may read it too.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Literal

from runner.telemetry import tags

RANKS = r"(/rank\d+)?"  # under DDP the writer rank shows every rank's series with this suffix
# train/ scalars that are not a task's metric: the "task metrics" pane below gathers every other
# train/<name> and val/<name>, so that a --task's own metrics show train beside validation
NOT_METRICS = "|".join(re.escape(tag.removeprefix(tags.TRAIN)) for tag in (
    tags.LOSS, tags.LR, tags.SAMPLES_PER_S, tags.SKIPPED, tags.AMP_SKIPPED, tags.AMP_SCALE, tags.GRAD_NORM,
    tags.CLIP_NORM, tags.CLIPPED_SHARE))


def exact(*names: str) -> tuple[str, ...]:
    """Patterns for these tags, as written."""
    return tuple(re.escape(name) for name in names)


def per_rank(*names: str) -> tuple[str, ...]:
    """These tags, and under DDP each rank's own (`<tag>/rank<r>`)."""
    return tuple(re.escape(name) + RANKS for name in names)


def ranks_of(*names: str) -> tuple[str, ...]:
    """Only the per-rank copies of these tags (`<tag>/rank<r>`)."""
    return tuple(re.escape(name) + r"/rank\d+" for name in names)


def under(prefix: str, rest: str = ".+") -> str:
    """The tags of a group (`prefix`, a tags.* prefix) whose remainder matches the regex `rest`."""
    return re.escape(prefix) + rest


Chart = Literal["line", "stacked", "bars", "image", "histogram", "graph", "text"]
SCALAR_CHARTS = ("line", "stacked", "bars")  # charts of Scalar / MemorySample series


@dataclass(frozen=True, slots=True)
class Pane:
    """One chart: its title, the tags it gathers (regexes matched whole), their unit and its chart.

    `chart`: "line" (one line per tag), "stacked" (lines stacked: parts of a whole, Visdom's
    `stackgroup`), "bars" (the latest value of each tag: Visdom draws a bar chart, TensorBoard a
    multiline chart as for any scalar), or the non-scalar kinds image, histogram, graph, text.
    """

    title: str
    tags: tuple[str, ...]
    unit: str = ""
    chart: Chart = "line"

    @property
    def stacked(self) -> bool:
        return self.chart == "stacked"

    @property
    def scalar(self) -> bool:
        return self.chart in SCALAR_CHARTS

    def matches(self, tag: str) -> bool:
        return any(re.fullmatch(pattern, tag) for pattern in self.tags)


@dataclass(frozen=True, slots=True)
class Group:
    name: str  # loss, metric, time, memory, system, images, histograms, graph, text
    title: str  # shown as TensorBoard's custom-scalars category
    panes: tuple[Pane, ...]


GROUPS: tuple[Group, ...] = (
    Group("loss", "loss and optimiser", (
        Pane("loss", exact(tags.LOSS, tags.val("loss"), tags.LOSS_MAX, tags.LOSS_MIN)),  # train and validation
        Pane("gradient norm, every step",  # beside the loss
             exact(tags.GRAD_GLOBAL, tags.GRAD_GLOBAL_MAX, tags.GRAD_GLOBAL_MIN, tags.GRAD_LAYER_MAX)),
        Pane("learning rate", exact(tags.LR)),
        Pane("gradient norm (all layers)", exact(tags.GRAD_NORM, tags.CLIP_NORM)),
        Pane("clipped steps", exact(tags.CLIPPED_SHARE), "share of steps"),
        Pane("AMP loss scale", exact(tags.AMP_SCALE)),
        Pane("skipped samples (unreadable)", exact(tags.SKIPPED), "samples"),
        Pane("step of the window's largest loss", exact(tags.LOSS_MAX_STEP), "step"),
    )),
    Group("metric", "metric", (
        Pane("metric", exact(*(group(name) for group in (tags.train, tags.val) for name in ("accuracy", "psnr")),
                             tags.INPUT_PSNR)),  # denoise: beside the noisy input
        Pane("task metrics", tuple(under(group, rf"(?!({NOT_METRICS})$)\w+") for group in (tags.TRAIN, tags.VAL))),
    )),
    Group("time", "time", (
        Pane("throughput", exact(tags.SAMPLES_PER_S), "samples/s"),
        Pane("evaluation and compile time", exact(tags.EVAL_S, tags.COMPILE_S), "s"),  # not in the step's time
        Pane("step time breakdown", exact(*map(tags.time_ms, tags.TIME_PARTS)), "ms", "stacked"),
        Pane("step time", exact(tags.STEP_MS), "ms"),  # data wait is a part of the breakdown above
        Pane("step time per rank", ranks_of(tags.STEP_MS), "ms"),
        Pane("data wait per rank", ranks_of(tags.DATA_WAIT_MS), "ms"),
        Pane("step parts per rank", ranks_of(*map(tags.time_ms, tags.TIME_PARTS)), "ms"),
        Pane("slowest rank", exact(tags.SLOWEST_RANK), "rank"),
        Pane("step time skew across ranks", exact(tags.TIME_SKEW), "(max-min)/max"),
    )),
    Group("memory", "memory", (
        Pane("process RSS", per_rank(tags.reading("rss")), "bytes"),
        Pane("DataLoader workers RSS", per_rank(tags.reading("workers_rss")), "bytes"),
        Pane("CUDA memory", per_rank(*map(tags.reading, ("allocated", "reserved", "active", "peak"))), "bytes"),
        Pane("memory estimate", (under(tags.ESTIMATE, r"\w+"),), "bytes", "bars"),  # beside what is measured
        Pane("CUDA allocator retries and OOMs", per_rank(tags.reading("alloc_retries"), tags.reading("ooms")),
             "count"),
        Pane("host memory available", per_rank(tags.reading("host_available")), "bytes"),
        Pane("memory across ranks (min/max)", (under(tags.MEMORY, r"ranks_\w+_(min|max)"),), "bytes"),
        Pane("memory skew across ranks", (under(tags.MEMORY, r"ranks_\w+_skew"),), "(max-min)/max"),
    )),
    Group("system", "system", (
        Pane("CPU", per_rank(tags.reading("cpu_percent")), "%"),
        Pane("DataLoader workers", per_rank(tags.reading("workers")), "processes"),
        Pane("GPU utilisation", per_rank(tags.reading("gpu_util")), "%"),
        Pane("GPU power", per_rank(tags.reading("gpu_power_w")), "W"),
        Pane("GPU temperature", per_rank(tags.reading("gpu_temp_c")), "°C"),
        Pane("telemetry dropped and backlog", (*exact(tags.DROPPED, tags.BACKLOG), under(tags.DROPPED_BY, r"\w+/\w+")),
             "events"),
        Pane("telemetry sink unreachable", exact(tags.UNREACHABLE_S), "s"),
    )),
    Group("images", "images", (
        Pane("images", (under(tags.IMAGES),), chart="image"),
    )),
    Group("histograms", "histograms", (
        Pane("weights", (under(tags.WEIGHTS),), chart="histogram"),
        Pane("gradients", (under(tags.GRADS),), chart="histogram"),
        Pane("weight norms per layer", (under(tags.NORMS_WEIGHTS),)),
        Pane("gradient norms per layer", (under(tags.NORMS_GRADS),)),
    )),
    Group("graph", "graph", (
        Pane("model graph", exact(tags.MODEL), chart="graph"),
    )),
    Group("text", "text", (
        Pane("findings", exact(tags.FINDINGS), chart="text"),
        Pane("run", exact(tags.STATUS, tags.CONFIG, tags.HPARAMS), chart="text"),
        Pane("largest gradient", exact(tags.GRAD_LAYER_MAX_NAME), chart="text"),
        Pane("memory estimate table", exact(tags.MEMORY_ESTIMATE), chart="text"),
        Pane("automatic batch size", exact(tags.AUTO_BATCH), chart="text"),
        Pane("out of memory", exact(tags.MEMORY_OOM), chart="text"),
    )),
)
OTHER = Group("other", "other", ())  # tags no pane gathers: each gets its own pane, after every group


@dataclass(frozen=True, slots=True)
class Place:
    """Where a tag is shown: its group and pane, and a sort key that puts panes in table order."""

    group: Group
    pane: Pane | None  # None: a tag no pane gathers (shown alone, in OTHER)
    order: tuple[int, int]


@functools.lru_cache(maxsize=4096)
def place(tag: str) -> Place:
    """The group and pane that show `tag` (cached: sinks call this for every scalar)."""
    for g, group in enumerate(GROUPS):
        for p, pane in enumerate(group.panes):
            if pane.matches(tag):
                return Place(group, pane, (g, p))
    return Place(OTHER, None, (len(GROUPS), 0))


def scalar_panes() -> list[tuple[Group, Pane]]:
    """Every scalar pane in table order (what a custom-scalars page or a pane order is built from)."""
    return [(group, pane) for group in GROUPS for pane in group.panes if pane.scalar]
