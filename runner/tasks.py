"""What a workload means: its loss, its metrics, and which images make a useful grid.

The task protocol (`Task`): the built-in classify and denoise tasks implement it, and so can a user's
object named by `--task package.module:factory`. Metrics are returned as *sums over the batch* on
the device, so the loop can accumulate them without a host sync and divide by the sample count once
per log point (training) or once per evaluation; their names become tags (`train/<name>`,
`val/<name>`). Grids stay on the device too (their labels are copied to the host without a sync, and
the caption is written once the copy has landed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from runner.errors import usage_error
from runner.imports import call_with_known_kwargs, load_object


def _primary(output: torch.Tensor | dict | tuple | list) -> torch.Tensor:
    """The prediction tensor of a model that returns a dict or tuple (its first entry / 'out')."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        return output["out"] if "out" in output else next(iter(output.values()))
    return output[0]


@dataclass(frozen=True)
class Grid:
    """Images for a grid: rows of (N, C, H, W) tensors in display range [0, 1], and a caption, which
    `labels` ((2, N) predicted and true class per image, on the device) complete once on the host."""

    rows: list[torch.Tensor]
    caption: str
    labels: torch.Tensor | None = None


@runtime_checkable
class Task(Protocol):
    """What runner needs of a task. `grid(inputs, output, target)` returning a `Grid` is optional."""

    def loss(self, output: Any, target: Any) -> torch.Tensor:
        """The scalar loss to minimise (the mean over the batch)."""
        ...

    def metrics(self, output: Any, target: Any) -> dict[str, torch.Tensor]:
        """Per-batch *sums* of each metric, on the device (runner divides by the samples)."""
        ...


def label_caption(prefix: str, labels: list[list[int]]) -> str:
    """A grid's caption completed with the host copy of its labels: `pred/true: 3/3 1/7 …`."""
    return " ".join([prefix, *(f"{p}/{t}" for p, t in zip(*labels, strict=True))])


class ClassifyTask:
    """Cross-entropy loss, accuracy metric; grid of inputs captioned with predicted/true labels."""

    name = "classify"
    metric_names = ("accuracy",)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(_primary(output).float(), target)

    def metrics(self, output: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"accuracy": (_primary(output).argmax(dim=1) == target).sum().float()}

    def grid(self, inputs: torch.Tensor, output: torch.Tensor, target: torch.Tensor, n: int = 8) -> Grid:
        labels = torch.stack([_primary(output)[:n].argmax(dim=1), target[:n]])
        return Grid([_display(inputs[:n])], "pred/true:", labels)


class DenoiseTask:
    """MSE loss against the clean image, PSNR in dB (images in [0, 1]); grid noisy | output | clean."""

    name = "denoise"
    metric_names = ("psnr",)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(_primary(output).float(), target.float())

    def metrics(self, output: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        pred = _primary(output).detach().float().clamp(0, 1)
        mse = (pred - target.float()).pow(2).flatten(1).mean(dim=1).clamp_min(1e-10)
        return {"psnr": (-10.0 / math.log(10.0) * torch.log(mse)).sum()}

    def grid(self, inputs: torch.Tensor, output: torch.Tensor, target: torch.Tensor, n: int = 8) -> Grid:
        rows = [_display(inputs[:n]), _display(_primary(output)[:n]), _display(target[:n])]
        return Grid(rows, "rows: noisy | output | clean")


def _display(images: torch.Tensor) -> torch.Tensor:
    """Detach and bring images into [0, 1] for display: clamp if already there, else min-max."""
    images = images.detach().float()
    lo, hi = images.amin(), images.amax()
    scaled = (images - lo) / (hi - lo).clamp_min(1e-8)
    in_range = (lo >= 0) & (hi <= 1)
    return torch.where(in_range, images, scaled)


def make_task(name: str) -> Task:
    """The task object for a resolved task name (`classify`, `denoise`), or the object a user factory
    `package.module:factory` returns (called without arguments)."""
    if name == "denoise":
        return DenoiseTask()
    if ":" not in name:
        return ClassifyTask()
    task = call_with_known_kwargs(load_object(name, what="task"), what=f"task factory {name}")
    missing = [m for m in ("loss", "metrics") if not callable(getattr(task, m, None))]
    if missing:
        raise usage_error(f"task factory {name} returned {type(task).__name__}, which has no "
                          f"{' or '.join(missing)}(output, target) method")
    return task

