"""Import-path models and datasets for the trainer's tests (`--model train_helpers:NAME`)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset


class Faulty(nn.Module):
    """Passes its input through, but NaN from its training call `at` (1-based) on; with `once`, only on
    calls `at` and `at + 1` (the failing step and its one re-run with hooks)."""

    def __init__(self, at: int, once: bool) -> None:
        super().__init__()
        self.calls, self.at, self.once = 0, at, once

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += self.training  # the graph trace (eval mode) does not count
        failing = self.calls in (self.at, self.at + 1) if self.once else self.calls >= self.at
        return x * float("nan") if failing else x


class Encoder(nn.Module):
    def __init__(self, in_features: int, at: int, once: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, 16)
        self.faulty = Faulty(at, once)


class NanInTheMiddle(nn.Module):
    """A classifier whose module `encoder.faulty` turns its (finite) input into NaN at step 5."""

    def __init__(self, in_features: int, at: int = 5, once: bool = True) -> None:
        super().__init__()
        self.encoder = Encoder(in_features, at, once)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder.faulty(torch.relu(self.encoder.fc(x.flatten(1)))))


def nan_in_the_middle(channels: int, image_size: int) -> nn.Module:
    """NaN at step 5 only (for --on-nan skip)."""
    return NanInTheMiddle(channels * image_size * image_size)


def nan_in_the_middle_from_5(channels: int, image_size: int) -> nn.Module:
    """NaN from step 5 on (for --on-nan stop)."""
    return NanInTheMiddle(channels * image_size * image_size, once=False)


class InfGradient(nn.Module):
    """A linear classifier whose gradient is inf on training call `at` (its loss stays finite): what
    GradScaler sees when fp16 gradients overflow."""

    def __init__(self, in_features: int, at: int = 3) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, 10)
        self.calls, self.at = 0, at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += self.training
        out = self.fc(x.flatten(1))
        if self.training and self.calls == self.at:
            out.register_hook(lambda grad: grad * float("inf"))
        return out


def inf_gradient(channels: int, image_size: int) -> nn.Module:
    return InfGradient(channels * image_size * image_size)


class HalfUnreadable(Dataset):
    """Labelled 1×8×8 images; every odd index is unreadable (raises OSError, like a corrupt file)."""

    def __len__(self) -> int:
        return 32

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if index % 2:
            raise OSError(f"sample {index}: truncated file")
        return torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(index)), index % 10


def half_unreadable() -> Dataset:
    return HalfUnreadable()
