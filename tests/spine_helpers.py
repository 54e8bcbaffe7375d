"""Import-path models and datasets for the spine tests."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset


class NanAfter(nn.Module):
    """A linear classifier whose output turns NaN from training forward call `at` on (1-based)."""

    def __init__(self, in_features: int, at: int = 7) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, 10)
        self.calls, self.at = 0, at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += self.training  # the graph trace (eval mode) does not count
        out = self.fc(x.flatten(1))
        return out * float("nan") if self.calls >= self.at else out


def nan_model(channels: int, image_size: int) -> nn.Module:
    return NanAfter(channels * image_size * image_size)


def nan_once_model(channels: int, image_size: int) -> nn.Module:
    """NaN on forward call 5 only: --on-nan skip must skip that step and go on."""

    class Once(NanAfter):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += self.training
            out = self.fc(x.flatten(1))
            return out * float("nan") if self.calls == 5 else out

    return Once(channels * image_size * image_size)


def not_a_model() -> str:
    return "nope"


class Pairs(Dataset):
    """A user dataset: (noisy, clean) pairs of 1×16×16 images."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(index)
        clean = torch.rand(1, 16, 16, generator=g)
        return (clean + 0.1 * torch.randn(clean.shape, generator=g)).clamp(0, 1), clean


def pairs() -> Dataset:
    return Pairs()
