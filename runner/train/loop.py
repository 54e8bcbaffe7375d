"""The training loop: forward, loss, backward, step — and events to the hub, never a sink.

Host↔device syncs happen only at log points (one `.tolist()` of the stacked window sums) and
before a checkpoint (to check that the state being saved is finite). Everything else the loop
observes is queued as device tensors or host-side readings.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from runner import config as config_io
from runner.config import TrainConfig
from runner.data import Batch, batches_per_epoch, build_dataset, build_loader, sample_shape, shutdown_loader
from runner.errors import RunnerError
from runner.memory import postmortem
from runner.models import build_model
from runner.procs.signals import StopRequested, deferred
from runner.tasks import make_task
from runner.telemetry.events import Graph, Histogram, HParams, ImageGrid, MemorySample, Scalar, Text
from runner.telemetry.hub import Hub
from runner.telemetry.memory import MemoryProbe
from runner.telemetry.model_graph import trace_graph
from runner.telemetry.tensor_stats import grid_event, parameter_stats
from runner.train import checkpoint
from runner.train.strategy import Strategy

log = logging.getLogger("runner")

EXIT_SIGNAL = {"SIGINT": 130, "SIGTERM": 143, "SIGHUP": 129}


class NonFiniteLoss(RunnerError):
    """The loss became NaN/inf under --on-nan stop."""


@dataclass
class Window:
    """Device-side sums since the last log point (no host sync until it is read)."""

    loss: torch.Tensor
    metric: torch.Tensor
    samples: torch.Tensor
    nonfinite: torch.Tensor
    steps: int = 0
    data_wait: float = 0.0
    started: float = 0.0

    @classmethod
    def zeros(cls, device: torch.device) -> "Window":
        z = torch.zeros(4, device=device)
        return cls(z[0], z[1], z[2], z[3], started=time.perf_counter())


def make_optimizer(name: str, params: Any, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """sgd, momentum (SGD, 0.9), adam, adamw."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    """Builds the workload from the config, then runs `fit()`; talks only to the strategy and hub."""

    def __init__(self, cfg: TrainConfig, strategy: Strategy,
                 should_stop: Callable[[], str | None] = lambda: None,
                 interruptible: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> None:
        self.cfg, self.strategy, self.should_stop = cfg, strategy, should_stop
        # A stop signal may end a wait for data at once (a worker can block in __getitem__ for good);
        # not under DDP, where every rank must stop after the same step.
        self.interruptible = interruptible if strategy.world_size == 1 else contextlib.nullcontext
        self.hub = Hub([])
        self.device = strategy.device
        self.rank = strategy.rank
        self.ckpt_path = cfg.run_path / "checkpoints" / "last.pt"
        if cfg.memory_snapshot:
            postmortem.record_history(self.device)
        seed_everything(cfg.seed)
        self.task = make_task(cfg.resolved_task)
        self.dataset = build_dataset(cfg, self.task.name)
        self.input_shape = sample_shape(self.dataset)
        num_classes = len(getattr(self.dataset, "classes", [])) or cfg.num_classes
        self.model = build_model(cfg.model, self.input_shape[0], self.input_shape[-1], num_classes)
        self.batch_size = self._choose_batch_size()
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.wrapped = strategy.wrap(self.model)
        self.model = strategy.unwrap(self.wrapped)  # --sync-bn may have replaced modules
        self.optimizer = make_optimizer(cfg.optimizer, self.wrapped.parameters(), cfg.lr, cfg.weight_decay)
        self.amp_dtype, self.scaler = self._amp()
        self.sampler = strategy.sampler(self.dataset, cfg.seed)
        self.per_epoch = batches_per_epoch(self.sampler, self.batch_size)
        self.total_steps = cfg.steps or (cfg.epochs * self.per_epoch if cfg.epochs else 100)
        self.loader = self._loader()
        self.probe = MemoryProbe(self.device, cfg.system_every)
        self.graph: Graph | None = None
        if cfg.viz != "none" and strategy.is_writer:  # set-up for the dashboards, so that step 1 pays none of it
            import torchvision.utils  # noqa: F401 - image grids (~0.5 s to import)

            if cfg.graph:  # tracing takes ~0.2 s even for Tiny-UNet
                own_rng = torch.Generator(self.device).manual_seed(0)  # the run's random stream stays as it was
                example = torch.rand(2, *self.input_shape, device=self.device, generator=own_rng)
                self.graph = trace_graph(self.model, example, rank=self.rank)
        self.step = 0
        self.skipped = 0
        self.last_good: dict[str, float] = {}
        self.memory_window: list[tuple[int, dict[str, float]]] = []
        self.resumed_from: Path | None = None
        self.phase = "compute"  # where in a step an out-of-memory error hit: compute | update | observe
        self.retry_at: int | None = None  # --oom retry: the batch (of the new size) to go on from
        self.live_estimate: Any = None  # with sinks: measures the activations of the first step, then emits
        self.agreed_stop: str | None = None  # DDP: a stop request every rank has seen (at a log point)

    # --- setup ---------------------------------------------------------------------------

    def _choose_batch_size(self) -> int:
        self.batch_search = None
        if self.cfg.batch_size != "auto":
            return int(self.cfg.batch_size)
        from runner.memory.auto_batch import choose_batch_size

        if self.strategy.is_writer:  # ranks must agree: each epoch has to give all of them the same steps
            share = max(1, len(self.dataset) // self.strategy.world_size)  # the samples one rank sees an epoch
            self.batch_search = choose_batch_size(self.cfg, self.model, self.input_shape, self.device, share)
        return int(self.strategy.broadcast(self.batch_search.chosen if self.batch_search else 0))

    def _amp(self) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
        if not self.cfg.amp:
            return None, None
        if self.device.type == "cuda":
            return torch.float16, torch.amp.GradScaler("cuda")
        log.info("amp on CPU: bfloat16 autocast, no GradScaler")
        return torch.bfloat16, None

    def _loader(self) -> torch.utils.data.DataLoader:
        from runner.procs.worker_guard import guarded_worker_init

        return build_loader(self.dataset, self.sampler, self.batch_size, self.cfg.workers,
                            pin_memory=self.device.type == "cuda", start_method=self.cfg.worker_start_method,
                            worker_init_fn=guarded_worker_init(None) if self.cfg.workers else None)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    # --- checkpoints ---------------------------------------------------------------------

    def _resume_path(self) -> Path | None:
        if self.cfg.resume == "never":
            return None
        if self.cfg.resume == "auto":
            return self.ckpt_path if self.ckpt_path.is_file() else None
        return Path(self.cfg.resume)

    def _read_resume(self) -> tuple[Path | None, dict[str, Any] | None, tuple[str, int] | None]:
        path = self._resume_path()
        if path is None:
            return None, None, None
        try:
            return path, checkpoint.load(path), None
        except RunnerError as exc:
            return path, None, (str(exc), exc.code)

    def resume(self) -> None:
        """Load model, optimizer, scaler, step and RNG from --resume (auto: this run's last.pt).

        Rank 0 reads the file and sends it to every rank, so all resume from the same step, with or
        without a filesystem shared between nodes.
        """
        found = self._read_resume() if self.strategy.is_writer else None
        path, state, error = self.strategy.broadcast(found)
        if error is not None:
            raise RunnerError(*error)
        if state is None:
            return
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise RunnerError(f"checkpoint {path} does not fit this model/optimizer ({str(exc).splitlines()[0]})",
                              2) from None
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.skipped = int(state.get("skipped", 0))
        if "rng" in state:
            torch.set_rng_state(state["rng"])
        self.resumed_from = path

    def save_checkpoint(self) -> None:
        """Rank 0 writes last.pt atomically; every rank waits so an immediate load is safe."""
        if self.strategy.is_writer:
            state = {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else {},
                "step": self.step,
                "skipped": self.skipped,
                "rng": torch.get_rng_state(),
                "config": config_io.dumps(self.cfg),
            }
            checkpoint.save(state, self.ckpt_path)
        self.strategy.barrier()

    # --- the loop ------------------------------------------------------------------------

    def fit(self, hub: Hub) -> int:
        """Train to `total_steps` (or a stop request), emitting to `hub`; returns the exit code."""
        self.hub = hub
        if self.hub.active:
            self._emit_start()
        window = Window.zeros(self.device)
        stop_reason: str | None = None
        epoch, offset = divmod(self.step, self.per_epoch) if self.per_epoch else (0, 0)
        while self.step < self.total_steps and stop_reason is None:
            self.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
            if offset:
                self.sampler.resume_at(offset * self.batch_size)  # type: ignore[attr-defined]
            epoch_good = self._run_epoch(window, first_batch=offset)
            if self.retry_at is not None:  # --oom retry halved the batch: this epoch goes on where it failed
                offset, self.retry_at = self.retry_at, None
                continue
            stop_reason = self._stop_requested()
            if epoch_good == 0 and stop_reason is None and self.step < self.total_steps:
                raise RunnerError(f"every sample of {self.cfg.data} in epoch {epoch} was unreadable: "
                                  "check the files (the run stopped before doing anything)")
            epoch, offset = epoch + 1, 0
            if stop_reason is None:
                stop_reason = self._stop_requested()
        if window.steps:
            self._log_point(window)
        self.save_checkpoint()
        status = f"stopped by {stop_reason} at step {self.step}" if stop_reason else f"finished at step {self.step}"
        self._emit_end(status)
        return EXIT_SIGNAL.get(stop_reason or "", 1 if stop_reason else 0)

    def _run_epoch(self, window: Window, first_batch: int) -> int:
        """One pass over the loader (or until the step budget / a stop request). Returns good samples."""
        good = 0
        epoch_skipped = 0
        with deferred():  # workers start here (the first time) and must not get a stop signal half-started
            batches = iter(self.loader)
        for index in range(first_batch, self.per_epoch):
            waited = time.perf_counter()
            try:
                with self.interruptible():
                    batch: Batch | None = next(batches, None)
            except StopRequested:
                break
            wait = time.perf_counter() - waited
            if batch is None:
                break
            epoch_skipped += batch.skipped
            self.skipped += batch.skipped
            if batch.inputs is None:
                continue
            good += batch.inputs.shape[0]
            window.data_wait += wait
            failure = None
            try:
                self._step(batch, window)
            except torch.OutOfMemoryError as exc:  # captured while the failed step's tensors are alive
                failure = postmortem.capture(exc, self.device, self.oom_dir, self.cfg.memory_snapshot)
            if failure is not None:
                del batch
                self._out_of_memory(failure, window, batches_done=index + (self.phase == "observe"))
                break
            if self.step >= self.total_steps or self._stop_requested():
                break
        if epoch_skipped and self.hub.active:
            self.hub.emit(Text(tag="status", step=self.step, rank=self.rank,
                               text=f"epoch done: skipped {epoch_skipped} unreadable sample(s)"))
        del batches  # shut down non-persistent iterators promptly
        return good

    def _step(self, batch: Batch, window: Window) -> None:
        cfg = self.cfg
        self.phase = "compute"
        inputs = batch.inputs.to(self.device, non_blocking=True)
        targets = batch.targets.to(self.device, non_blocking=True)
        with self._autocast(), self._first_step_probe(inputs, targets):
            output = self.wrapped(inputs)
            loss = self.task.loss(output, targets)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        finite = torch.isfinite(loss.detach())
        if cfg.on_nan == "skip" and self._nonfinite_anywhere(finite):  # one sync per step, only in skip mode
            self.optimizer.zero_grad(set_to_none=True)
            log.warning("step %d: non-finite loss, step skipped (--on-nan skip)", self.step + 1)
            return
        self.phase = "update"  # an error from here on may leave the weights half-updated
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.step += 1
        self.phase = "observe"
        n = inputs.shape[0]
        window.loss += loss.detach().float() * n
        window.metric += self.task.metric_sum(output, targets)
        window.samples += n
        window.nonfinite += (~finite).float()
        window.steps += 1
        self._observe(inputs, output, targets)
        if self.step % cfg.log_every == 0 or self.step == self.total_steps:
            self._log_point(window)
        if self.step % cfg.checkpoint_every == 0:
            self._check_finite(window)
            self.save_checkpoint()

    def _nonfinite_anywhere(self, finite: torch.Tensor) -> bool:
        """Whether any rank's loss is NaN/inf (DDP averaged that rank's gradients into everyone's)."""
        return bool(self.strategy.all_reduce_sum((~finite).float().reshape(1)) > 0)

    def _stop_requested(self) -> str | None:
        """A stop request (a signal). Under DDP only one agreed at a log point counts: ranks get signals
        between different steps, yet must all stop after the same one."""
        return self.should_stop() if self.strategy.world_size == 1 else self.agreed_stop

    def _first_step_probe(self, inputs: torch.Tensor, targets: torch.Tensor) -> contextlib.AbstractContextManager:
        """The first step with sinks: count what autograd saves, for the memory estimate events."""
        live, self.live_estimate = self.live_estimate, None
        return live.measure(inputs, targets) if live is not None else contextlib.nullcontext()

    # --- out of memory -------------------------------------------------------------------

    @property
    def oom_dir(self) -> Path:
        return self.cfg.run_path / "oom" / (f"rank{self.rank}" if self.rank else "")

    def _out_of_memory(self, failure: postmortem.Capture, window: Window, batches_done: int) -> None:
        """Free what the failed step held. --oom retry: halve the batch and go on from the same sample.
        Otherwise checkpoint the last good step (the state in memory, when it is that), write the
        post-mortem and stop with its diagnosis (exit 1)."""
        from runner.memory.trial import release

        step = self.step + (self.phase != "observe")
        release(self.model, self.device)
        if self.cfg.oom == "retry" and self.batch_size > 1 and self.phase != "update" and self.strategy.world_size == 1:
            old, self.batch_size = self.batch_size, self.batch_size // 2
            shutdown_loader(self.loader)
            self.loader, self.per_epoch = self._loader(), batches_per_epoch(self.sampler, self.batch_size)
            self.retry_at = batches_done * old // self.batch_size
            text = f"out of memory at step {step} with batch {old}: going on with batch {self.batch_size} (--oom retry)"
            log.warning(text)
            if self.hub.active:
                self.hub.emit(Text(tag="memory_oom", step=self.step, rank=self.rank, text=text))
            return
        unsafe = postmortem.unsafe_to_save(self.phase, self.strategy.world_size,
                                           self.cfg.on_nan == "stop" and bool(window.nonfinite > 0))
        if unsafe is None:
            self.save_checkpoint()
        raise postmortem.report(failure, self.cfg, self.model, self.input_shape, self.batch_size, self.device, step,
                                saved=unsafe or f"{self.ckpt_path} holds step {self.step}; rerun with the same "
                                                "--name to go on from there")

    def _observe(self, inputs: torch.Tensor, output: Any, targets: torch.Tensor) -> None:
        cfg, step, world, hub = self.cfg, self.step, self.strategy.world_size, self.hub
        if step % cfg.memory_every == 0 and (world > 1 or hub.wants(MemorySample)):
            sample = self.probe.sample()
            if hub.active:
                hub.emit(MemorySample(tag="memory", step=step, rank=self.rank, values=sample, world_size=world))
            if world > 1:
                self.memory_window.append((step, sample))
        if (step % cfg.images_every == 0 or step == 1) and hub.wants(ImageGrid):
            hub.emit(grid_event(self.task.grid(inputs, output, targets), step, self.rank))
        if (step % cfg.hist_every == 0 or step == 1) and hub.wants(Histogram):
            for event in parameter_stats(self.model, step, self.rank):
                self.hub.emit(event)

    # --- log points ----------------------------------------------------------------------

    def _check_finite(self, window: Window) -> None:
        """Before a checkpoint: no rank may have seen a NaN/inf loss since the last log point."""
        if self.cfg.on_nan == "stop" and bool(self.strategy.all_reduce_sum(window.nonfinite.clone()) > 0):
            raise NonFiniteLoss(
                f"loss became NaN/inf before step {self.step}; stopped (last good checkpoint: {self.ckpt_path}). "
                "Lower --lr, check the data, or pass --on-nan skip")

    def _log_point(self, window: Window) -> None:
        """Reduce the window across ranks (the one sync), emit scalars, start a new window."""
        elapsed = time.perf_counter() - window.started
        host = torch.tensor([window.data_wait, float(self.skipped), float(self.should_stop() is not None)],
                            device=self.device)
        sums = torch.cat([torch.stack([window.loss, window.metric, window.samples, window.nonfinite]), host])
        loss_sum, metric_sum, samples, nonfinite, wait, skipped, stops = self.strategy.all_reduce_sum(sums).tolist()
        world = self.strategy.world_size
        if stops and self.agreed_stop is None:
            self.agreed_stop = self.should_stop() or "a stop request on another rank"
        if nonfinite and self.cfg.on_nan == "stop":
            raise NonFiniteLoss(
                f"loss became NaN/inf before step {self.step}; stopped (last good checkpoint: {self.ckpt_path}). "
                "Lower --lr, check the data, or pass --on-nan skip")
        self._gather_memory()
        samples = max(samples, 1.0)
        values = {
            f"train/{self.task.metric_name}": metric_sum / samples,
            "train/lr": self.optimizer.param_groups[0]["lr"],
            "train/samples_per_s": samples / max(elapsed, 1e-9),
            "train/step_time_ms": 1000 * elapsed / window.steps,
            "train/data_wait_ms": 1000 * wait / world / window.steps,
            "train/skipped": skipped,
            "telemetry/dropped": float(self.hub.dropped),
            "train/loss": loss_sum / samples,  # last: the console prints its line on it
        }
        if self.scaler is not None:
            values["train/amp_scale"] = float(self.scaler.get_scale())
        self.last_good = values
        if self.hub.active:
            for tag, value in values.items():
                self.hub.emit(Scalar(tag=tag, step=self.step, rank=self.rank, value=value))
        self.probe.reset_peak()
        for t in (window.loss, window.metric, window.samples, window.nonfinite):
            t.zero_()
        window.steps, window.data_wait, window.started = 0, 0.0, time.perf_counter()

    def _gather_memory(self) -> None:
        """DDP: every rank's per-step memory since the last log point, shown per rank on rank 0."""
        if self.strategy.world_size == 1:
            return
        everyone = self.strategy.gather(self.memory_window)
        self.memory_window = []
        if not self.hub.active:
            return
        for rank, samples in enumerate(everyone):
            if rank == self.rank:
                continue  # rank 0 emitted its own live
            for step, values in samples:
                self.hub.emit(MemorySample(tag="memory", step=step, rank=rank, values=values,
                                               world_size=len(everyone)))
        key = "allocated" if self.device.type == "cuda" else "rss"
        latest = [samples[-1][1][key] for samples in everyone if samples]
        if latest:
            lo, hi = min(latest), max(latest)
            for tag, value in (("min", lo), ("max", hi), ("skew", (hi - lo) / max(hi, 1.0))):
                self.hub.emit(Scalar(tag=f"memory/ranks_{key}_{tag}", step=self.step, rank=self.rank, value=value))

    # --- start and end -------------------------------------------------------------------

    def _emit_start(self) -> None:
        emit = self.hub.emit
        emit(Text(tag="config", step=self.step, rank=self.rank, text=config_io.dumps(self.cfg)))
        if self.resumed_from is not None:
            emit(Text(tag="status", step=self.step, rank=self.rank,
                      text=f"resumed from {self.resumed_from} at step {self.step}"))
        params = sum(p.numel() for p in self.model.parameters())
        emit(Text(tag="status", step=self.step, rank=self.rank,
                  text=(f"training {self.cfg.model} ({params:,} parameters) on {self.device}, "
                        f"{self.strategy.name} x{self.strategy.world_size}, batch {self.batch_size}, "
                        f"steps {self.step}→{self.total_steps}")))
        if self.batch_search is not None:
            emit(Text(tag="auto_batch", step=self.step, rank=self.rank, text=self.batch_search.text()))
        from runner.memory.live import LiveEstimate

        self.live_estimate = LiveEstimate(self.cfg, self.model, self.input_shape, self.batch_size, self.device.type,
                                          emit, self.step, self.rank)  # measures the first step's activations
        if self.graph is not None and self.step == 0 and self.hub.wants(Graph):
            emit(self.graph)

    def _emit_end(self, status: str) -> None:
        if not self.hub.active:
            return
        self.hub.emit(Text(tag="status", step=self.step, rank=self.rank, text=status))
        hparams = {k: v for k, v in self.cfg.to_dict().items()
                   if k in ("model", "data", "optimizer", "lr", "batch_size", "image_size", "amp", "strategy", "seed")}
        hparams["batch_size"] = self.batch_size
        metrics = {k: v for k, v in self.last_good.items() if k in ("train/loss", f"train/{self.task.metric_name}")}
        self.hub.emit(HParams(tag="hparams", step=self.step, rank=self.rank, hparams=hparams, metrics=metrics))

    def close(self) -> None:
        try:
            shutdown_loader(self.loader)  # persistent workers: also those blocked in __getitem__
        finally:
            self.probe.close()
