"""Validation: the held-out data, its evaluation, and the best value of the --monitor tag.

An evaluation runs the user's module (not the DDP wrapper: no collective inside a forward, so ranks
with different batch counts cannot deadlock) in `eval()` mode under `torch.inference_mode()` and the
run's autocast. Under DDP each rank takes every world-th sample (`indices[rank::world]`: no padding
duplicates, unlike DistributedSampler), and the sums (loss × samples, the task's metric sums, the
sample count) are all-reduced once, so the values are exact over the validation set. That one
reduction is the evaluation's only host↔device sync.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from runner.config import TrainConfig
from runner.data import Batch, SkipUnreadable, build_dataset, collate_readable
from runner.data_split import hold_out
from runner.errors import RunnerError, usage_error
from runner.probes.tensor_stats import grid_event
from runner.tasks import Task
from runner.telemetry import tags
from runner.telemetry.events import ImageGrid
from runner.train.strategy import Strategy


def split_data(cfg: TrainConfig, dataset: Dataset) -> tuple[Dataset, Dataset | None]:
    """(training data, validation data or None) from --val-split or --val-data."""
    if cfg.val_split:
        return hold_out(dataset, cfg.val_split, cfg.seed)
    if not cfg.val_data:
        return dataset, None
    if cfg.val_data.split(":", 1)[0] == "synthetic":
        raise usage_error("--val-data synthetic would draw the training samples again: use --val-split FRACTION")
    return dataset, build_dataset(replace(cfg, data=cfg.val_data), cfg.resolved_task, train=False)


@dataclass(frozen=True)
class Evaluation:
    """One evaluation over the whole validation set: `val/*` values, samples, wall time."""

    step: int
    values: dict[str, float]
    samples: int
    seconds: float
    grid: Callable[[], ImageGrid] | None = None  # the first batch's grid (the writer rank's), made after the sync


class Evaluator:
    """Evaluates a model on this rank's shard of the validation set and reduces over the ranks."""

    def __init__(self, dataset: Dataset, batch_size: int, strategy: Strategy, task: Task,
                 autocast: Callable[[], contextlib.AbstractContextManager], channels_last: bool = False) -> None:
        size = len(dataset)  # type: ignore[arg-type]
        if size < strategy.world_size:
            raise usage_error(f"the validation set has {size} sample(s), fewer than the {strategy.world_size} ranks")
        self.strategy, self.task, self.autocast, self.device = strategy, task, autocast, strategy.device
        self.channels_last = channels_last
        shard = list(range(strategy.rank, size, strategy.world_size))
        # in this process (no workers): an evaluation is short and rare, and leaves nothing running
        self.loader = DataLoader(SkipUnreadable(dataset), batch_size=batch_size, sampler=shard,
                                 collate_fn=collate_readable, pin_memory=self.device.type == "cuda")

    def run(self, model: torch.nn.Module, step: int, want_grid: bool) -> Evaluation:
        """Evaluate `model` (put back in training mode after); `want_grid`: keep the first batch's grid."""
        start = time.perf_counter()
        was_training = model.training
        model.eval()
        loss = torch.zeros((), device=self.device)
        metrics: dict[str, torch.Tensor] = {}
        count = 0
        grid = None
        try:
            with torch.inference_mode(), self.autocast():
                for batch in self.loader:
                    if batch.inputs is None:
                        continue
                    inputs, targets, output = self._forward(model, batch)
                    n = inputs.shape[0]
                    loss += self.task.loss(output, targets).float() * n
                    for name, value in self.task.metrics(output, targets).items():
                        metrics[name] = metrics[name] + value.float() if name in metrics else value.float()
                    count += n
                    if want_grid and grid is None and hasattr(self.task, "grid"):
                        grid = grid_event(self.task.grid(inputs, output, targets), step, self.strategy.rank,
                                          tag=tags.VAL_IMAGES)
        finally:
            model.train(was_training)
        names = self.strategy.broadcast(sorted(metrics))  # a rank whose shard was unreadable still takes part
        sums = [loss.reshape(1), torch.tensor([float(count)], device=self.device),
                *(metrics.get(n, torch.zeros((), device=self.device)).reshape(1) for n in names)]
        total_loss, samples, *metric_sums = self.strategy.all_reduce_sum(torch.cat(sums)).tolist()
        if not samples:
            raise RunnerError("every validation sample was unreadable: check the --val-data files")
        values = {tags.val("loss"): total_loss / samples}
        values.update({tags.val(name): value / samples for name, value in zip(names, metric_sums, strict=True)})
        return Evaluation(step, values, int(samples), time.perf_counter() - start, grid)

    def _forward(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, Any, Any]:
        inputs = batch.inputs.to(self.device, non_blocking=True)
        if self.channels_last and inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        targets = batch.targets.to(self.device, non_blocking=True)
        return inputs, targets, model(inputs)


class Best:
    """The --monitor tag's best value so far and its step; `offer` says whether a new value beats it."""

    def __init__(self, monitor: str, mode: str, value: float | None = None, step: int = 0) -> None:
        self.monitor, self.mode, self.value, self.step = monitor, mode, value, step

    def offer(self, values: dict[str, float], step: int) -> bool:
        """Take the monitor's value from `values` (this evaluation's, and the latest training scalars);
        True when it is the best so far (a NaN never is)."""
        if self.monitor not in values:
            known = ", ".join(sorted(t for t in values if t.startswith((tags.VAL, tags.TRAIN))))
            raise RunnerError(f"--monitor {self.monitor}: this run has no such tag; it has {known}", 2)
        value = values[self.monitor]
        if math.isnan(value):
            return False
        better = (self.value is None or (value < self.value if self.mode == "min" else value > self.value))
        if better:
            self.value, self.step = value, step
        return better
