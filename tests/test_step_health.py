"""Per-step health on the device: the window's values over ranks (maxima stay maxima), and the gate
that applies no update from a non-finite step (weights and Adam moments exactly as they were)."""

from __future__ import annotations

import math

import torch
from torch import nn

from runner.telemetry import tags
from runner.train.grad_norms import GradNormMeter
from runner.train.health_window import HealthWindow
from runner.train.step import Computed
from runner.train.step_health import StepHealth

CPU = torch.device("cpu")


def test_window_over_two_ranks_keeps_the_largest_loss_and_its_step() -> None:
    model = nn.Linear(3, 2)
    model(torch.ones(1, 3)).sum().backward()
    meter = GradNormMeter(model)
    ranks = [HealthWindow(CPU, meter.names) for _ in range(2)]
    for step, losses in ((1, (2.0, 3.0)), (2, (50.0, 4.0)), (3, (float("nan"), 1.0))):
        for rank, loss in enumerate(losses):
            ranks[rank].add(step, torch.tensor(loss), torch.tensor(math.isfinite(loss)), meter.measure())
    summed = (ranks[0].for_reduce(0, 2) + ranks[1].for_reduce(1, 2)).tolist()
    health = ranks[0].read(summed, 2)
    assert health.scalars[tags.LOSS_MAX] == 50.0 and health.scalars[tags.LOSS_MAX_STEP] == 2.0
    assert health.scalars[tags.LOSS_MIN] == 1.0 and health.first_bad_step == 3
    expected = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item()
    assert math.isclose(health.scalars[tags.GRAD_GLOBAL], expected, rel_tol=1e-6)
    assert health.layer == "weight"  # the larger of weight's and bias's gradient norms
    assert ranks[0].first_bad_here() == 0  # reading it started a new window


def _step(model: nn.Module, health: StepHealth, optimizer: torch.optim.Optimizer, step: int, poison: bool) -> None:
    optimizer.zero_grad()
    loss = model(torch.ones(2, 3)).pow(2).mean() * (float("nan") if poison else 1.0)
    loss.backward()
    done = Computed(loss=loss.detach(), loss_sum=loss.detach() * 2, samples=2)
    finite = health.measure(done)
    with health.gate(finite):
        optimizer.step()
    health.record(step, done, finite, [])


def test_no_update_from_a_nonfinite_step_and_none_after_it_under_stop() -> None:
    model = nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1, fused=True)
    health = StepHealth(model, optimizer, None, CPU, "classify", on_nan="stop")
    _step(model, health, optimizer, 1, poison=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {k: v.clone() for k, v in optimizer.state[model.weight].items()}
    _step(model, health, optimizer, 2, poison=True)
    _step(model, health, optimizer, 3, poison=False)  # held: the window already had a non-finite step
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(moments[k], v) for k, v in optimizer.state[model.weight].items())
    assert health.window.first_bad_here() == 2 and not hasattr(optimizer, "found_inf")
