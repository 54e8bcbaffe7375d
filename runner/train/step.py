"""One optimizer step: forward and backward over the --accumulate micro-batches, then clip and update.

The loop decides what happens around a step (non-finite gating, telemetry, log points, checkpoints);
this module only does the step's arithmetic. Each micro-batch's loss is weighted by its share of the
step's samples, so N micro-batches of B give the gradient of one batch of N×B (for a model without
BatchNorm); under DDP the gradients are all-reduced on the last micro-batch only (`no_sync` on the
others). With --clip-grad-norm the pre-clip global norm comes back as a device tensor (no sync): it
is the step's gradient norm, computed once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim import lr_scheduler

from runner.data import Batch
from runner.tasks import Task
from runner.train.stand_in import buffers_kept
from runner.train.step_clock import StepClock


@dataclass
class Micro:
    """One micro-batch of a step; `stand_in`: DDP, a rank whose batch was all unreadable (weight 0)."""

    batch: Batch
    stand_in: bool = False


@dataclass
class Computed:
    """What the forward/backward passes of a step leave, all on the device (no sync)."""

    loss: torch.Tensor  # the step's weighted loss (what was back-propagated); NaN/inf if any micro's was
    loss_sum: torch.Tensor  # loss × samples over the real (not stand-in) micro-batches
    samples: int
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # the task's metric sums
    inputs: Any = None  # the last micro-batch's, for image grids and the NaN re-run
    output: Any = None
    targets: Any = None

    @property
    def finite(self) -> torch.Tensor:
        return torch.isfinite(self.loss.detach())


class StepRunner:
    """Runs the passes and the update of one optimizer step for the trainer."""

    def __init__(self, model: nn.Module, raw_model: nn.Module, task: Task, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler | None, autocast: Callable[[], contextlib.AbstractContextManager],
                 clip_grad_norm: float, device: torch.device, scheduler: lr_scheduler.LRScheduler,
                 channels_last: bool = False) -> None:
        self.model, self.raw_model, self.task = model, raw_model, task
        self.optimizer, self.scaler, self.autocast, self.scheduler = optimizer, scaler, autocast, scheduler
        self.clip_grad_norm, self.device, self.channels_last = clip_grad_norm, device, channels_last
        self.one = torch.ones((), device=device)  # reads GradScaler's scale on the device: scale(one)

    def compute(self, micros: list[Micro], clock: StepClock,
                probe: Callable[[torch.Tensor, torch.Tensor], contextlib.AbstractContextManager]) -> Computed:
        """Forward and backward over `micros` (gradients zeroed first); `probe(inputs, targets)` wraps
        the first forward (the memory estimate's measurement)."""
        total = sum(0 if m.stand_in else m.batch.inputs.shape[0] for m in micros)
        done = Computed(loss=torch.zeros((), device=self.device), loss_sum=torch.zeros((), device=self.device),
                        samples=total)
        self.optimizer.zero_grad(set_to_none=True)
        for index, micro in enumerate(micros):
            last = index == len(micros) - 1
            no_sync = getattr(self.model, "no_sync", None)
            quiet = no_sync() if no_sync is not None and not last else contextlib.nullcontext()
            with quiet:
                clock.enter("h2d")
                inputs = micro.batch.inputs.to(self.device, non_blocking=True)
                if self.channels_last and inputs.dim() == 4:
                    inputs = inputs.contiguous(memory_format=torch.channels_last)
                targets = micro.batch.targets.to(self.device, non_blocking=True)
                clock.enter("forward")
                kept = buffers_kept(self.raw_model) if micro.stand_in else contextlib.nullcontext()
                first = probe(inputs, targets) if index == 0 else contextlib.nullcontext()
                with kept, self.autocast(), first:
                    output = self.model(inputs)
                    loss = self.task.loss(output, targets)
                n = 0 if micro.stand_in else inputs.shape[0]
                weight = n / total if total else 0.0  # a stand-in's loss counts 0 (its gradients are zeros)
                weighted = loss * weight if len(micros) > 1 or micro.stand_in else loss
                clock.enter("backward")
                if self.scaler is not None:
                    self.scaler.scale(weighted).backward()
                else:
                    weighted.backward()
            done.loss = done.loss + weighted.detach()
            done.loss_sum = done.loss_sum + loss.detach().float() * n
            with torch.no_grad():
                for name, value in self.task.metrics(output.detach() if torch.is_tensor(output) else output,
                                                     targets).items():
                    value = torch.zeros_like(value) if micro.stand_in else value  # same names on every rank
                    done.metrics[name] = done.metrics[name] + value if name in done.metrics else value
            done.inputs, done.output, done.targets = inputs, output, targets
        return done

    def update(self, norm: torch.Tensor | None = None) -> tuple[torch.Tensor | None,
                                                              tuple[torch.Tensor, torch.Tensor] | None]:
        """Clip (with --clip-grad-norm), step, and advance the learning-rate schedule. Returns, as
        device tensors read at the next log point: under GradScaler whether it skipped the update
        (inf/NaN gradients; the scale, read as `scale(1)` without a sync, drops only then), and with
        clipping (pre-clip norm, clipped?). `norm`: the step's global gradient norm, already measured
        (runner/train/step_health.py measures it every step), so clipping does not measure it again."""
        clip = None
        if self.clip_grad_norm > 0:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            if norm is None:
                norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad_norm)
            else:
                torch.nn.utils.clip_grads_with_norm_(self.model.parameters(), self.clip_grad_norm, norm)
            clip = (norm, norm > self.clip_grad_norm)
        if self.scaler is None:
            self.optimizer.step()
            self.scheduler.step()
            return None, clip
        self.scaler.step(self.optimizer)
        before = self.scaler.scale(self.one)
        self.scaler.update()
        self.scheduler.step()  # also after an update GradScaler skipped: the schedule follows the steps
        return self.scaler.scale(self.one) < before, clip
