"""--val-split: hold out a fraction of the training data for validation.

Deterministic by --seed (the same split on every rank and every resume), stratified where the dataset
lists its labels (`.targets`: each class keeps its share on both sides), and the two index sets never
overlap. Below the trainer with the other data code.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from runner.errors import usage_error

SPLIT_SEED_OFFSET = 7919  # the split's own random stream: the run's --seed stream (order, init) stays as it was


class Split(Subset):
    """A Subset that keeps what runner reads from a dataset: `targets` (weighted sampling, the split)
    and `classes` (the model's class count), and the file names behind unreadable samples."""

    def __init__(self, dataset: Dataset, indices: list[int]) -> None:
        super().__init__(dataset, indices)
        targets = getattr(dataset, "targets", None)
        if targets is not None:
            self.targets = [targets[i] for i in indices]
        if hasattr(dataset, "classes"):
            self.classes = dataset.classes
        for attr in ("pairs", "samples", "imgs"):
            items = getattr(dataset, attr, None)
            if isinstance(items, list) and len(items) == len(dataset):  # type: ignore[arg-type]
                setattr(self, attr, [items[i] for i in indices])


def split_indices(size: int, fraction: float, seed: int, labels: Any = None) -> tuple[list[int], list[int]]:
    """(train, validation) indices, disjoint, covering 0..size-1; per label when `labels` is given
    (each class gives round(fraction × its count) samples, at least one where it has two or more)."""
    g = torch.Generator().manual_seed(seed + SPLIT_SEED_OFFSET)
    groups: dict[Any, list[int]] = defaultdict(list)
    if labels is None:
        groups[None] = list(range(size))
    else:
        for index, label in enumerate(labels):
            groups[int(label)].append(index)
    train: list[int] = []
    val: list[int] = []
    for key in sorted(groups, key=lambda k: (k is None, k)):
        members = groups[key]
        order = torch.randperm(len(members), generator=g).tolist()
        held = round(fraction * len(members))
        if held == 0 and len(members) > 1 and labels is not None:
            held = 1
        val.extend(members[i] for i in order[:held])
        train.extend(members[i] for i in order[held:])
    if not val or not train:
        raise usage_error(f"--val-split {fraction} of {size} samples leaves "
                          f"{'no validation' if not val else 'no training'} sample")
    return sorted(train), sorted(val)


def hold_out(dataset: Dataset, fraction: float, seed: int) -> tuple[Split, Split]:
    """(training part, validation part) of `dataset`, stratified by its `.targets` when it has them."""
    labels = getattr(dataset, "targets", None)
    train, val = split_indices(len(dataset), fraction, seed, labels)  # type: ignore[arg-type]
    return Split(dataset, train), Split(dataset, val)
