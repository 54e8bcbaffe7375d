"""Your own task: segmentation with per-pixel cross-entropy and mean IoU, through `runner train`.

    PYTHONPATH=examples runner train --data segmentation:shapes --model segmentation:model \
        --task segmentation:task --image-size 32 --channels 1 --val-split 0.2 --steps 200

A task is any object with `loss(output, target)` (the scalar to minimise) and `metrics(output,
target)`: a dict of per-batch *sums* on the device (runner adds them up without a host sync and
divides by the samples at each log point and evaluation); the names become `train/<name>` and
`val/<name>` on both dashboards. `grid(inputs, output, target)`, optional, returns a
`runner.tasks.Grid` of image rows in [0, 1] for the image pane.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from runner.tasks import Grid

CLASSES = 3  # background, square, disc


class Shapes(Dataset):
    """Noisy images of one square and one disc; the target is each pixel's class (H, W), int64."""

    def __init__(self, size: int, channels: int, samples: int, seed: int) -> None:
        self.size, self.channels, self.samples, self.seed = size, channels, samples, seed

    def __len__(self) -> int:
        return self.samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + index)
        axis = torch.arange(self.size, dtype=torch.float32)
        yy, xx = torch.meshgrid(axis, axis, indexing="ij")
        sx, sy, dx, dy = (torch.rand(4, generator=g) * self.size * 0.7 + self.size * 0.15).tolist()
        r = self.size / 6
        mask = torch.zeros(self.size, self.size, dtype=torch.long)
        mask[((xx - sx).abs() < r) & ((yy - sy).abs() < r)] = 1
        mask[(xx - dx) ** 2 + (yy - dy) ** 2 < r**2] = 2
        image = mask.float().div(CLASSES - 1) + 0.3 * torch.randn(self.size, self.size, generator=g)
        return image.clamp(0, 1).expand(self.channels, -1, -1).clone(), mask


def shapes(image_size: int = 32, channels: int = 1, seed: int = 0, train: bool = True) -> Dataset:
    """The dataset factory (`--data segmentation:shapes`): runner passes the keywords it names."""
    return Shapes(image_size, channels, samples=256 if train else 64, seed=seed if train else seed + 1)


def model(in_channels: int = 1) -> nn.Module:
    """A small fully convolutional net: per-pixel logits (N, CLASSES, H, W)."""
    return nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, CLASSES, 1))


class Segmentation:
    """Per-pixel cross-entropy; pixel accuracy and mean IoU over the classes, as per-image sums."""

    metric_names = ("pixel_accuracy", "miou")  # optional: the HParams table's metric columns

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output.float(), target)

    def metrics(self, output: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        pred = output.argmax(dim=1)
        correct = (pred == target).flatten(1).float().mean(dim=1)  # per image
        ious = []
        for c in range(CLASSES):
            p, t = pred == c, target == c
            inter = (p & t).flatten(1).sum(dim=1).float()
            union = (p | t).flatten(1).sum(dim=1).float()
            ious.append(torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union)))
        return {"pixel_accuracy": correct.sum(), "miou": torch.stack(ious).mean(dim=0).sum()}

    def grid(self, inputs: torch.Tensor, output: torch.Tensor, target: torch.Tensor, n: int = 8) -> Grid:
        shown = lambda labels: labels[:n, None].float().div(CLASSES - 1)  # noqa: E731 - class → grey level
        return Grid([inputs[:n, :1].float(), shown(output[:n].argmax(dim=1)), shown(target)],
                    "rows: input | predicted | true")


def task() -> Segmentation:
    """The task factory (`--task segmentation:task`)."""
    return Segmentation()
