"""Models for the training-health and histogram tests: one with many parameter tensors."""

from __future__ import annotations

from torch import nn

LAYERS = 600  # Linear layers: 1,200 parameter tensors (weight and bias each)


def many_layers(channels: int, image_size: int, num_classes: int) -> nn.Module:
    """Flatten, then 600 small Linear layers: 1,200 parameter tensors, almost no compute."""
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(channels * image_size * image_size, 4)]
    layers += [nn.Linear(4, 4) for _ in range(LAYERS - 2)]
    layers.append(nn.Linear(4, num_classes))
    return nn.Sequential(*layers)
