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
TIME_PARTS = "|".join(tags.TIME_PARTS)  # add up to time/step_ms
# train/ scalars that are not a task's metric: the "task metrics" pane below gathers every other
# train/<name> and val/<name>, so that a --task's own metrics show train beside validation
NOT_METRICS = "|".join(tag.split("/", 1)[1] for tag in (
    tags.LOSS, tags.LR, tags.SAMPLES_PER_S, tags.SKIPPED, tags.AMP_SKIPPED, tags.AMP_SCALE, tags.GRAD_NORM,
    tags.CLIP_NORM, tags.CLIPPED_SHARE))

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
        Pane("loss", (r"train/loss", r"val/loss", r"train/loss_(max|min)")),  # train and validation together
        Pane("gradient norm, every step", (r"norms/grad_(global|global_max|global_min|layer_max)",)),  # beside the loss
        Pane("learning rate", (r"train/lr",)),
        Pane("gradient norm (all layers)", (r"train/grad_norm", r"train/clip_norm")),
        Pane("clipped steps", (r"train/clipped_share",), "share of steps"),
        Pane("AMP loss scale", (r"train/amp_scale",)),
        Pane("skipped samples (unreadable)", (r"train/skipped",), "samples"),
        Pane("step of the window's largest loss", (r"train/loss_max_step",), "step"),
    )),
    Group("metric", "metric", (
        Pane("metric", (r"(train|val)/(accuracy|psnr)", r"train/psnr_input")),  # denoise: beside the noisy input
        Pane("task metrics", (rf"(train|val)/(?!({NOT_METRICS})$)\w+",)),
    )),
    Group("time", "time", (
        Pane("throughput", (r"train/samples_per_s",), "samples/s"),
        Pane("evaluation and compile time", (r"time/(eval|compile)_s",), "s"),  # not in the step's time
        Pane("step time breakdown", (rf"time/({TIME_PARTS})_ms",), "ms", "stacked"),
        Pane("step time", (r"time/step_ms",), "ms"),  # data wait is a part of the breakdown above
        Pane("step time per rank", (r"time/step_ms/rank\d+",), "ms"),
        Pane("data wait per rank", (r"time/data_wait_ms/rank\d+",), "ms"),
        Pane("step parts per rank", (rf"time/({TIME_PARTS})_ms/rank\d+",), "ms"),
        Pane("slowest rank", (r"time/slowest_rank",), "rank"),
        Pane("step time skew across ranks", (r"time/skew",), "(max-min)/max"),
    )),
    Group("memory", "memory", (
        Pane("process RSS", (r"memory/rss" + RANKS,), "bytes"),
        Pane("DataLoader workers RSS", (r"memory/workers_rss" + RANKS,), "bytes"),
        Pane("CUDA memory", (r"memory/(allocated|reserved|active|peak)" + RANKS,), "bytes"),
        Pane("memory estimate", (r"memory/estimate_\w+",), "bytes", "bars"),  # beside what is measured
        Pane("CUDA allocator retries and OOMs", (r"memory/(alloc_retries|ooms)" + RANKS,), "count"),
        Pane("host memory available", (r"memory/host_available" + RANKS,), "bytes"),
        Pane("memory across ranks (min/max)", (r"memory/ranks_\w+_(min|max)",), "bytes"),
        Pane("memory skew across ranks", (r"memory/ranks_\w+_skew",), "(max-min)/max"),
    )),
    Group("system", "system", (
        Pane("CPU", (r"system/cpu_percent" + RANKS,), "%"),
        Pane("DataLoader workers", (r"system/workers" + RANKS,), "processes"),
        Pane("GPU utilisation", (r"system/gpu_util" + RANKS,), "%"),
        Pane("GPU power", (r"system/gpu_power_w" + RANKS,), "W"),
        Pane("GPU temperature", (r"system/gpu_temp_c" + RANKS,), "°C"),
        Pane("telemetry dropped and backlog", (r"telemetry/(dropped|backlog)", r"telemetry/dropped/\w+/\w+"), "events"),
        Pane("telemetry sink unreachable", (r"telemetry/unreachable_s",), "s"),
    )),
    Group("images", "images", (
        Pane("images", (r"images/.+",), chart="image"),
    )),
    Group("histograms", "histograms", (
        Pane("weights", (r"weights/.+",), chart="histogram"),
        Pane("gradients", (r"grads/.+",), chart="histogram"),
        Pane("weight norms per layer", (r"norms/weights/.+",)),
        Pane("gradient norms per layer", (r"norms/grads/.+",)),
    )),
    Group("graph", "graph", (
        Pane("model graph", (r"model",), chart="graph"),
    )),
    Group("text", "text", (
        Pane("findings", (r"findings",), chart="text"),
        Pane("run", (r"status|config|hparams",), chart="text"),
        Pane("largest gradient", (r"norms/grad_layer_max_name",), chart="text"),
        Pane("memory estimate table", (r"memory_estimate",), chart="text"),
        Pane("automatic batch size", (r"auto_batch",), chart="text"),
        Pane("out of memory", (r"memory_oom",), chart="text"),
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
