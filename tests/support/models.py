"""Import-path models and datasets that provoke each finding in a real run (the diagnosis tests)."""

from __future__ import annotations

import os
import time

import torch
from torch import nn
from torch.utils.data import Dataset


class Shapes(Dataset):
    """Labelled 3×16×16 images: a class template plus noise (like the synthetic set), 64 of them."""

    def __init__(self, image_size: int = 16, channels: int = 3, size: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        self.templates = torch.rand(10, channels, image_size, image_size, generator=g)
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        g = torch.Generator().manual_seed(index)
        noise = 0.1 * torch.randn(self.templates.shape[1:], generator=g)
        return (self.templates[index % 10] + noise).clamp(0, 1), index % 10


class SlowShapes(Shapes):
    """Each sample takes `delay` seconds to load (only on rank `only_rank`, when given): an input-bound run."""

    def __init__(self, image_size: int, channels: int, delay: float, only_rank: int | None = None) -> None:
        super().__init__(image_size, channels)
        slowed = only_rank is None or int(os.environ.get("RANK", "0")) == only_rank
        self.delay = delay if slowed else 0.0

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self.delay:
            time.sleep(self.delay)
        return super().__getitem__(index)


def slow_data(image_size: int, channels: int) -> Dataset:
    """500 ms per sample: far more than a tiny model's step takes, even on a loaded machine."""
    return SlowShapes(image_size, channels, delay=0.5)


def slow_rank1_data(image_size: int, channels: int) -> Dataset:
    """DDP: rank 1 waits 250 ms per sample, rank 0 not at all."""
    return SlowShapes(image_size, channels, delay=0.25, only_rank=1)


class Unreadable(Shapes):
    """Every fourth sample fails to open, as a corrupt image file would (an OSError)."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if index % 4 == 0:
            raise OSError(f"cannot identify image file 'img_{index:03d}.png'")
        return super().__getitem__(index)


def unreadable_data(image_size: int, channels: int) -> Dataset:
    return Unreadable(image_size, channels)


class Poison(nn.Module):
    """Passes its input through, until forward call `at` (training mode) from which it yields NaN."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.calls, self.at = 0, at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += self.training
        return x * float("nan") if self.calls >= self.at else x


class Encoder(nn.Module):
    def __init__(self, in_features: int, at: int) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Flatten(), nn.Linear(in_features, 32), nn.ReLU())
        self.block2 = nn.Sequential(nn.Linear(32, 32), Poison(at), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block2(self.block1(x))


class NanClassifier(nn.Module):
    """encoder.block1 → encoder.block2 (whose layer `1` turns NaN at step `at`) → head."""

    def __init__(self, in_features: int, at: int = 6) -> None:
        super().__init__()
        self.encoder = Encoder(in_features, at)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def nan_at_6(channels: int, image_size: int) -> nn.Module:
    return NanClassifier(channels * image_size * image_size, at=6)


class KeepsOutputs(nn.Module):
    """A classifier that keeps the output of its wide layer from every training step in a list (as a
    debugging hook or a cache that never evicts would): 6 MiB a step at batch 4, 3×16×16, never freed."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, 10)
        self.kept: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        wide = torch.relu(flat.repeat(1, 512))
        if self.training:
            self.kept.append(wide)
        return self.fc(wide.view(flat.shape[0], 512, -1).mean(1))


def leaky_model(channels: int, image_size: int) -> nn.Module:
    return KeepsOutputs(channels * image_size * image_size)


def linear_denoiser(channels: int) -> nn.Module:
    """One 3×3 convolution, no normalisation: with too large a learning rate its MSE diverges geometrically
    (the error, and with it every gradient, grows by a constant factor per step)."""
    return nn.Conv2d(channels, channels, 3, padding=1)
