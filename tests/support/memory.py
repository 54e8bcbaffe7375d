"""Import-path models and data for the memory tests. The models' forward raises a real
torch.OutOfMemoryError, as a GPU would, at a chosen training call or above a batch size ("memory"
for only so many samples); the dataset logs the order in which samples are served."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake
from torch.utils.data import Dataset


class OutOfMemoryModel(nn.Module):
    """The tutorial MLP whose training forward raises torch.OutOfMemoryError at call `at_call`
    (counting real training calls only: not estimates on fake tensors, not eval-mode graph tracing)
    or for any batch larger than `max_batch`; with `cudnn`, the RuntimeError a cuDNN 9 workspace
    allocation failure raises instead."""

    def __init__(self, in_features: int, num_classes: int, at_call: int = 0, max_batch: int = 0,
                 cudnn: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, 32), nn.ReLU(), nn.Linear(32, num_classes))
        self.at_call, self.max_batch, self.calls, self.cudnn = at_call, max_batch, 0, cudnn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled() and not is_fake(x):
            self.calls += 1
            if self.calls == self.at_call or 0 < self.max_batch < x.shape[0]:
                if self.cudnn:
                    raise RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED")
                raise torch.OutOfMemoryError(
                    f"CUDA out of memory. Tried to allocate 2.00 GiB (injected: call {self.calls}, batch "
                    f"{x.shape[0]}). GPU 0 has a total capacity of 8.00 GiB of which 1.00 GiB is free.")
        return self.net(x)


OOM_STEP = 3


def oom_at_step_3(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """Steps 1 and 2 train; step 3 runs out of memory in forward."""
    return OutOfMemoryModel(in_channels * image_size * image_size, num_classes, at_call=OOM_STEP)


def cudnn_failure_at_step_3(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """Steps 1 and 2 train; step 3's forward fails to allocate a cuDNN workspace (a RuntimeError)."""
    return OutOfMemoryModel(in_channels * image_size * image_size, num_classes, at_call=OOM_STEP, cudnn=True)


def oom_above_batch_4(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """Any batch of more than 4 samples runs out of memory."""
    return OutOfMemoryModel(in_channels * image_size * image_size, num_classes, max_batch=4)


INDEX_LOG = "RUNNER_TEST_INDEX_LOG"  # indexed_dataset: the file each fetched index is appended to


class IndexedDataset(Dataset):
    """32 labelled images that write each index they serve to $RUNNER_TEST_INDEX_LOG, in order."""

    def __init__(self, channels: int, image_size: int) -> None:
        self.shape, self.log = (channels, image_size, image_size), Path(os.environ[INDEX_LOG])
        self.targets = [i % 10 for i in range(32)]

    def __len__(self) -> int:
        return 32

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        with self.log.open("a") as fh:
            fh.write(f"{index}\n")
        return torch.rand(self.shape, generator=torch.Generator().manual_seed(index)), self.targets[index]


def indexed_dataset(channels: int, image_size: int) -> Dataset:
    return IndexedDataset(channels, image_size)
