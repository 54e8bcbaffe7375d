"""Single device, DataParallel, DistributedDataParallel: wrapping, sampling, reducing, who writes.

The loop calls the same methods for all three; only here do they differ.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, Sampler

from runner.config import TrainConfig
from runner.data import EpochSampler, ResumableDistributedSampler, class_weights
from runner.errors import RunnerError, usage_error

log = logging.getLogger("runner")


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    """`auto` → cuda:<local rank> when CUDA is available, else cpu; `cuda` without a GPU is an error."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise usage_error("--device cuda but no CUDA device is available (use --device cpu or auto)")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


class Strategy:
    """One process on one device (also the base of the others)."""

    name = "single"
    rank = 0
    local_rank = 0
    world_size = 1

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.device = pick_device(cfg.device, self.local_rank)

    @property
    def is_writer(self) -> bool:
        """Whether this process writes checkpoints and dashboard events (rank 0)."""
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    @staticmethod
    def unwrap(model: nn.Module) -> nn.Module:
        """The user's module inside DataParallel/DDP (for checkpoints and graphs)."""
        return getattr(model, "module", model)

    def sampler(self, dataset: Dataset, seed: int) -> Sampler[int]:
        weights = class_weights(dataset) if self.cfg.weighted_sampling else None
        return EpochSampler(len(dataset), seed, weights)  # type: ignore[arg-type]

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (identity on one process)."""
        return tensor

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's object, on the writer (a one-element list on one process)."""
        return [obj]

    def barrier(self) -> None:
        """Wait for every rank (no-op on one process)."""

    def close(self) -> None:
        """Release the process group, if any."""


class DataParallelStrategy(Strategy):
    """`torch.nn.DataParallel` over the visible (or --gpus) GPUs; on fewer than two it still runs."""

    name = "dp"

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        if cfg.gpus:
            try:
                self.device_ids = [int(g) for g in cfg.gpus.split(",")]
            except ValueError:
                raise usage_error(f"--gpus takes comma-separated GPU ids like 0,1, got {cfg.gpus!r}") from None
            if self.device.type == "cuda":
                self.device = torch.device("cuda", self.device_ids[0])
        else:
            self.device_ids = list(range(torch.cuda.device_count())) if self.device.type == "cuda" else []
        if len(self.device_ids) < 2:
            log.warning("dp: %d GPU(s) visible; DataParallel runs on %s without splitting the batch",
                        len(self.device_ids), self.device)

    def wrap(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        return nn.DataParallel(model, device_ids=self.device_ids or None)


class DistributedStrategy(Strategy):
    """One process per device under torchrun: DDP, DistributedSampler, reductions at log points."""

    name = "ddp"

    def __init__(self, cfg: TrainConfig) -> None:
        if "LOCAL_RANK" not in os.environ:
            raise usage_error("ddp training runs under torchrun: use `runner train --strategy ddp --nproc N`")
        self.rank = int(os.environ["RANK"])
        self.local_rank = int(os.environ["LOCAL_RANK"])
        self.world_size = int(os.environ["WORLD_SIZE"])
        super().__init__(cfg)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        if cfg.sync_bn and self.device.type != "cuda":
            raise usage_error("--sync-bn needs CUDA: SyncBatchNorm layers only work with GPU modules")
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=timedelta(minutes=10))

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.cfg.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = model.to(self.device)
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def sampler(self, dataset: Dataset, seed: int) -> Sampler[int]:
        if self.cfg.weighted_sampling:
            raise usage_error("--weighted-sampling is not supported with --strategy ddp")
        return ResumableDistributedSampler(dataset, num_replicas=self.world_size, rank=self.rank,
                                           shuffle=True, seed=seed, drop_last=True)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size if self.rank == 0 else []
        dist.gather_object(obj, out if self.rank == 0 else None, dst=0)
        return out

    def barrier(self) -> None:
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def make_strategy(cfg: TrainConfig) -> Strategy:
    """The strategy the config names; under torchrun a `single` request still becomes ddp."""
    if cfg.strategy == "ddp" or "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        try:
            return DistributedStrategy(cfg)
        except (RuntimeError, ValueError) as exc:
            raise RunnerError(f"cannot join the process group: {exc}") from None
    if cfg.strategy == "dp":
        return DataParallelStrategy(cfg)
    return Strategy(cfg)
