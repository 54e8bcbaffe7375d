"""The sums of one log window: kept on the device between log points, reduced across ranks at one.

Reading them is the log point's one host↔device sync: the device sums, the task's metric sums and
the few host numbers travel in one tensor through one all-reduce and one `.tolist()`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from runner.train.strategy import Strategy

DEVICE_FIELDS = ("loss", "samples", "nonfinite", "amp_skipped", "grad_norm", "clipped", "clip_steps")


@dataclass(frozen=True)
class Totals:
    """A window summed over every rank."""

    loss: float  # loss × samples
    samples: float
    nonfinite: float  # steps whose loss was NaN/inf
    amp_skipped: float  # optimizer updates GradScaler skipped (the same on every rank under DDP)
    grad_norm: float  # --clip-grad-norm: pre-clip global gradient norms, summed over the clipping steps
    clipped: float  # of those steps, the ones whose norm was above the limit
    clip_steps: float  # steps that measured a norm (0 without --clip-grad-norm)
    amp_scale: float  # GradScaler's scale now (0 without one)
    skipped: float  # unreadable samples since the start of the run
    stops: float  # ranks that have seen a stop request
    metrics: dict[str, float] = field(default_factory=dict)  # the task's metric sums over samples
    extra: list[float] = field(default_factory=list)  # the `extra` vector summed over ranks (health_window)


class LogWindow:
    """Device-side sums since the last log point (no host sync until `reduce`), and the step count."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(len(DEVICE_FIELDS), device=device)
        self.metrics: dict[str, torch.Tensor] = {}  # the task's names, known from the first step on
        self.steps = 0

    def add(self, loss_sum: torch.Tensor, metrics: dict[str, torch.Tensor], samples: int, finite: torch.Tensor,
            amp_skipped: torch.Tensor | None, clip: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """One optimizer step's contribution: the loss summed over its samples, the task's metric sums
        (zeros and 0 samples for a DDP stand-in step, which must not count), and with clipping the
        pre-clip gradient norm and whether it was clipped (device scalars)."""
        loss, count, nonfinite, skipped_updates, norm, clipped, clip_steps = self.sums.unbind()
        if samples:
            loss.add_(loss_sum.detach().float())
            count.add_(samples)
        for name, value in metrics.items():
            if name not in self.metrics:
                self.metrics[name] = torch.zeros((), device=self.sums.device)
            self.metrics[name].add_(value.detach().float())
        nonfinite.add_((~finite).float())
        if amp_skipped is not None:
            skipped_updates.add_(amp_skipped.float())
        if clip is not None:
            norm.add_(clip[0].detach().float())
            clipped.add_(clip[1].float())
            clip_steps.add_(1.0)
        self.steps += 1

    def any_nonfinite(self, strategy: Strategy) -> bool:
        """Whether any rank saw a NaN/inf loss in this window (a sync: before a checkpoint only)."""
        return bool(strategy.all_reduce_sum(self.sums[2:3].clone()) > 0)

    def nonfinite_here(self) -> bool:
        """Whether this rank saw a NaN/inf loss in this window (a sync, without the other ranks)."""
        return bool(self.sums[2] > 0)

    def reduce(self, strategy: Strategy, skipped: int, stop_requested: bool,
               amp_scale: torch.Tensor | None, extra: torch.Tensor | None = None) -> Totals:
        """Sum over ranks (the log point's sync), then start a new window. `amp_scale`: GradScaler's
        scale as a device tensor, read in the same sync (averaged over ranks). Every rank has the same
        metric names (a stand-in step adds zeros under the task's names)."""
        device = self.sums.device
        scale = amp_scale.reshape(1).float() if amp_scale is not None else torch.zeros(1, device=device)
        host = torch.tensor([float(skipped), float(stop_requested)], device=device)
        names = sorted(self.metrics)
        metrics = [self.metrics[name].reshape(1) for name in names]
        more = [extra.float()] if extra is not None else []  # summed as it is: its owner lays it out per rank
        values = strategy.all_reduce_sum(torch.cat([self.sums, *metrics, *more, scale, host])).tolist()
        self.sums.zero_()
        for value in self.metrics.values():
            value.zero_()
        self.steps = 0
        world = strategy.world_size
        fields_ = values[:len(DEVICE_FIELDS)]
        metric_sums = values[len(DEVICE_FIELDS):len(DEVICE_FIELDS) + len(names)]
        scale_sum, skipped_sum, stops = values[-3:]
        fields_[3] /= world  # every rank skips the same updates (their gradients are all-reduced)
        for index in (4, 5, 6):  # every rank clips the same all-reduced gradients: one rank's view
            fields_[index] /= world
        start = len(DEVICE_FIELDS) + len(names)
        return Totals(*fields_, amp_scale=scale_sum / world, skipped=skipped_sum, stops=stops,
                      metrics=dict(zip(names, metric_sums, strict=True)),
                      extra=values[start:start + len(more[0])] if more else [])
