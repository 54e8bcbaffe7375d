"""DDP: what a rank whose whole batch was unreadable trains on, so that it still takes the step.

Every rank must take the same steps: a rank that skipped one would train on other batches than its
peers from then on, epochs and resume offsets out of step. Agreeing on a skip would cost a collective
per step; instead that rank takes a step on a stand-in batch with its loss weighted 0. Its gradients
are zero, so the averaged update is the other ranks' (scaled by their share), and the stand-in leaves
no other trace: its forward updates copies of the running statistics (BatchNorm), dropped afterwards.
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
    """The stand-in's forward updates copies of the model's buffers (BatchNorm's running statistics,
    its batch count); on exit the modules get their own buffers back, untouched.

    Why swap rather than copy the old values back in place: in training mode BatchNorm saves its running
    statistics for the backward pass, and autograd checks that a saved tensor was not modified since. An
    in-place restore between forward and backward bumps their version and the backward fails ("one of the
    variables needed for gradient computation has been modified by an inplace operation: [torch.FloatTensor
    [64]] is at version 3; expected version 2"). The copies stay with the graph, the originals are never
    written. (DDP's own buffer broadcast at the start of a forward lands in the copies too; the next
    forward broadcasts rank 0's buffers again, so every rank stays in step.)
    """
    swapped: list[tuple[nn.Module, str, torch.Tensor]] = []
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            swapped.append((module, name, buffer))
            setattr(module, name, buffer.detach().clone())  # assigning a tensor to a buffer's name replaces it
    try:
        yield
    finally:
        for module, name, buffer in swapped:
            setattr(module, name, buffer)
