"""locate_nonfinite on small CPU models: the first module (or gradient) where NaN/inf starts."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from runner.diagnosis.nonfinite import locate_nonfinite, nonfinite_finding
from tests.support.models import nan_at_6


class InfGrad(torch.autograd.Function):
    """Identity forward; backward returns inf: a gradient that overflows with a finite forward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("inf")


class GradBlowUp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(8, 8)
        self.norm = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(InfGrad.apply(self.norm(self.stem(x))))


class OwnCode(nn.Module):
    """NaN made by the model's own forward code (no submodule): log of a negative number."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(self.fc(x) - 100.0)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.rand(4, 3, 4, 4), torch.tensor([0, 1, 2, 3])


def test_first_module_in_forward_order_by_qualified_name() -> None:
    model = nan_at_6(channels=3, image_size=4)
    model.encoder.block2[1].calls = 10  # past its NaN step
    result = locate_nonfinite(model, *batch(), F.cross_entropy)
    assert result["where"] == "forward" and result["module"] == "encoder.block2.1"
    assert result["details"]["type"] == "Poison" and result["details"]["output"]["nan"] == 4 * 32
    finding = nonfinite_finding(result, step=6)
    assert finding.kind == "first_nonfinite" and finding.severity == "error"
    assert "encoder.block2.1" in finding.message and finding.evidence["module"] == "encoder.block2.1"


def test_models_own_forward_code_is_named_empty() -> None:
    result = locate_nonfinite(OwnCode(), torch.rand(2, 8), torch.tensor([0, 1]), F.cross_entropy)
    assert result == {**result, "module": "", "where": "forward"}
    assert "own forward code" in nonfinite_finding(result, 3).message


def test_gradient_when_the_forward_is_finite_and_state_is_restored() -> None:
    model = GradBlowUp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = locate_nonfinite(model, torch.rand(4, 8), torch.tensor([0, 1, 2, 0]), F.cross_entropy)
    assert result["where"] == "gradient"
    assert result["details"]["parameter"] in ("norm.weight", "norm.bias")  # first computed in backward
    assert result["module"] == "norm" and "head.weight" not in result["details"]["parameters_nonfinite"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN statistics put back
    assert all(p.grad is None for p in model.parameters())


def test_loss_and_not_reproduced() -> None:
    model = nn.Linear(8, 3)
    inputs, targets = torch.rand(2, 8), torch.tensor([0, 1])
    result = locate_nonfinite(model, inputs, targets, lambda out, _t: torch.log(out.sum() * 0.0))
    assert result["where"] == "loss"
    assert locate_nonfinite(model, inputs, targets, F.cross_entropy)["where"] == "not reproduced"


def test_under_autocast_and_with_a_nonfinite_batch() -> None:
    model = nan_at_6(channels=3, image_size=4)
    model.encoder.block2[1].calls = 10
    inputs, targets = batch()
    result = locate_nonfinite(model, inputs, targets, F.cross_entropy,
                              lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert result["module"] == "encoder.block2.1"
    inputs[0, 0, 0, 0] = float("inf")
    assert locate_nonfinite(model, inputs, targets, F.cross_entropy)["details"]["input"]["inf"] == 1
