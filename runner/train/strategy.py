"""Single device, DataParallel, DistributedDataParallel: wrapping, sampling, reducing, who writes.

The loop calls the same methods for all three; only here do they differ.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, Sampler

from runner.config import TrainConfig
from runner.data import EpochSampler, ResumableDistributedSampler, class_weights
from runner.errors import RunnerError, usage_error
from runner.procs import control, heartbeat, rank_exit, stall_watch
from runner.procs.signals import stop_requested

log = logging.getLogger("runner")

LONG_COLLECTIVE_S = 1800.0  # a collective's timeout in long phases (torch's own default for NCCL is 600 s)
STALL_MARGIN_S = 60.0  # the stall watch's capture (py-spy, flight recorder) is over within this


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    """`auto` → cuda:<local rank> when CUDA is available, else cpu; `cuda` without a GPU is an error."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise usage_error("--device cuda but no CUDA device is available (use --device cpu or auto)")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def distributed_env() -> bool:
    """True in a rank started by torchrun (ours or the user's), or any launcher that sets its env://."""
    return all(name in os.environ for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))


def _attempt_store(timeout: timedelta) -> dist.Store | None:
    """The store for a restarted group, or None for torch's default.

    torchrun (torch ≥ 2.5) shares its rendezvous store with the workers and, on a restart, hands the
    new workers the same store without separating attempts: the new group reads the old group's keys
    and hangs in init (pytorch#135712). On one node (one agent, so one restart count for all ranks) a
    prefix per attempt fixes it. Across nodes, where restart counts differ between agents, `runner train`
    turns the sharing off instead (see launch.py).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    if os.environ.get("LOCAL_WORLD_SIZE") != os.environ["WORLD_SIZE"]:
        if os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") != "0" and os.environ["RANK"] == "0":
            log.warning("torchrun --max-restarts over several nodes: export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
                        "before torchrun, or a restarted group may hang in init (pytorch#135712)")
        return None
    store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
    return dist.PrefixStore(f"runner/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


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
        """Sum over ranks, in place (identity on one process)."""
        return tensor

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's object, on the writer (a one-element list on one process)."""
        return [obj]

    def broadcast(self, obj: Any) -> Any:
        """The writer's object, on every rank (identity on one process)."""
        return obj

    def barrier(self) -> None:
        """Wait for every rank (no-op on one process)."""

    def close(self) -> None:
        """Release the process group, if any."""


class DataParallelStrategy(Strategy):
    """`torch.nn.DataParallel` over the visible (or --gpus) GPUs; on fewer than two it still runs."""

    name = "dp"

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        self.device_ids: list[int] = []
        if self.device.type == "cuda":
            self.device_ids = self._gpu_ids(cfg.gpus)
            self.device = torch.device("cuda", self.device_ids[0])
        elif torch.cuda.is_available():
            raise usage_error("--strategy dp splits each batch over GPUs; with --device cpu use --strategy single")
        if len(self.device_ids) < 2:
            log.warning("dp: %s: DataParallel runs the whole batch on %s (nothing to split it over)",
                        "no GPU" if not self.device_ids else "one GPU", self.device)

    @staticmethod
    def _gpu_ids(gpus: str) -> list[int]:
        count = torch.cuda.device_count()
        if not gpus:
            return list(range(count))
        try:
            ids = [int(g) for g in gpus.split(",")]
        except ValueError:
            raise usage_error(f"--gpus takes comma-separated GPU ids like 0,1, got {gpus!r}") from None
        bad = [i for i in ids if not 0 <= i < count]
        if bad or len(set(ids)) != len(ids):
            raise usage_error(f"--gpus {gpus}: ids must be distinct and below the {count} visible GPU(s)")
        return ids

    def wrap(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        return nn.DataParallel(model, device_ids=self.device_ids or None)


class DistributedStrategy(Strategy):
    """One process per device under torchrun: DDP, DistributedSampler, reductions at log points."""

    name = "ddp"

    def __init__(self, cfg: TrainConfig) -> None:
        if not distributed_env():
            raise usage_error("ddp training runs under torchrun: use `runner train --strategy ddp --nproc N` "
                              "or `torchrun --nproc_per_node=N -m runner.train ...`")
        self.rank = int(os.environ["RANK"])
        self.local_rank = int(os.environ["LOCAL_RANK"])
        self.world_size = int(os.environ["WORLD_SIZE"])
        super().__init__(cfg)
        if cfg.sync_bn and self.device.type != "cuda":
            raise usage_error("--sync-bn needs CUDA: SyncBatchNorm layers only work with GPU modules")
        if self.device.type == "cuda":
            local_world, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", "1")), torch.cuda.device_count()
            if local_world > gpus:  # NCCL cannot put two ranks on one GPU
                raise usage_error(f"{local_world} ranks on this node but {gpus} GPU(s): use --nproc {gpus} "
                                  "(or --device cpu)")
            torch.cuda.set_device(self.device)
        if not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            device_id = self.device if self.device.type == "cuda" else None
            timeout = timedelta(minutes=10)
            if backend == "nccl":
                _flight_recorder_folder()
            try:
                dist.init_process_group(backend, timeout=timeout, device_id=device_id, store=_attempt_store(timeout),
                                        rank=self.rank, world_size=self.world_size)
            except (RuntimeError, ValueError) as exc:
                raise RunnerError(f"rank {self.rank}: cannot join the process group ({exc})") from None
            rank_exit.arm()  # gloo's worker threads must not outlive us into interpreter finalization
        self._alive_hook: Any = None
        self._said_alive = False
        self._timeout = 0.0
        beat = heartbeat.current()
        if beat is not None:  # long collective timeout in long phases, --collective-timeout in steady training
            beat.on_regime(self._regime)

    def _regime(self, long: bool) -> None:
        beat = heartbeat.current()
        steady, slow = collective_timeouts(self.cfg, beat.median_step() if beat is not None else None)
        seconds = slow if long else steady
        if seconds != self._timeout:
            self._timeout = seconds
            set_collective_timeout(seconds)

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.cfg.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = model.to(self.device)
        ids = [self.device.index] if self.device.type == "cuda" else None
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self._alive_hook = wrapped.register_forward_pre_hook(lambda _module, _args: self._going_on())
        return wrapped

    def _going_on(self) -> None:
        """This rank began a step or a collective: after a stop signal, tell the supervisor that it is
        not blocked in data loading (control.py); once, then the forward hook goes."""
        if self._said_alive or stop_requested() is None:
            return
        self._said_alive = True
        if self._alive_hook is not None:
            self._alive_hook.remove()
        control.tell(f"alive-{self.local_rank}")

    def sampler(self, dataset: Dataset, seed: int) -> Sampler[int]:
        if self.cfg.weighted_sampling:
            raise usage_error("--weighted-sampling is not supported with --strategy ddp")
        size = len(dataset)  # type: ignore[arg-type]
        if size < self.world_size:
            raise usage_error(f"the dataset has {size} sample(s), fewer than the {self.world_size} ranks")
        return ResumableDistributedSampler(dataset, num_replicas=self.world_size, rank=self.rank,
                                           shuffle=True, seed=seed, drop_last=True)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        self._going_on()
        with heartbeat.collective():
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def gather(self, obj: Any) -> list[Any]:
        self._going_on()
        out: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        with heartbeat.collective():
            dist.gather_object(obj, out, dst=0)
        return out or []

    def broadcast(self, obj: Any) -> Any:
        self._going_on()
        box = [obj]
        with heartbeat.collective():
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        self._going_on()
        with heartbeat.collective():
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def close(self) -> None:
        """Destroy the process group. Called from a `finally` while an exception propagates (this rank
        failed), abort it instead: peers may be inside a collective this rank will never join, and
        NCCL's orderly destroy would wait for them; tell the supervisor, which ends those peers."""
        if not dist.is_initialized():
            return
        failure = sys.exc_info()[1]
        if failure is None:
            self._going_on()
            dist.destroy_process_group()
            return
        lines = str(failure).strip().splitlines()
        control.tell(f"failed-{os.getpid()}", f"rank {self.rank} failed: {type(failure).__name__}"
                                             f"{': ' + lines[0] if lines else ''}")
        try:
            dist.group.WORLD.abort()  # NCCL: abort the communicators; gloo has nothing to abort
        finally:
            dist.destroy_process_group()  # forget the group (no collective, nothing waits on peers)


def collective_timeouts(cfg: TrainConfig, median_step: float | None) -> tuple[float, float]:
    """(steady, long) seconds a collective may wait before the process group fails: --collective-timeout in
    steady training, LONG_COLLECTIVE_S in long phases (start-up, the first steps, checkpoints, evaluation).

    Never shorter than the stall watch's allowance plus STALL_MARGIN_S, so that the watch sees a hang,
    captures the stacks and names the rank first, while every rank is alive (a timeout ends the run). With
    `--stall-timeout auto` the allowance follows this rank's median step as the watch's does.
    """
    stall = cfg.stall_timeout
    if stall == "auto":
        stall = max(stall_watch.AUTO_FLOOR, stall_watch.AUTO_STEPS * (median_step or 0.0))
    steady, slow = float(cfg.collective_timeout), LONG_COLLECTIVE_S
    if float(stall) > 0:
        steady = max(steady, float(stall) + STALL_MARGIN_S)
        slow = max(slow, stall_watch.LONG_FACTOR * float(stall) + STALL_MARGIN_S)
    return steady, slow


def _flight_recorder_folder() -> None:
    """Create the folder NCCL's flight recorder dumps into (`runs/<name>/stall/`, set by the supervisor: see
    runner/procs/stall_watch.py `nccl_environment`): a dump on a collective timeout does not create it."""
    for name in ("TORCH_FR_DUMP_TEMP_FILE", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE"):
        if os.environ.get(name):
            with contextlib.suppress(OSError):
                Path(os.environ[name]).parent.mkdir(parents=True, exist_ok=True)


def set_collective_timeout(seconds: float) -> None:
    """The default process group's timeout for the collectives issued from now on.

    `torch.distributed.set_timeout` is public in the torch this project pins (2.14); older releases only
    have `distributed_c10d._set_pg_timeout` (private, and the same thing), the least private way there is.
    """
    setter = getattr(dist, "set_timeout", None) or getattr(dist.distributed_c10d, "_set_pg_timeout", None)
    if setter is None:
        log.debug("this torch cannot change a process group's timeout; it stays at its initial value")
        return
    try:
        setter(timedelta(seconds=seconds))
    except (RuntimeError, ValueError) as exc:  # a backend that cannot (MPI, UCC) only warns; say why if one raises
        log.debug("could not set the collective timeout to %g s: %s", seconds, exc)


def make_strategy(cfg: TrainConfig) -> Strategy:
    """The strategy the config names; under torchrun with several ranks a `single` request becomes ddp."""
    world = int(os.environ.get("WORLD_SIZE", "1")) if distributed_env() else 1
    if cfg.strategy == "ddp" or world > 1:
        if cfg.strategy == "dp":
            raise usage_error("--strategy dp runs in one process; under torchrun use --strategy ddp")
        return DistributedStrategy(cfg)
    if cfg.strategy == "dp":
        return DataParallelStrategy(cfg)
    return Strategy(cfg)
