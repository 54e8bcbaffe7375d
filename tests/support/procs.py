"""Helpers for tests/test_procs.py and tests/test_cleanup.py: a dataset that blocks in __getitem__, a model
with a slow step, and a bare DataLoader script (no runner around it) to make orphans with.

Imported by import path (`tests.support.procs:blocking_dataset`) from runs the tests start with the
repository root on PYTHONPATH; the bare script runs as `python -m tests.support.procs`. Blocked processes
leave a file `<kind>-<pid>` in $PROCS_TEST_MARKERS so a test knows when to strike.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, get_worker_info

MARKERS_ENV = "PROCS_TEST_MARKERS"
BLOCK_AFTER_ENV = "PROCS_TEST_BLOCK_AFTER"  # items a DataLoader worker serves before it blocks
SLOW_STEP_ENV = "PROCS_TEST_SLOW_STEP"  # forward call that takes "forever"
FOREVER = 600.0


def mark(kind: str) -> None:
    folder = os.environ.get(MARKERS_ENV)
    if folder:
        Path(folder, f"{kind}-{os.getpid()}").write_text(str(os.getpid()))


def marked(folder: Path, kind: str) -> list[int]:
    """Pids that left a `kind` marker in `folder`."""
    return sorted(int(p.name.rsplit("-", 1)[1]) for p in folder.glob(f"{kind}-*"))


class BlockingDataset(Dataset):
    """Two-class images; inside a DataLoader worker, after `block_after` items, it blocks (a hung read)."""

    def __init__(self, size: int, channels: int, samples: int = 64, block_after: int = 8) -> None:
        self.size, self.channels, self.samples, self.block_after = size, channels, samples, block_after
        self.served = 0
        self.targets = [i % 2 for i in range(samples)]

    def __len__(self) -> int:
        return self.samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if get_worker_info() is not None:
            self.served += 1
            if self.served > self.block_after:
                mark("blocked")
                time.sleep(FOREVER)
        label = self.targets[index]
        return torch.full((self.channels, self.size, self.size), float(label)), label


def blocking_dataset(image_size: int, channels: int) -> BlockingDataset:
    return BlockingDataset(image_size, channels, block_after=int(os.environ.get(BLOCK_AFTER_ENV, "8")))


class SlowStepModel(nn.Module):
    """A linear classifier whose forward number $PROCS_TEST_SLOW_STEP takes "forever" (a slow step)."""

    def __init__(self, channels: int, image_size: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(channels * image_size * image_size, num_classes)
        self.calls = 0
        self.slow_at = int(os.environ.get(SLOW_STEP_ENV, "3"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.slow_at:
            mark("slow")
            time.sleep(FOREVER)
        return self.linear(x.flatten(1))


def slow_step_model(channels: int, image_size: int, num_classes: int) -> SlowStepModel:
    return SlowStepModel(channels, image_size, num_classes)


def bare_loader(start_method: str, workers: int, guard: bool) -> None:
    """A plain script's DataLoader (no runner, no tag, no registry) iterating until its workers block."""
    from runner.procs.worker_guard import guarded_worker_init

    loader = DataLoader(BlockingDataset(8, 1, block_after=4), batch_size=2, num_workers=workers,
                        multiprocessing_context=start_method,
                        worker_init_fn=guarded_worker_init(None) if guard else None)
    mark("main")
    for _ in loader:
        pass


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--start-method", default="fork")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--guard", action="store_true")
    args = parser.parse_args()
    bare_loader(args.start_method, args.workers, args.guard)
    sys.exit(0)
