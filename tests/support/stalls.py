"""Datasets and models that stall a run, for tests/test_stall.py (`--data tests.support.stalls:NAME`).

What stalls, where and for how long comes from the environment, which the supervisor and torchrun pass
on to every rank: STALL_AT (the training step that stalls, 1-based), STALL_FOR (seconds; 0: for
good), STALL_RANK (only that rank; unset: every rank). Each stalling line is marked, so that a test
finds its number (`stall_line`) and checks that a finding names it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from runner.models import CNN

FOREVER = 600.0


def _stalls_here() -> bool:
    rank = os.environ.get("STALL_RANK")
    return rank is None or rank == os.environ.get("RANK", "0")


def _seconds() -> float:
    return float(os.environ.get("STALL_FOR", "0")) or FOREVER


def stall_line(where: str) -> int:
    """The line number of the stalling `time.sleep` marked `# STALLS HERE (<where>)`: data or forward."""
    wanted = f"time.sleep(_seconds())  # STALLS HERE ({where})"
    return next(n for n, line in enumerate(Path(__file__).read_text().splitlines(), 1) if line.strip() == wanted)


class StallingShapes(Dataset):
    """Labelled images (a class template plus noise); the first sample of step STALL_AT blocks in
    `__getitem__` (no DataLoader workers: the loading happens in the trainer itself)."""

    def __init__(self, image_size: int, channels: int, batch_size: int, size: int = 256) -> None:
        g = torch.Generator().manual_seed(0)
        self.templates = torch.rand(10, channels, image_size, image_size, generator=g)
        self.size = size
        self.calls = 0
        at = int(os.environ.get("STALL_AT", "0"))
        # the first call is runner's look at one sample's shape; then each step takes `batch_size`
        self.stall_call = (at - 1) * batch_size + 2 if at and _stalls_here() else 0

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        self.calls += 1
        if self.calls == self.stall_call:
            time.sleep(_seconds())  # STALLS HERE (data)
        noise = 0.1 * torch.randn(self.templates.shape[1:], generator=torch.Generator().manual_seed(index))
        return (self.templates[index % 10] + noise).clamp(0, 1), index % 10


def stalling_data(image_size: int, channels: int) -> Dataset:
    """Batches of STALL_BATCH (default 4) samples: the batch size the tests train with."""
    return StallingShapes(image_size, channels, int(os.environ.get("STALL_BATCH", "4")))


class SleepyCNN(CNN):
    """runner's cnn whose training forward number STALL_AT sleeps (STALL_FOR seconds, or for good)."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__(channels, num_classes)
        self.calls = 0
        self.stall_call = int(os.environ.get("STALL_AT", "0")) if _stalls_here() else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += self.training  # the graph trace (eval mode) does not count
        if self.training and self.calls == self.stall_call:
            time.sleep(_seconds())  # STALLS HERE (forward)
        return super().forward(x)


def sleepy_cnn(channels: int, num_classes: int) -> nn.Module:
    return SleepyCNN(channels, num_classes)


class SlowStartHeavy(nn.Module):
    """A healthy classifier that is slow where runs are allowed to be: its first training step takes
    SLOW_FIRST seconds (as compilation or autotuning would), and its state is large (a 64 MiB buffer, no
    gradient, no optimizer state) and takes SLOW_SAVE seconds more to gather, so that each checkpoint is
    slow too."""

    def __init__(self, channels: int, image_size: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(channels * image_size * image_size, num_classes)
        self.register_buffer("table", torch.rand(16 * 1024 * 1024))
        self.first, self.save = float(os.environ.get("SLOW_FIRST", "6")), float(os.environ.get("SLOW_SAVE", "6"))
        self.calls = 0
        self.register_state_dict_post_hook(_slow_save)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += self.training  # the graph trace (eval mode) does not count
        if self.training and self.calls == 1:
            time.sleep(self.first)
        return self.fc(x.flatten(1)) + 0.0 * self.table[0]


def _slow_save(module: SlowStartHeavy, state: dict, prefix: str, local_metadata: dict) -> None:
    if not prefix:  # once per state_dict, not per submodule
        time.sleep(module.save)


def slow_start_heavy(channels: int, image_size: int, num_classes: int) -> nn.Module:
    return SlowStartHeavy(channels, image_size, num_classes)


class HalfUnreadablePairs(Dataset):
    """Denoising pairs (noisy, clean) where every odd index is unreadable, for the DDP stand-in with U-Nets."""

    def __init__(self, image_size: int, channels: int, size: int = 32) -> None:
        self.image_size, self.channels, self.size = image_size, channels, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if index % 2:
            raise OSError(f"sample {index}: truncated file")
        g = torch.Generator().manual_seed(index)
        clean = torch.rand(self.channels, self.image_size, self.image_size, generator=g)
        return (clean + 0.1 * torch.randn(clean.shape, generator=g)).clamp(0, 1), clean


def half_unreadable_pairs(image_size: int, channels: int) -> Dataset:
    return HalfUnreadablePairs(image_size, channels)
