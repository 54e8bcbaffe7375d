"""Import-path models for the TensorBoard tests: one with dict outputs, one that cannot be traced."""

from __future__ import annotations

import torch
from torch import nn


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
