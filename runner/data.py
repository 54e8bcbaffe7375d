"""Data sources, the sampler that makes order resumable, and a collate that drops unreadable samples.

Sources: `synthetic` (offline, deterministic from the seed), `imagefolder:PATH`,
`paired:NOISY_DIR,CLEAN_DIR`, `mnist:ROOT`, `cifar10:ROOT`, and `package.module:factory`.
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler

from runner.config import TrainConfig
from runner.errors import RunnerError, usage_error
from runner.imports import call_with_known_kwargs, load_object

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
UNREADABLE = (OSError, ValueError, SyntaxError)  # PIL: UnidentifiedImageError is an OSError


# --- synthetic -------------------------------------------------------------------------------

def _generator(seed: int, index: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed * 1_000_003 + index)
    return g


def _shapes(channels: int, size: int, g: torch.Generator) -> torch.Tensor:
    """A clean image with structure: a colour gradient plus a few rectangles and discs."""
    axis = torch.linspace(0, 1, size)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    a, b, c = torch.rand(3, channels, 1, 1, generator=g)
    img = (a * xx + b * yy) * 0.5 + c * 0.3
    for _ in range(int(torch.randint(2, 5, (1,), generator=g))):
        color = torch.rand(channels, 1, 1, generator=g)
        cx, cy, r = (torch.rand(3, generator=g) * torch.tensor([1.0, 1.0, 0.25]) + torch.tensor([0, 0, 0.08]))
        if torch.rand(1, generator=g) < 0.5:
            mask = ((xx - cx).abs() < r) & ((yy - cy).abs() < r * 0.7)
        else:
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
        img = torch.where(mask, color, img)
    return img.clamp(0, 1)


class SyntheticDenoise(Dataset):
    """(noisy, clean) pairs: structured clean images plus Gaussian noise, the same for a seed."""

    def __init__(self, samples: int, channels: int, size: int, sigma: float, seed: int) -> None:
        self.samples, self.channels, self.size, self.sigma, self.seed = samples, channels, size, sigma, seed

    def __len__(self) -> int:
        return self.samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = _generator(self.seed, index)
        clean = _shapes(self.channels, self.size, g)
        noisy = (clean + self.sigma * torch.randn(clean.shape, generator=g)).clamp(0, 1)
        return noisy, clean


class SyntheticClassify(Dataset):
    """Labelled images: a fixed smooth template per class plus noise; learnable in a few steps."""

    def __init__(self, samples: int, channels: int, size: int, num_classes: int, seed: int) -> None:
        self.samples, self.num_classes, self.seed = samples, num_classes, seed
        g = _generator(seed, -1)
        low = torch.rand(num_classes, channels, 4, 4, generator=g)
        self.templates = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear",
                                                         align_corners=False)
        self.targets = [i % num_classes for i in range(samples)]

    def __len__(self) -> int:
        return self.samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        label = self.targets[index]
        g = _generator(self.seed, index)
        noise = 0.25 * torch.randn(self.templates.shape[1:], generator=g)
        return (self.templates[label] + noise).clamp(0, 1), label


# --- files -----------------------------------------------------------------------------------

def _image_transform(size: int, channels: int) -> Callable[[Any], torch.Tensor]:
    from torchvision import transforms

    steps: list[Any] = [transforms.Resize(size), transforms.CenterCrop(size)]
    if channels == 1:
        steps.append(transforms.Grayscale(1))
    steps.append(transforms.ToTensor())
    return transforms.Compose(steps)


def _open_image(path: Path, channels: int) -> Any:
    from PIL import Image

    with Image.open(path) as img:
        img.load()  # truncated files fail here, inside the caller's try
        return img.convert("L" if channels == 1 else "RGB")


class PairedFolders(Dataset):
    """Noisy/clean image pairs matched by file name (the SIDD layout)."""

    def __init__(self, noisy_dir: Path, clean_dir: Path, size: int, channels: int) -> None:
        noisy = {p.name: p for p in _images_in(noisy_dir)}
        clean = {p.name: p for p in _images_in(clean_dir)}
        only_noisy, only_clean = sorted(set(noisy) - set(clean)), sorted(set(clean) - set(noisy))
        if only_noisy or only_clean:
            sample = (only_noisy + only_clean)[:3]
            raise usage_error(
                f"paired data: {len(only_noisy)} file(s) in {noisy_dir} and {len(only_clean)} in {clean_dir} "
                f"have no partner with the same name (e.g. {', '.join(sample)})"
            )
        self.pairs = [(noisy[n], clean[n]) for n in sorted(noisy)]
        self.transform, self.channels = _image_transform(size, channels), channels

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        noisy, clean = self.pairs[index]
        return (self.transform(_open_image(noisy, self.channels)),
                self.transform(_open_image(clean, self.channels)))


def _images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise usage_error(f"data folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise usage_error(f"no images ({', '.join(IMAGE_SUFFIXES[:4])}, ...) in {folder}")
    return files


def _image_folder(root: Path, size: int, channels: int) -> Dataset:
    from torchvision.datasets import ImageFolder

    if not root.is_dir():
        raise usage_error(f"data folder not found: {root}")
    try:
        return ImageFolder(str(root), transform=_image_transform(size, channels),
                           loader=functools.partial(_open_image, channels=channels))
    except FileNotFoundError as exc:
        raise usage_error(f"imagefolder {root}: {exc} (expected one sub-folder per class)") from None


def _torchvision_set(kind: str, root: Path, download: bool, train: bool = True) -> Dataset:
    from torchvision import datasets, transforms

    cls = {"mnist": datasets.MNIST, "cifar10": datasets.CIFAR10}[kind]
    try:
        return cls(str(root), train=train, download=download, transform=transforms.ToTensor())
    except RuntimeError as exc:
        raise usage_error(f"{kind} not found under {root} ({exc}); pass --download to fetch it") from None


# --- unreadable samples ----------------------------------------------------------------------

class Unreadable:
    """What `SkipUnreadable` returns for a sample that failed to load: which file (or index), and why."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


def sample_name(dataset: Dataset, index: int) -> str:
    """The file behind sample `index` where the dataset lists them (ImageFolder's `samples`, `pairs`)."""
    for attr in ("pairs", "samples", "imgs"):
        items = getattr(dataset, attr, None)
        if isinstance(items, list) and index < len(items) and isinstance(items[index], tuple):
            first = items[index][0]
            if isinstance(first, (str, os.PathLike)):
                return str(first)
    return f"sample {index}"


class SkipUnreadable(Dataset):
    """Wraps a dataset: a sample that fails to load (corrupt, truncated, not an image) becomes `Unreadable`."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except UNREADABLE as exc:
            return Unreadable(f"{sample_name(self.dataset, index)} ({type(exc).__name__})")


@dataclass
class Batch:
    """A collated batch, how many samples were dropped from it as unreadable, and which."""

    inputs: torch.Tensor | None
    targets: torch.Tensor | None
    skipped: int
    unreadable: tuple[str, ...] = ()

    def pin_memory(self) -> Batch:
        if self.inputs is not None:
            self.inputs, self.targets = self.inputs.pin_memory(), self.targets.pin_memory()
        return self


def collate_readable(samples: Sequence[Any]) -> Batch:
    """Default collate over the readable samples; counts the unreadable ones."""
    from torch.utils.data import default_collate

    good = [s for s in samples if not isinstance(s, Unreadable)]
    names = tuple(s.name for s in samples if isinstance(s, Unreadable))
    if not good:
        return Batch(None, None, len(names), names)
    inputs, targets = default_collate(good)
    return Batch(inputs, targets, len(names), names)


# --- order -----------------------------------------------------------------------------------

class EpochSampler(Sampler[int]):
    """Seeded per-epoch order (the permutation DistributedSampler uses), optionally weighted.

    `resume_at(k)` drops the first k indices of the next epoch, so a resumed run sees the same
    samples in the same order as an uninterrupted one.
    """

    def __init__(self, size: int, seed: int, weights: torch.Tensor | None = None) -> None:
        self.size, self.seed, self.weights = size, seed, weights
        self.epoch, self._skip = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, offset: int) -> None:
        self._skip = offset

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        if self.weights is None:
            order = torch.randperm(self.size, generator=g)
        else:
            order = torch.multinomial(self.weights, self.size, replacement=True, generator=g)
        skip, self._skip = self._skip, 0
        return iter(order[skip:].tolist())

    def __len__(self) -> int:
        return self.size


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler (same permutation, same split) that can resume mid-epoch."""

    _skip = 0

    def resume_at(self, offset: int) -> None:
        self._skip = offset

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        skip, self._skip = self._skip, 0
        return iter(indices[skip:])


def class_weights(dataset: Dataset) -> torch.Tensor:
    """Per-sample weights 1/frequency(class), for --weighted-sampling."""
    targets = getattr(dataset, "targets", None)
    if targets is None:
        raise usage_error("--weighted-sampling needs a dataset with class labels (.targets)")
    labels = torch.as_tensor(list(targets))
    counts = torch.bincount(labels).float()
    return (1.0 / counts.clamp_min(1))[labels].double()


# --- entry -----------------------------------------------------------------------------------

def build_dataset(cfg: TrainConfig, task: str, source: str = "", train: bool = True) -> Dataset:
    """The dataset `source` names (default: --data); `train=False` for validation data (mnist/cifar10
    take their test split, a factory gets `train=False`)."""
    source = source or cfg.data
    kind, _, arg = source.partition(":")
    if kind == "synthetic":
        if task == "denoise":
            dataset: Dataset = SyntheticDenoise(cfg.samples, cfg.channels, cfg.image_size, cfg.noise_sigma, cfg.seed)
        else:
            dataset = SyntheticClassify(cfg.samples, cfg.channels, cfg.image_size, cfg.num_classes, cfg.seed)
    elif kind == "imagefolder":
        dataset = _image_folder(Path(arg), cfg.image_size, cfg.channels)
    elif kind == "paired":
        noisy, sep, clean = arg.partition(",")
        if not sep:
            raise usage_error("paired data takes two folders: --data paired:NOISY_DIR,CLEAN_DIR")
        dataset = PairedFolders(Path(noisy), Path(clean), cfg.image_size, cfg.channels)
    elif kind in ("mnist", "cifar10"):
        dataset = _torchvision_set(kind, Path(arg), cfg.download, train)
    else:
        factory = load_object(source, what="dataset")
        dataset = call_with_known_kwargs(factory, what=f"dataset factory {source}", image_size=cfg.image_size,
                                         channels=cfg.channels, seed=cfg.seed, train=train)
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise usage_error(f"dataset factory {source} returned {type(dataset).__name__}, not a Dataset")
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise usage_error(f"dataset {source} is empty")
    return dataset


def sample_shape(dataset: Dataset) -> tuple[int, ...]:
    """The input shape (C, H, W) of the first readable sample."""
    for index in range(min(len(dataset), 64)):  # type: ignore[arg-type]
        try:
            return tuple(dataset[index][0].shape)
        except UNREADABLE:
            continue
    raise RunnerError("the first 64 samples of the dataset are all unreadable: check the files")


def build_loader(dataset: Dataset, sampler: Sampler[int], batch_size: int, workers: int, *,
                 pin_memory: bool, start_method: str, worker_init_fn: Callable[[int], None] | None) -> DataLoader:
    """A DataLoader over readable samples; persistent workers so epochs don't respawn them."""
    context = None if start_method == "default" or workers == 0 else start_method
    drop_last = len(sampler) >= batch_size  # avoid a 1-sample last batch (BatchNorm) when possible
    return DataLoader(
        SkipUnreadable(dataset), batch_size=batch_size, sampler=sampler, num_workers=workers,
        collate_fn=collate_readable, pin_memory=pin_memory, drop_last=drop_last,
        persistent_workers=workers > 0, multiprocessing_context=context, worker_init_fn=worker_init_fn,
    )


def shutdown_loader(loader: DataLoader, grace: float = 1.0) -> None:
    """Stop the loader's worker processes within about `grace` seconds, also workers blocked in __getitem__.

    torch's own shutdown joins each worker for 5 s, then terminates it (workers ignore SIGTERM under
    the worker guard). Here: ask every worker to stop, wait `grace` seconds in all, SIGKILL the rest,
    then let torch release its queues and threads (nothing left to wait for).
    """
    iterator = getattr(loader, "_iterator", None)
    loader._iterator = None
    workers = getattr(iterator, "_workers", None)
    if not workers or iterator._shutdown:
        return
    from torch.utils.data._utils import signal_handling

    if iterator._worker_pids_set:  # a worker killed below must not raise "exited unexpectedly" here
        signal_handling._remove_worker_pids(id(iterator))
        iterator._worker_pids_set = False
    iterator._workers_done_event.set()
    for index_queue in iterator._index_queues:
        index_queue.put(None)
    deadline = time.monotonic() + grace
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))
    for worker in workers:
        if worker.is_alive():
            worker.kill()
            worker.join(2.0)
    iterator._shutdown_workers()


def batches_per_epoch(sampler: Sampler[int], batch_size: int) -> int:
    """How many optimizer steps one epoch gives (drop_last as in build_loader)."""
    n = len(sampler)  # type: ignore[arg-type]
    return n // batch_size if n >= batch_size else math.ceil(n / batch_size)
