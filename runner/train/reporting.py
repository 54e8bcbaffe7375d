"""What the trainer tells the hub: per-step observations, the log point's scalars, start and end.

Per step, only device work and non-blocking copies: memory samples are host readings; image grids
and histograms are computed on the device and their events made at the next log point, once the
log point's sync has landed their copies (a caption needs the labels, and gradients that turned out
non-finite are not plotted). Under DDP the log point gathers every rank's memory samples and time
breakdown on rank 0 in one gather.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from runner import config as config_io
from runner.config import TrainConfig
from runner.memory.live import LiveEstimate
from runner.probes.memory import MemoryProbe
from runner.probes.model_graph import trace_graph
from runner.probes.tensor_stats import grid_event, parameter_stats, without_nonfinite_gradients
from runner.tasks import Task
from runner.telemetry import tags
from runner.telemetry.events import (
    Event,
    Graph,
    Histogram,
    HParams,
    ImageGrid,
    LogPoint,
    MemorySample,
    Scalar,
    Text,
)
from runner.telemetry.hub import Hub
from runner.train.evaluate import Evaluation
from runner.train.health_window import Health
from runner.train.log_window import Totals
from runner.train.strategy import Strategy

HPARAMS = ("model", "data", "optimizer", "lr", "batch_size", "image_size", "amp", "strategy", "seed")
log = logging.getLogger("runner")

UNREADABLE_NAMED = 5  # files named per rank and run: enough to see the pattern, not a flood for a broken folder


class Reporter:
    """Builds and emits the events of a run; rank > 0 only takes part in the log point's gather."""

    def __init__(self, cfg: TrainConfig, strategy: Strategy, task: Task,
                 probe: MemoryProbe) -> None:
        self.cfg, self.strategy, self.task, self.probe = cfg, strategy, task, probe
        self.rank, self.world = strategy.rank, strategy.world_size
        self.hub = Hub([])
        self.pending: list[Callable[[], list[Event]]] = []  # made at the next log point
        self.memory_window: list[tuple[int, dict[str, float]]] = []
        self.last_scalars: dict[str, float] = {}
        self.grad_layer = ""  # the parameter with the largest gradient norm, as last sent
        self.graph: Graph | None = None
        self.unreadable_named = 0

    def note(self, tag: str, step: int, text: str) -> None:
        """One text event (status, profile, memory_oom...), when there are sinks."""
        if self.hub.active:
            self.hub.emit(Text(tag=tag, step=step, rank=self.rank, text=text))

    def unreadable(self, step: int, names: tuple[str, ...]) -> None:
        """Name the first few unreadable files: on the console, and for the unreadable-samples finding."""
        new = names[:max(0, UNREADABLE_NAMED - self.unreadable_named)]
        if not new:
            return
        self.unreadable_named += len(new)
        log.warning("unreadable, skipped: %s", "; ".join(new))
        if self.hub.active:
            self.hub.emit(Text(tag=tags.UNREADABLE, step=step, rank=self.rank, text="\n".join(new)))

    # --- every step ------------------------------------------------------------------------

    def observe(self, step: int, model: nn.Module, inputs: Any, output: Any, targets: Any,
                with_histograms: bool = True) -> None:
        """The step's memory sample, image grid and histograms (an own loop, whose gradients are gone by
        then, passes `with_histograms=False` and calls `parameter_histograms` after its update)."""
        cfg, hub = self.cfg, self.hub
        if step % cfg.memory_every == 0 and (self.world > 1 or hub.wants(MemorySample)):
            sample = self.probe.sample()
            if hub.active:
                hub.emit(MemorySample(tag=tags.MEMORY_SAMPLE, step=step, rank=self.rank, values=sample,
                                      world_size=self.world))
            if self.world > 1:
                self.memory_window.append((step, sample))
        if (step % cfg.images_every == 0 or step == 1) and hub.wants(ImageGrid) and hasattr(self.task, "grid") \
                and inputs is not None:  # an own loop may give no batch (runner.observe)
            make = grid_event(self.task.grid(inputs, output, targets), step, self.rank)
            self.pending.append(lambda: [make()])
        if with_histograms:
            self.parameter_histograms(step, model)

    def parameter_histograms(self, step: int, model: nn.Module) -> None:
        """Weights and gradients at their cadence: after the update, while the gradients are still there."""
        if (step % self.cfg.hist_every == 0 or step == 1) and self.hub.wants(Histogram):
            events = parameter_stats(model, step, self.rank)
            self.pending.append(lambda: without_nonfinite_gradients(events))

    # --- log points ------------------------------------------------------------------------

    def log_point(self, step: int, steps: int, totals: Totals, times: dict[str, float], lr: float,
                  amp_skipped: int, amp_scale: float | None, health: Health | None = None) -> None:
        """Emit the window's scalars (after the window's reduction, whose sync landed every copy);
        `health`: the window's loss extremes and gradient norms (step_health), and the largest layer."""
        everyone = self._gather(step, times)
        mean = {key: sum(t[key] for t in everyone) / len(everyone) for key in times}
        samples = max(totals.samples, 1.0)
        values = {
            tags.LOSS: totals.loss / samples,
            **{tags.train(name): value / samples for name, value in totals.metrics.items()},
            tags.LR: lr,
            tags.SAMPLES_PER_S: samples / max(mean["step"] * steps / 1000, 1e-9),
            tags.SKIPPED: totals.skipped,
            tags.AMP_SKIPPED: float(amp_skipped),
        }
        if amp_scale is not None:
            values[tags.AMP_SCALE] = amp_scale
        if totals.clip_steps:
            values[tags.CLIP_NORM] = totals.grad_norm / totals.clip_steps
            values[tags.CLIPPED_SHARE] = totals.clipped / totals.clip_steps
        values.update({tags.time_ms(part): mean[part] for part in (*tags.TIME_PARTS, "step")})
        if health is not None:
            values.update(health.scalars)
        if self.world > 1:
            values.update(self._per_rank(everyone))
        values.update(self.hub.health())
        self.last_scalars = values
        if not self.hub.active:
            self.pending.clear()
            return
        for tag, value in values.items():
            self.hub.emit(Scalar(tag=tag, step=step, rank=self.rank, value=value))
        if health is not None and health.layer and health.layer != self.grad_layer:  # the name only when it changes
            self.grad_layer = health.layer
            self.hub.emit(Text(tag=tags.GRAD_LAYER_MAX_NAME, step=step, rank=self.rank, text=health.layer))
        pending, self.pending = self.pending, []
        for make in pending:
            for event in make():
                self.hub.emit(event)
        self.hub.emit(LogPoint(step=step, rank=self.rank))

    def _gather(self, step: int, times: dict[str, float]) -> list[dict[str, float]]:
        """DDP: every rank's memory samples since the last log point and time breakdown, on rank 0
        (one gather); the memory samples of the other ranks are emitted here."""
        if self.world == 1:
            return [times]
        gathered = self.strategy.gather((self.memory_window, times))
        self.memory_window = []
        if not self.hub.active:
            return [times]
        for rank, (samples, _) in enumerate(gathered):
            if rank == self.rank:
                continue  # rank 0 emitted its own live
            for step, values in samples:
                self.hub.emit(MemorySample(tag=tags.MEMORY_SAMPLE, step=step, rank=rank, values=values,
                                           world_size=len(gathered)))
        key = "allocated" if self.strategy.device.type == "cuda" else "rss"
        latest = [samples[-1][1][key] for samples, _ in gathered if samples]
        if latest:
            lo, hi = min(latest), max(latest)
            for stat, value in (("min", lo), ("max", hi), ("skew", (hi - lo) / max(hi, 1.0))):
                self.hub.emit(Scalar(tag=tags.ranks_memory(key, stat), step=step, rank=self.rank, value=value))
        return [t for _, t in gathered]

    @staticmethod
    def _per_rank(everyone: list[dict[str, float]]) -> dict[str, float]:
        """`time/<part>_ms/rank<r>`, the slowest rank and the skew of the step time over ranks."""
        values = {tags.time_ms(part, rank): t[part] for rank, t in enumerate(everyone)
                  for part in (*tags.TIME_PARTS, "step")}
        steps = [t["step"] for t in everyone]
        slowest = max(range(len(steps)), key=steps.__getitem__)
        values[tags.SLOWEST_RANK] = float(slowest)
        values[tags.TIME_SKEW] = (steps[slowest] - min(steps)) / max(steps[slowest], 1e-9)
        return values

    # --- evaluation and compilation ---------------------------------------------------------

    def wants_grid(self) -> bool:
        """Whether an evaluation should keep its first batch's image grid (the writer, with sinks)."""
        return self.strategy.is_writer and self.hub.wants(ImageGrid)

    def evaluation(self, result: Evaluation) -> None:
        """An evaluation's `val/*` values, its wall time and grid (after its sync: the copies landed)."""
        self.last_scalars.update(result.values)
        if not self.hub.active:
            return
        for tag, value in {**result.values, tags.EVAL_S: result.seconds}.items():
            self.hub.emit(Scalar(tag=tag, step=result.step, rank=self.rank, value=value))
        if result.grid is not None:
            self.hub.emit(result.grid())

    def compiled(self, step: int, seconds: float) -> None:
        """--compile: the compile time, apart from every step's."""
        log.info("torch.compile: %.1f s", seconds)
        if self.hub.active:
            self.hub.emit(Scalar(tag=tags.COMPILE_S, step=step, rank=self.rank, value=seconds))

    # --- start and end ---------------------------------------------------------------------

    def prepare(self, model: nn.Module, input_shape: tuple[int, ...]) -> None:
        """Set-up for the dashboards before the first step, so that step 1 pays none of it: the
        image-grid import and the model graph (the writer only)."""
        if self.cfg.viz == "none" or not self.strategy.is_writer:
            return
        import torchvision.utils  # noqa: F401 - image grids (~0.5 s to import)

        if self.cfg.graph:  # tracing takes ~0.2 s even for Tiny-UNet
            device = self.strategy.device
            own_rng = torch.Generator(device).manual_seed(0)  # the run's random stream stays as it was
            example = torch.rand(2, *input_shape, device=device, generator=own_rng)
            self.graph = trace_graph(model, example, rank=self.rank)

    def start(self, step: int, text: str, resumed_from: Any, batch_search: Any, model: nn.Module,
              input_shape: tuple[int, ...], batch_size: int) -> LiveEstimate:
        """The start's events (config, status, HParams opening the session, graph); returns the memory
        estimate that measures the first step's activations, then emits its events."""
        emit = self.hub.emit
        emit(Text(tag=tags.CONFIG, step=step, rank=self.rank, text=config_io.dumps(self.cfg)))
        if resumed_from is not None:
            emit(Text(tag=tags.STATUS, step=step, rank=self.rank, text=f"resumed from {resumed_from} at step {step}"))
        emit(Text(tag=tags.STATUS, step=step, rank=self.rank, text=text))
        if batch_search is not None:
            emit(Text(tag=tags.AUTO_BATCH, step=step, rank=self.rank, text=batch_search.text()))
        names = self._hparam_metrics()
        emit(self.hparams(step, batch_size, dict.fromkeys(names, math.nan), status=""))
        if self.graph is not None and step == 0 and self.hub.wants(Graph):
            emit(self.graph)
        return LiveEstimate(self.cfg, model, input_shape, batch_size, self.strategy.device.type, emit, step, self.rank)

    def end(self, step: int, batch_size: int, text: str, status: str) -> None:
        """The final status line and the HParams with the end status (finished | stopped | failed)."""
        if not self.hub.active:
            return
        self.hub.emit(Text(tag=tags.STATUS, step=step, rank=self.rank, text=text))
        names = self._hparam_metrics()
        metrics = {k: self.last_scalars.get(k, math.nan) for k in names}
        self.hub.emit(self.hparams(step, batch_size, metrics, status))

    def _hparam_metrics(self) -> tuple[str, ...]:
        """The HParams table's metric columns: the loss and the metrics a task declares (`metric_names`)."""
        return (tags.LOSS, *(tags.train(name) for name in getattr(self.task, "metric_names", ())))

    def hparams(self, step: int, batch_size: int, metrics: dict[str, float], status: str) -> HParams:
        hparams = {k: v for k, v in self.cfg.to_dict().items() if k in HPARAMS}
        hparams["batch_size"] = batch_size
        return HParams(tag=tags.HPARAMS, step=step, rank=self.rank, hparams=hparams, metrics=metrics, status=status)
