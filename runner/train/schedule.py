"""The learning-rate schedule (--lr-schedule, --warmup-steps, --min-lr), built from torch's own
`torch.optim.lr_scheduler` classes so that a run's curve is exactly the one torch documents.

Stepped once per optimizer step that updated the weights (a step skipped by --on-nan skip moves no
weights and no schedule); its state travels in the checkpoint, so a resumed run goes on along the
same curve.
"""

from __future__ import annotations

from torch.optim import Optimizer, lr_scheduler

WARMUP_START_FACTOR = 0.01  # warm-up starts at 1 % of --lr: 0 would make the first update a no-op
STEP_DECAY = 0.1  # `step`: the learning rate drops tenfold ...
STEP_PHASES = 3  # ... at each third of the steps after the warm-up (twice in all)
ONECYCLE_RISE = 0.3  # onecycle without --warmup-steps: torch's default share of steps spent rising


def make_scheduler(optimizer: Optimizer, schedule: str, total_steps: int, warmup_steps: int,
                   min_lr: float) -> lr_scheduler.LRScheduler:
    """The scheduler for `schedule` over `total_steps` optimizer steps, the first `warmup_steps` a
    linear warm-up (onecycle: its rising phase). `min_lr`: where cosine ends, step's floor."""
    lr = optimizer.param_groups[0]["lr"]
    if schedule == "onecycle":
        rise = warmup_steps / total_steps if warmup_steps else ONECYCLE_RISE
        return lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(total_steps, 2),
                                       pct_start=min(max(rise, 1e-6), 1 - 1e-6))
    warmup = min(warmup_steps, max(total_steps - 1, 0))
    rest = max(total_steps - warmup, 1)
    if schedule == "cosine":
        main: lr_scheduler.LRScheduler = lr_scheduler.CosineAnnealingLR(optimizer, T_max=rest, eta_min=min_lr)
    elif schedule == "step":
        floor = min_lr / lr
        main = lr_scheduler.LambdaLR(
            optimizer, lambda step: max(STEP_DECAY ** (step * STEP_PHASES // rest), floor))
    else:
        main = lr_scheduler.LambdaLR(optimizer, lambda _step: 1.0)
    if not warmup:
        return main
    ramp = lr_scheduler.LinearLR(optimizer, start_factor=WARMUP_START_FACTOR, total_iters=warmup)
    return lr_scheduler.SequentialLR(optimizer, [ramp, main], milestones=[warmup])
