"""The sums of one log window: kept on the device between log points, reduced across ranks at one.

Reading them is the log point's one host↔device sync: the device sums and the few host numbers
travel in one tensor through one all-reduce and one `.tolist()`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from runner.train.strategy import Strategy

DEVICE_FIELDS = ("loss", "metric", "samples", "nonfinite", "amp_skipped")


@dataclass(frozen=True)
class Totals:
    """A window summed over every rank."""

    loss: float  # loss × samples
    metric: float  # the task's metric summed over samples
    samples: float
    nonfinite: float  # steps whose loss was NaN/inf
    amp_skipped: float  # optimizer updates GradScaler skipped (the same on every rank under DDP)
    amp_scale: float  # GradScaler's scale now (0 without one)
    skipped: float  # unreadable samples since the start of the run
    stops: float  # ranks that have seen a stop request


class LogWindow:
    """Device-side sums since the last log point (no host sync until `reduce`), and the step count."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(len(DEVICE_FIELDS), device=device)
        self.steps = 0

    def add(self, loss: torch.Tensor, metric: torch.Tensor | None, samples: int, finite: torch.Tensor,
            amp_skipped: torch.Tensor | None) -> None:
        """One step's contribution; no metric and 0 samples for a stand-in step, which must not count."""
        loss_sum, metric_sum, count, nonfinite, skipped_updates = self.sums.unbind()
        if metric is not None:
            loss_sum.add_(loss.detach().float() * samples)
            metric_sum.add_(metric)
            count.add_(samples)
        nonfinite.add_((~finite).float())
        if amp_skipped is not None:
            skipped_updates.add_(amp_skipped.float())
        self.steps += 1

    def any_nonfinite(self, strategy: Strategy) -> bool:
        """Whether any rank saw a NaN/inf loss in this window (a sync: before a checkpoint only)."""
        return bool(strategy.all_reduce_sum(self.sums[3:4].clone()) > 0)

    def nonfinite_here(self) -> bool:
        """Whether this rank saw a NaN/inf loss in this window (a sync, without the other ranks)."""
        return bool(self.sums[3] > 0)

    def reduce(self, strategy: Strategy, skipped: int, stop_requested: bool,
               amp_scale: torch.Tensor | None) -> Totals:
        """Sum over ranks (the log point's sync), then start a new window. `amp_scale`: GradScaler's
        scale as a device tensor, read in the same sync (averaged over ranks)."""
        device = self.sums.device
        scale = amp_scale.reshape(1).float() if amp_scale is not None else torch.zeros(1, device=device)
        host = torch.tensor([float(skipped), float(stop_requested)], device=device)
        values = strategy.all_reduce_sum(torch.cat([self.sums, scale, host])).tolist()
        self.sums.zero_()
        self.steps = 0
        world = strategy.world_size
        *sums, scale_sum, skipped_sum, stops = values
        sums[4] /= world  # every rank skips the same updates (their gradients are all-reduced)
        return Totals(*sums, amp_scale=scale_sum / world, skipped=skipped_sum, stops=stops)
