"""The tests' models and datasets, loaded by import path (`--model tests.support.models:NAME`, `--data ...`).

Each provokes one behaviour in a real run: a finding, a non-finite loss or gradient, an unreadable sample,
an output the graph trace refuses."""

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


def input_bound_data(image_size: int, channels: int) -> Dataset:
    """200 ms per sample: still several times a tiny model's step on a loaded machine, and a short run."""
    return SlowShapes(image_size, channels, delay=0.2)


def slow_rank1_data(image_size: int, channels: int) -> Dataset:
    """DDP: rank 1 waits 80 ms per sample (320 ms a step at batch 4), rank 0 not at all."""
    return SlowShapes(image_size, channels, delay=0.08, only_rank=1)


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


class PoisonedEncoder(nn.Module):
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
        self.encoder = PoisonedEncoder(in_features, at)
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


# --- the spine: NaN losses, a user dataset ---------------------------------------------------------

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


# --- the trainer: NaN inside a named module, inf gradients, unreadable samples -----------------------

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


class FaultyEncoder(nn.Module):
    def __init__(self, in_features: int, at: int, once: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, 16)
        self.faulty = Faulty(at, once)


class NanInTheMiddle(nn.Module):
    """A classifier whose module `encoder.faulty` turns its (finite) input into NaN at step 5."""

    def __init__(self, in_features: int, at: int = 5, once: bool = True) -> None:
        super().__init__()
        self.encoder = FaultyEncoder(in_features, at, once)
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


# --- TensorBoard: dict outputs, an untraceable model ------------------------------------------------

class DictDenoiser(nn.Module):
    """A small denoiser returning a dict: `out` (the prediction, as the tasks expect) and `features`."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.encode = nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.ReLU())
        self.decode = nn.Conv2d(8 + channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.encode(x)
        return {"out": x + self.decode(torch.cat([features, x], dim=1)), "features": features}


class Untraceable(DictDenoiser):
    """Trains like DictDenoiser, but its output holds a string: torch.jit.trace refuses it."""

    def forward(self, x: torch.Tensor) -> dict[str, object]:  # type: ignore[override]
        return {"out": super().forward(x)["out"], "note": "denoised"}


def dict_denoiser(channels: int) -> nn.Module:
    return DictDenoiser(channels)


def untraceable(channels: int) -> nn.Module:
    return Untraceable(channels)


# --- training health and histograms: many parameter tensors ------------------------------------------

LAYERS = 600  # Linear layers: 1,200 parameter tensors (weight and bias each)


def many_layers(channels: int, image_size: int, num_classes: int) -> nn.Module:
    """Flatten, then 600 small Linear layers: 1,200 parameter tensors, almost no compute."""
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(channels * image_size * image_size, 4)]
    layers += [nn.Linear(4, 4) for _ in range(LAYERS - 2)]
    layers.append(nn.Linear(4, num_classes))
    return nn.Sequential(*layers)
