"""Models for the GPU checks, loaded by `runner train --model scripts.gpu_checks.models:NAME`.

`oom_at_step_3` trains normally for two steps; its third training forward asks the CUDA caching
allocator for more than the per-process budget (PYTORCH_CUDA_ALLOC_CONF=per_process_memory_fraction),
so a real torch.OutOfMemoryError comes from the allocator, with its history in the snapshot.
`stall_at_step_6` trains normally for five steps, then its forward sleeps: a stall for the stall watch.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake

OOM_STEP = 3


class OutOfMemoryAtStep(nn.Module):
    """A small CNN classifier; training call `at_call` allocates 1.5× the process's allowed memory."""

    def __init__(self, channels: int, num_classes: int, at_call: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(16, num_classes))
        self.at_call, self.calls = at_call, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled() and x.is_cuda and not is_fake(x):  # not estimates
            self.calls += 1
            if self.calls == self.at_call:
                total = torch.cuda.get_device_properties(x.device).total_memory
                allowed = total * torch.cuda.get_per_process_memory_fraction(x.device)
                x = x + torch.empty(int(1.5 * allowed), dtype=torch.uint8, device=x.device)[0]
        return self.net(x)


def oom_at_step_3(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    return OutOfMemoryAtStep(in_channels, num_classes, at_call=OOM_STEP)


STALL_STEP = 6  # past the heartbeat's warm-up steps, whose longer allowance would slow the check
STALL_SECONDS = 600.0  # longer than any budget: the stall watch, not the sleep, must end the run


class StallAtStep(OutOfMemoryAtStep):
    """The same small CNN; training call `at_call` sleeps in Python, as a rank stuck outside a collective."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled() and not is_fake(x):
            self.calls += 1
            if self.calls == self.at_call:
                time.sleep(STALL_SECONDS)
        return self.net(x)


def stall_at_step_6(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    return StallAtStep(in_channels, num_classes, at_call=STALL_STEP)
