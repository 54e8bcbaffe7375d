"""`runner.observe`: runner's observability around a loop someone else wrote.

The run is assembled from the same parts as `runner train` (runner/train/run.py): the run registry and
tag, the strategy (rank, world, the log point's gather), the memory probe, the `Reporter` and its hub,
the writer rank's sinks (console, diagnosis rules and summary, TensorBoard, Visdom), env.json. What
differs is who drives the step: the caller's loop, timed by hooks (timing.py) and told about each
optimizer step through `step()`.

Per step `step()` adds device work only (the window's sums, the reporter's per-step observations);
values are read at log points, whose one sync (the window's reduction) lands every copy.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from runner.config import TrainConfig
from runner.data import shutdown_loader
from runner.diagnosis import provenance
from runner.own_loop.timing import StepTiming
from runner.own_loop.watch import OwnLoopWatch
from runner.probes.memory import MemoryProbe
from runner.probes.model_graph import trace_graph
from runner.procs import registry
from runner.procs.run_tag import Membership, join_run
from runner.procs.signals import STOP_SIGNALS, GracefulStop, deferred
from runner.procs.worker_guard import guarded_worker_init
from runner.run_dir import prepare_run_dir
from runner.tasks import make_task
from runner.telemetry import tags
from runner.telemetry.events import Scalar
from runner.telemetry.hub import Hub
from runner.train.grad_norms import GradNormMeter, GradNorms
from runner.train.health_window import HealthWindow
from runner.train.log_window import LogWindow
from runner.train.reporting import Reporter
from runner.train.sinks import build_sinks
from runner.train.step_clock import StepClock
from runner.train.strategy import Strategy, make_strategy

log = logging.getLogger("runner")


class LossOnly:
    """The task of a loop that names none: its loss, no metric, no image grid."""

    name = "own"
    metric_names: tuple[str, ...] = ()

    def metrics(self, _output: Any, _target: Any) -> dict[str, torch.Tensor]:
        return {}


def _task(task: Any) -> Any:
    if task is None:
        return LossOnly()
    if isinstance(task, str):
        return make_task(task)
    return task  # the caller's object: metrics(output, target) -> sums, and optionally grid(...)


def _batch_size(inputs: Any) -> int:
    """Samples in a batch: the first dimension of `inputs` (or of its first tensor), else 1."""
    if isinstance(inputs, dict):
        inputs = next(iter(inputs.values()), None)
    elif isinstance(inputs, (tuple, list)):
        inputs = inputs[0] if inputs else None
    return int(inputs.shape[0]) if isinstance(inputs, torch.Tensor) and inputs.dim() else 1


def _signal_code(name: str | None) -> int:
    """0, or the exit code a process ended by that stop signal has (130 for SIGINT)."""
    return 128 + signal.Signals[name].value if name else 0


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


class _GuardedLoader(DataLoader):
    """A DataLoader whose workers start with stop signals held back (they ignore them from their first
    instruction on, see worker_guard), as `runner train`'s do."""

    def __iter__(self) -> Any:
        with deferred():
            return super().__iter__()


class Observer:
    """The context manager `runner.observe` returns; see `runner.observe` for its use."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig, task: Any) -> None:
        self.model, self.optimizer, self.cfg = model, optimizer, cfg
        self.raw_model: nn.Module = getattr(model, "module", model)  # DDP / DataParallel: the user's module
        self.task = _task(task)
        self.device = _device_of(model)
        self.step_count = 0
        self.batch_size = 0
        self.agreed_stop: str | None = None
        self._user: dict[str, tuple[Any, int]] = {}  # obs.log's sums and counts over the window
        self._loaders: weakref.WeakSet[DataLoader] = weakref.WeakSet()
        self._previous_handlers: dict[int, Any] = {}
        self._membership: Membership | None = None
        self._owns_group = False
        self._started = False
        self._log_level: int | None = None  # the runner logger's level, lowered to warnings on ranks > 0

    # --- the run's start and end -------------------------------------------------------------

    def __enter__(self) -> Observer:
        cfg = self.cfg
        self.stop = GracefulStop()
        if threading.current_thread() is threading.main_thread():
            self._previous_handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
            self.stop.install()
        else:
            log.warning("runner.observe outside the main thread: Ctrl+C does not set obs.should_stop")
        self._membership = join_run(cfg.name, str(cfg.run_path.resolve()))
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        self.watch = OwnLoopWatch(cfg, self._membership.run_id, rank, world)
        try:
            self.watch.start()  # before the process group: joining it may hang too
            self._owns_group = not (dist.is_available() and dist.is_initialized())
            self.strategy: Strategy = make_strategy(cfg)
            self._owns_group = self._owns_group and dist.is_available() and dist.is_initialized()
            self.strategy.device = self.device  # the caller placed the model: its device is the run's
            prepare_run_dir(cfg)
            watcher = frozenset([self.watch.watcher.pid] if self.watch.watcher is not None else [])
            self.probe = MemoryProbe(self.device, cfg.system_every, not_workers=watcher)  # workers: the loader's
            self.reporter = Reporter(cfg, self.strategy, self.task, self.probe)
            if self.strategy.is_writer:
                provenance.write(cfg.run_path, cfg.to_dict(), self.strategy.world_size, extra=self._loop_record())
                self.reporter.hub = Hub(build_sinks(cfg, cfg.steps))
                self.watch.feed_into(self.reporter.hub.emit)
            else:
                self._log_level = log.level
                log.setLevel(logging.WARNING)  # rank 0 says what every rank would; warnings still come from all
            self.window = LogWindow(self.device)
            self.clock = StepClock(self.device)
            self.meter = GradNormMeter(self.raw_model)  # gradient norms every step, as runner train's
            self.health = HealthWindow(self.device, self.meter.names)
            self.norms: GradNorms | None = None
            self.timing = StepTiming(self.model, self.optimizer, self.clock, self._before_update, self._after_update)
        except BaseException:
            self._close()
            raise
        self.clock.enter("data_wait")
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, _tb: Any) -> None:
        try:
            if exc is None and self.window.steps:  # on a failure, no collective another rank may never join
                self.clock.enter("telemetry")
                self._log_point()
            if self._started:
                if exc is not None:
                    status, text = "failed", f"failed: {exc}" if str(exc) else f"failed: {type(exc).__name__}"
                elif self.stop_reason:
                    status, text = "stopped", f"stopped by {self.stop_reason} at step {self.step_count}"
                else:
                    status, text = "finished", f"finished at step {self.step_count}"
                self.reporter.end(self.step_count, self.batch_size, text, status)
        finally:
            self._close(1 if exc is not None else _signal_code(self.stop.reason()))

    def _close(self, code: int = 1) -> None:
        """Undo everything __enter__ did, in reverse, whatever failed; `code`: how the run ended, as an
        exit code would say it (0, 128 + a stop signal, 1), for the registry (`runner runs`)."""
        try:
            if hasattr(self, "watch"):
                self.watch.stop()  # the teardown (the dashboards' last deliveries) is nothing to watch
            if hasattr(self, "timing"):
                self.timing.remove()
            for loader in list(self._loaders):
                shutdown_loader(loader)
            if hasattr(self, "probe"):
                self.probe.close()
            if hasattr(self, "reporter") and not self.reporter.hub.close(timeout=30.0):
                log.warning("some dashboard events were not delivered before exit")
        finally:
            if self._owns_group and hasattr(self, "strategy"):
                self.strategy.close()
            if self._membership is not None:
                self._ended(code)
                self._membership.leave()
            for sig, handler in self._previous_handlers.items():
                signal.signal(sig, handler)
            if self._log_level is not None:
                log.setLevel(self._log_level)

    def _ended(self, code: int) -> None:
        """Record the end in the registry where this process started the run (a hand-started torchrun's
        runs belong to its agent): the run is over, though the process may go on (a notebook)."""
        run_id = self._membership.run_id if self._membership is not None else None
        if run_id is None or not self._membership.set_tag or "TORCHELASTIC_RUN_ID" in os.environ:
            return
        run = registry.load_run(registry.runs_dir() / run_id)
        if run is not None:
            try:
                registry.finish_run(run, code)
            except OSError as exc:
                log.warning("run registry: the end of %s not recorded (%s)", run_id, exc)

    def _loop_record(self) -> dict[str, Any]:
        """What env.json says about the caller's loop beyond the config: model and optimizer as given."""
        groups = [{k: v for k, v in group.items() if k != "params" and isinstance(v, (int, float, bool, str))}
                  for group in self.optimizer.param_groups]
        return {"own_loop": {"model": f"{type(self.raw_model).__module__}.{type(self.raw_model).__qualname__}",
                             "parameters": sum(p.numel() for p in self.raw_model.parameters()),
                             "optimizer": type(self.optimizer).__name__, "param_groups": groups,
                             "device": str(self.device), "task": getattr(self.task, "name", type(self.task).__name__)}}

    def _start(self, inputs: Any) -> None:
        """At the first step, when the batch is known: the graph (from the first inputs), then the
        start's events (config, status, HParams, graph) through the Reporter."""
        self._started = True
        self.batch_size = _batch_size(inputs)
        cfg, writer = self.cfg, self.strategy.is_writer
        if writer and cfg.graph and cfg.viz != "none" and isinstance(inputs, torch.Tensor) and inputs.dim():
            self.timing.paused = True  # the trace runs the model: not a step's forward
            try:
                self.reporter.graph = trace_graph(self.raw_model, inputs[:2].detach(), rank=self.strategy.rank)
            finally:
                self.timing.paused = False
        if not self.reporter.hub.active:
            return
        params = sum(p.numel() for p in self.raw_model.parameters())
        total = f", steps 0→{cfg.steps}" if cfg.steps else ""
        text = (f"training {type(self.raw_model).__name__} ({params:,} parameters) on {self.device}, own loop, "
                f"{self.strategy.name} x{self.strategy.world_size}, batch {self.batch_size}{total}")
        shape = tuple(inputs.shape[1:]) if isinstance(inputs, torch.Tensor) else ()
        self.reporter.start(0, text, None, None, self.raw_model, shape, self.batch_size)

    # --- every step --------------------------------------------------------------------------

    def step(self, loss: torch.Tensor | float, inputs: Any = None, outputs: Any = None, targets: Any = None,
             samples: int | None = None) -> None:
        """One optimizer step done: its loss (a tensor is never read here), and optionally the batch's
        inputs, the model's outputs and the targets (image grids, the task's metrics, the graph);
        `samples`: the batch's size where `inputs` (its first dimension) does not say it."""
        self.clock.enter("telemetry")
        if not self._started:
            self._start(inputs)
        self.step_count += 1
        self.watch.step(self.step_count)
        n = samples or _batch_size(inputs)
        if isinstance(loss, torch.Tensor):
            value = loss.detach().float().reshape(())
        else:
            value = torch.tensor(float(loss), device=self.device)
        metrics = self.task.metrics(outputs, targets) if outputs is not None and targets is not None else {}
        norms, self.norms = self.norms, None
        finite = torch.isfinite(value) & torch.isfinite(norms.total) if norms is not None else torch.isfinite(value)
        self.window.add(value * n, metrics, n, finite, None)
        self.health.add(self.step_count, value, finite, norms)
        usable = inputs is not None and outputs is not None and targets is not None
        self.reporter.observe(self.step_count, self.raw_model, inputs if usable else None, outputs, targets,
                              with_histograms=False)  # taken after the update (_after_update)
        if self.step_count % self.cfg.log_every == 0 or self.step_count == self.cfg.steps:
            self._log_point()
        self.clock.enter("data_wait")

    def _before_update(self) -> None:
        """The optimizer's pre-hook: this step's gradient norms (device work; read at the log point)."""
        self.norms = self.meter.measure()

    def _after_update(self) -> None:
        """The optimizer's post-hook: histograms of the step about to be reported, gradients included."""
        self.reporter.parameter_histograms(self.step_count + 1, self.raw_model)

    def log(self, values: dict[str, Any]) -> None:
        """The loop's own scalars (`train/<name>` unless the name has a group, `group/name`); tensors stay
        on the device, summed until the next log point, where their mean over the window is logged. Call
        it before `step()`: a value logged after the log point's step counts in the next window."""
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().float().reshape(())
            total, count = self._user.get(name, (0.0, 0))
            self._user[name] = (total + value, count + 1)

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Around the loop's own validation: its time stays out of the step breakdown (it would read as
        data wait, the gap between steps) and the stall watch allows it an evaluation's longer time."""
        self.timing.paused = True
        try:
            with self.clock.apart():
                yield
        finally:
            self.timing.paused = False

    def eval(self, values: dict[str, Any], step: int | None = None) -> None:
        """Validation values, logged now as `val/<name>` (read at once: evaluation is not a training step)."""
        if not self.reporter.hub.active:
            return
        at = self.step_count if step is None else step
        for name, value in values.items():
            tag = name if name.startswith(tags.VAL) else tags.val(name)
            self.reporter.hub.emit(Scalar(tag=tag, step=at, rank=self.strategy.rank, value=float(value)))

    # --- log points --------------------------------------------------------------------------

    def _log_point(self) -> None:
        """The window reduced over ranks (the one sync), the loop's own values, then the Reporter's log point."""
        steps = self.window.steps
        self.clock.enter("other")  # the sync waits for the device and the other ranks
        rank, world = self.strategy.rank, self.strategy.world_size
        totals = self.window.reduce(self.strategy, 0, self.stop.reason() is not None, None,
                                    extra=self.health.for_reduce(rank, world))
        self.clock.enter("telemetry")
        times = self.clock.window(steps)
        health = self.health.read(totals.extra, world)
        if totals.stops and self.agreed_stop is None:
            self.agreed_stop = self.stop.reason() or "a stop request on another rank"
        self._emit_user_values()
        lr = self.optimizer.param_groups[0].get("lr", 0.0)
        self.reporter.log_point(self.step_count, steps, totals, times, float(lr), 0, None, health)
        self.probe.reset_peak()

    def _emit_user_values(self) -> None:
        user, self._user = self._user, {}
        if not user or not self.reporter.hub.active:
            return
        names = list(user)
        means = torch.stack([torch.as_tensor(total, dtype=torch.float32, device=self.device) / count
                             for total, count in user.values()]).tolist()  # the device is idle: the sync just ran
        for name, mean in zip(names, means, strict=True):
            tag = name if "/" in name else tags.train(name)
            self.reporter.hub.emit(Scalar(tag=tag, step=self.step_count, rank=self.strategy.rank, value=mean))

    # --- stopping and data -------------------------------------------------------------------

    @property
    def stop_reason(self) -> str | None:
        """The stop signal's name; under DDP only once every rank knows of it (agreed at a log point)."""
        return self.stop.reason() if self.strategy.world_size == 1 else self.agreed_stop

    @property
    def should_stop(self) -> bool:
        """True after the first Ctrl+C (SIGINT/SIGTERM/SIGHUP): end the loop (save a checkpoint if you
        like); the with-block then flushes the dashboards. A second Ctrl+C ends the process at once."""
        return self.stop_reason is not None

    @property
    def worker_init_fn(self) -> guarded_worker_init:
        """For `DataLoader(worker_init_fn=...)`: workers ignore Ctrl+C, die with this process, are registered."""
        return guarded_worker_init(None)

    def dataloader(self, dataset: Any, **kwargs: Any) -> DataLoader:
        """A DataLoader with runner's worker guard (composed with a `worker_init_fn` given), workers
        started with stop signals held back, and shut down when the with-block ends."""
        kwargs["worker_init_fn"] = guarded_worker_init(kwargs.get("worker_init_fn"))
        kwargs.setdefault("num_workers", self.cfg.workers)
        if self.cfg.worker_start_method != "default" and kwargs["num_workers"]:
            kwargs.setdefault("multiprocessing_context", self.cfg.worker_start_method)
        loader = _GuardedLoader(dataset, **kwargs)
        self._loaders.add(loader)
        return loader
