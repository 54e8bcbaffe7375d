"""DDP: what a rank whose whole batch was unreadable trains on, so that it still takes the step.

Every rank must take the same steps: a rank that skipped one would train on other batches than its
peers from then on, epochs and resume offsets out of step. Agreeing on a skip would cost a collective
per step; instead that rank takes a step on a stand-in batch with its loss weighted 0. Its gradients
are zero, so the averaged update is the other ranks' (scaled by their share), and the stand-in leaves
no other trace: the running statistics of its forward (BatchNorm) are put back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from runner.data import Batch


def stand_in_batch(last_good: Batch | None, input_shape: tuple[int, ...], task: str) -> Batch:
    """The rank's last good batch (a reference, no copy), else one sample of zeros."""
    if last_good is not None:
        return last_good
    inputs = torch.zeros(1, *input_shape)
    targets = inputs.clone() if task == "denoise" else torch.zeros(1, dtype=torch.long)
    return Batch(inputs, targets, 0)


@contextlib.contextmanager
def buffers_kept(model: nn.Module) -> Iterator[None]:
    """Put the model's buffers (BatchNorm's running statistics) back as they were on exit."""
    saved = [b.detach().clone() for b in model.buffers()]
    yield
    with torch.no_grad():
        for buffer, value in zip(model.buffers(), saved, strict=True):
            buffer.copy_(value)
