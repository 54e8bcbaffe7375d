"""The training loop: forward, loss, backward, step — and events to the hub, never a sink.

Host↔device syncs happen only at log points (one `.tolist()` of the window's sums, which also
lands every non-blocking copy the window started), before a checkpoint (to check that the state
being saved is finite), and per step only under --on-nan skip. The events themselves are built in
`reporting`, the window sums in `log_window`, the time breakdown in `step_clock`.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from runner import config as config_io
from runner.config import TrainConfig
from runner.data import Batch, batches_per_epoch, build_dataset, build_loader, sample_shape, shutdown_loader
from runner.errors import RunnerError
from runner.memory import postmortem
from runner.models import build_model
from runner.optim import amp_dtype, make_optimizer, make_scaler
from runner.probes.memory import MemoryProbe
from runner.probes.sync_debug import SyncDebug
from runner.procs import heartbeat
from runner.procs.signals import StopRequested, deferred
from runner.tasks import make_task
from runner.telemetry import tags
from runner.telemetry.hub import Hub
from runner.train import checkpoint, compiled, first_nonfinite, oom
from runner.train.evaluate import Best, Evaluator, split_data
from runner.train.log_window import LogWindow
from runner.train.profiling import StepProfiler
from runner.train.reporting import Reporter
from runner.train.schedule import make_scheduler
from runner.train.stand_in import stand_in_batch
from runner.train.step import Micro, StepRunner
from runner.train.step_clock import StepClock
from runner.train.step_health import StepHealth
from runner.train.strategy import Strategy

log = logging.getLogger("runner")

EXIT_SIGNAL = {"SIGINT": 130, "SIGTERM": 143, "SIGHUP": 129}
# --on-nan skip gives up after this many non-finite batches in a row: a skipped step leaves the weights as
# they were, so once they themselves overflow every batch fails and skipping would loop forever.
MAX_NONFINITE_IN_A_ROW = 20


class NonFiniteLoss(RunnerError):
    """The loss became NaN/inf under --on-nan stop."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    """Builds the workload from the config, then runs `fit()`; talks only to the strategy and hub.

    `model` is what the loop calls (wrapped by DataParallel/DDP when the strategy does), `raw_model`
    the user's module inside it (checkpoints, graphs, histograms).
    """

    def __init__(self, cfg: TrainConfig, strategy: Strategy,
                 should_stop: Callable[[], str | None] = lambda: None,
                 interruptible: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> None:
        self.cfg, self.strategy, self.should_stop = cfg, strategy, should_stop
        # A stop signal may end a wait for data at once (a worker can block in __getitem__ for good);
        # not under DDP, where every rank must stop after the same step.
        self.interruptible = interruptible if strategy.world_size == 1 else contextlib.nullcontext
        self.device = strategy.device
        self.rank = strategy.rank
        self.ckpt_path = cfg.run_path / "checkpoints" / "last.pt"
        if cfg.memory_snapshot:
            postmortem.record_history(self.device)
        seed_everything(cfg.seed)
        self.task = make_task(cfg.resolved_task)
        self.dataset, val_set = split_data(cfg, build_dataset(cfg, cfg.resolved_task))
        self.input_shape = sample_shape(self.dataset)
        num_classes = len(getattr(self.dataset, "classes", [])) or cfg.num_classes
        self.raw_model = build_model(cfg.model, self.input_shape[0], self.input_shape[-1], num_classes)
        self.batch_size = self._choose_batch_size()
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        if cfg.channels_last:
            self.raw_model = self.raw_model.to(memory_format=torch.channels_last)
        self.model = strategy.wrap(self.raw_model)
        self.raw_model = strategy.unwrap(self.model)  # --sync-bn may have replaced modules
        if cfg.compile:
            self.model = compiled.compile_model(self.model)
        self.amp_dtype = amp_dtype(self.device.type, cfg.amp, cfg.amp_dtype)
        self.scaler = make_scaler(self.device.type, cfg.amp, cfg.amp_dtype)
        self.optimizer = make_optimizer(cfg.optimizer, self.model.parameters(), cfg.lr, cfg.weight_decay,
                                        fused=True)  # no sync per step under GradScaler; step_health's gate
        if cfg.amp and self.scaler is None:
            log.info("amp on %s: %s autocast, no GradScaler", self.device.type, self.amp_dtype)
        self.sampler = strategy.sampler(self.dataset, cfg.seed)
        self.per_epoch = self._steps_per_epoch()
        self.total_steps = cfg.steps or (cfg.epochs * self.per_epoch if cfg.epochs else 100)
        self.loader = self._loader()
        self.scheduler = make_scheduler(self.optimizer, cfg.lr_schedule, self.total_steps, cfg.warmup_steps, cfg.min_lr)
        self.runner = StepRunner(self.model, self.raw_model, self.task, self.optimizer, self.scaler, self._autocast,
                                 cfg.clip_grad_norm, self.device, self.scheduler, cfg.channels_last)
        self.evaluator = (Evaluator(val_set, self.batch_size, strategy, self.task, self._autocast, cfg.channels_last)
                          if val_set is not None else None)
        self.best = Best(cfg.monitor, cfg.monitor_mode)
        self.probe = MemoryProbe(self.device, cfg.system_every)
        self.reporter = Reporter(cfg, strategy, self.task, self.probe)
        self.profiler = (StepProfiler(cfg.profile, cfg.run_path / "profile", self.device, self.rank,
                                      strategy.world_size, cfg.memory_snapshot) if cfg.profile else None)
        self.reporter.prepare(self.raw_model, self.input_shape)  # so that step 1 pays none of it
        self.step = 0
        self.skipped = 0  # unreadable samples
        self.amp_skipped = 0  # steps whose update GradScaler skipped
        self.nonfinite_in_a_row = 0  # --on-nan skip
        self.last_batch: Batch | None = None  # a reference (no copy): DDP stand-in
        self.health = StepHealth(self.raw_model, self.optimizer, self.scaler, self.device, cfg.resolved_task,
                                 cfg.on_nan)  # gradient norms, the non-finite gate, the health window
        self.nonfinite = first_nonfinite.FirstNonfinite(self.raw_model, self.task.loss, self._autocast, self.ckpt_path,
                                                        self.rank)
        self.resumed_from: Path | None = None
        self.phase = "compute"  # where in a step an out-of-memory error hit: compute | update | observe
        self.retry_at: int | None = None  # --oom retry: the batch (of the new size) to go on from
        self.live_estimate: Any = None  # with sinks: measures the activations of the first step, then emits
        self.agreed_stop: str | None = None  # DDP: a stop request every rank has seen (at a log point)
        self.sync_debug = SyncDebug.from_env(self.device, self.rank)  # RUNNER_SYNC_DEBUG: count syncs per phase

    @property
    def hub(self) -> Hub:
        return self.reporter.hub

    @property
    def last_scalars(self) -> dict[str, float]:
        """The scalars of the latest log point."""
        return self.reporter.last_scalars

    # --- setup ---------------------------------------------------------------------------

    def _choose_batch_size(self) -> int:
        self.batch_search = None
        if self.cfg.batch_size != "auto":
            return int(self.cfg.batch_size)
        from runner.memory.auto_batch import choose_batch_size

        if self.strategy.is_writer:  # ranks must agree: each epoch has to give all of them the same steps
            # the samples one rank sees per micro-batch slot of an epoch: an epoch must give every step
            # its --accumulate batches; memory holds one micro-batch at a time, which is what is sized
            share = max(1, len(self.dataset) // self.strategy.world_size // self.cfg.accumulate)
            self.batch_search = choose_batch_size(self.cfg, self.raw_model, self.input_shape, self.device, share)
        return int(self.strategy.broadcast(self.batch_search.chosen if self.batch_search else 0))

    def _steps_per_epoch(self) -> int:
        """Optimizer steps per epoch: --accumulate batches each (at least one step, with fewer batches)."""
        return max(1, batches_per_epoch(self.sampler, self.batch_size) // self.cfg.accumulate)

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

    def resume(self) -> None:
        """Load model, optimizer, scaler, progress and RNG from --resume (auto: this run's last.pt).

        Rank 0 reads the file and sends it to every rank, so all resume from the same step, with or
        without a filesystem shared between nodes.
        """
        found = checkpoint.read_for_resume(self.cfg.resume, self.ckpt_path) if self.strategy.is_writer else None
        path, state, error = self.strategy.broadcast(found)
        if error is not None:
            raise RunnerError(*error)
        if state is None:
            return
        progress = checkpoint.restore(state, path, self.raw_model, self.optimizer, self.scaler, self.scheduler)
        self.step, self.skipped, self.amp_skipped = progress.step, progress.skipped, progress.amp_skipped
        self.best.value, self.best.step = progress.best_value, progress.best_step
        self.resumed_from = path

    def save_checkpoint(self, name: str = "last.pt") -> None:
        """Rank 0 writes last.pt (or best.pt) atomically; every rank waits so an immediate load is safe."""
        with heartbeat.phase("checkpoint"):  # a long phase for the stall watch and the collective timeout
            if self.strategy.is_writer:
                progress = checkpoint.Progress(self.step, self.skipped, self.amp_skipped, self.best.value,
                                               self.best.step)
                checkpoint.save(checkpoint.build_state(self.raw_model, self.optimizer, self.scaler, progress,
                                                       config_io.dumps(self.cfg), self.scheduler),
                                self.ckpt_path.with_name(name))
            self.strategy.barrier()

    # --- the loop ------------------------------------------------------------------------

    def fit(self, hub: Hub) -> int:
        """Train to `total_steps` (or a stop request), emitting to `hub`; returns the exit code."""
        self.reporter.hub = hub
        if self.cfg.compile:  # before the clock: compiling is not step 1's time
            seconds = compiled.warm_up(self.model, self.raw_model, self.task, self.dataset, self.batch_size,
                                       self.device, self._autocast, self.cfg.channels_last)
            self.reporter.compiled(self.step, seconds)
        self.clock = StepClock(self.device)  # the first window starts here, not at set-up
        self.clock.enter("telemetry")
        if hub.active:
            self._emit_start()
        window = LogWindow(self.device)
        stop_reason: str | None = None
        epoch, offset = divmod(self.step, self.per_epoch) if self.per_epoch else (0, 0)
        while self.step < self.total_steps and stop_reason is None:
            self.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
            if offset:
                self.sampler.resume_at(offset * self.batch_size * self.cfg.accumulate)  # type: ignore[attr-defined]
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
        with self.sync_debug.outside_steady_state(self.step):
            if window.steps:
                self.clock.enter("telemetry")
                self._log_point(window)
            self.clock.enter("other")
            self.save_checkpoint()
        if self.profiler is not None:
            self._profiled(self.profiler.finish())  # the run ended inside the window
        if stop_reason:
            self.reporter.end(self.step, self.batch_size, f"stopped by {stop_reason} at step {self.step}", "stopped")
        else:
            self.reporter.end(self.step, self.batch_size, f"finished at step {self.step}", "finished")
        return EXIT_SIGNAL.get(stop_reason or "", 1 if stop_reason else 0)

    def _run_epoch(self, window: LogWindow, first_batch: int) -> int:
        """One pass over the loader (or until the step budget / a stop request). Returns good samples."""
        good = 0
        epoch_skipped = 0
        self.clock.enter("data_wait")
        with deferred():  # workers start here (the first time) and must not get a stop signal half-started
            batches = iter(self.loader)
        for index in range(first_batch, self.per_epoch):
            if self.profiler is not None:
                self.profiler.before_step(self.step + 1)
            micros = self._fetch(batches)
            if micros is None:
                break
            good += sum(m.batch.inputs.shape[0] for m in micros if not m.stand_in)
            epoch_skipped += sum(m.batch.skipped for m in micros)
            failure = None
            try:
                self._step(micros, window)
            except Exception as exc:  # captured while the failed step's tensors are alive
                if not postmortem.is_out_of_memory(exc):
                    raise
                failure = postmortem.capture(exc, self.device, self.oom_dir, self.cfg.memory_snapshot)
            if failure is not None:
                del micros
                self._out_of_memory(failure, window, steps_done=index + (self.phase == "observe"))
                break
            self.clock.enter("other")
            if self.step >= self.total_steps or self._stop_requested():
                break
        if epoch_skipped:
            self.reporter.note("status", self.step, f"epoch done: skipped {epoch_skipped} unreadable sample(s)")
        del batches  # shut down non-persistent iterators promptly
        return good

    def _fetch(self, batches: Any) -> list[Micro] | None:
        """The next step's --accumulate batches (fewer at the end of the epoch; None when there are
        none, or a stop request ended the wait). A batch whose every sample is unreadable is passed
        over, except under DDP, where a stand-in takes its place (see stand_in)."""
        micros: list[Micro] = []
        while len(micros) < self.cfg.accumulate:
            self.clock.enter("data_wait")
            try:
                with self.interruptible():
                    batch: Batch | None = next(batches, None)
            except StopRequested:
                return None
            if batch is None:
                break
            self.skipped += batch.skipped
            if batch.unreadable:
                self.reporter.unreadable(self.step, batch.unreadable)
            if batch.inputs is not None:
                self.last_batch = batch
                micros.append(Micro(batch))
            elif self.strategy.world_size > 1:
                micros.append(Micro(stand_in_batch(self.last_batch, self.input_shape, self.cfg.resolved_task), True))
        return micros or None

    def _step(self, micros: list[Micro], window: LogWindow) -> None:
        cfg = self.cfg
        self.phase = "compute"
        done = self.runner.compute(micros, self.clock, self._first_step_probe)
        self.clock.enter("telemetry")
        finite = self.health.measure(done)  # the loss and the global gradient norm finite (device bool)
        if cfg.on_nan == "skip" and self._nonfinite_anywhere(finite):  # one sync per step, only in skip mode
            self.nonfinite.at_step(self.hub, done.inputs, done.targets, self.step + 1)
            self.optimizer.zero_grad(set_to_none=True)
            log.warning("step %d: non-finite loss, step skipped (--on-nan skip)", self.step + 1)
            self.nonfinite_in_a_row += 1
            if self.nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
                raise NonFiniteLoss(f"loss NaN/inf on {self.nonfinite_in_a_row} batches in a row at step "
                                    f"{self.step + 1}: the weights themselves overflow; stopped. Lower --lr")
            return
        self.nonfinite_in_a_row = 0
        self.phase = "update"  # an error from here on may leave the weights half-updated
        self.clock.enter("optimizer")
        with self.health.gate(finite):  # no update from a non-finite step
            amp_skipped, clip = self.runner.update(self.health.norms.total if self.health.norms else None)
        self.step += 1
        heartbeat.set_step(self.step)
        self.phase = "observe"
        self.clock.enter("telemetry")
        window.add(done.loss_sum, done.metrics, done.samples, finite, amp_skipped, clip)
        self.health.record(self.step, done, finite, micros)
        self.reporter.observe(self.step, self.raw_model, done.inputs, done.output, done.targets)
        if self.profiler is not None:
            self._profiled(self.profiler.after_step(self.step))
        if self.evaluator is not None and (self.step % (cfg.eval_every or self.per_epoch) == 0
                                           or self.step == self.total_steps):
            self._evaluate()  # before the log point, which closes the evaluation's values with its own
        if self.step % cfg.log_every == 0 or self.step == self.total_steps:
            with self.sync_debug.outside_steady_state(self.step):
                self._log_point(window)
        if self.step % cfg.checkpoint_every == 0:
            self.clock.enter("other")
            with self.sync_debug.outside_steady_state(self.step):
                if cfg.on_nan == "stop" and window.any_nonfinite(self.strategy):
                    self._stop_nonfinite(self.health.window.first_bad_here())
                self.save_checkpoint()

    def _evaluate(self) -> None:
        """Evaluate on the validation set (its time apart from the steps'), emit, and write best.pt
        when the --monitor tag improved. The one call site of an evaluation."""
        with self.clock.apart(), heartbeat.phase("evaluation"), self.sync_debug.outside_steady_state(self.step):
            result = self.evaluator.run(self.raw_model, self.step, self.reporter.wants_grid())
            self.reporter.evaluation(result)
            if self.best.offer({**self.last_scalars, **result.values}, self.step):
                self.save_checkpoint("best.pt")
                self.reporter.note(tags.BEST, self.step, f"best.pt: {self.best.monitor} {self.best.value:.6g} "
                                                         f"at step {self.step}")

    def _profiled(self, written: list[Path]) -> None:
        if written:
            text = f"profile of steps {self.cfg.profile}: " + ", ".join(str(p) for p in written)
            self.reporter.note("profile", self.step, text)

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

    def _stop_nonfinite(self, first_bad: int) -> None:
        """--on-nan stop: name where the NaN starts (see first_nonfinite); with the weights intact (the
        gate applied no non-finite update) checkpoint them as of the step before it; then stop."""
        kept, intact = self.health.for_rerun(first_bad)
        found = self.nonfinite.before_stop(self.hub, kept, self.device, self.step, first_bad, intact)
        if intact and first_bad:
            self.step = first_bad - 1  # the state is the last finite one: a resume goes on from the failing step
            self.save_checkpoint()
        raise NonFiniteLoss(
            f"loss became NaN/inf at step {first_bad or self.step}{'; ' + found if found else ''}; stopped (last "
            f"good checkpoint: {self.ckpt_path}). Lower --lr, check the data, or pass --on-nan skip")

    # --- out of memory -------------------------------------------------------------------

    @property
    def oom_dir(self) -> Path:
        return self.cfg.run_path / "oom" / (f"rank{self.rank}" if self.rank else "")

    def _out_of_memory(self, failure: postmortem.Capture, window: LogWindow, steps_done: int) -> None:
        """Free what the failed step held, then --oom retry (oom.plan_retry) or stop (oom.stop)."""
        from runner.memory.trial import release

        step = self.step + (self.phase != "observe")
        release(self.raw_model, self.device)
        world = self.strategy.world_size
        retry = oom.plan_retry(self.cfg, self.phase, self.batch_size, world, steps_done * self.cfg.accumulate, step)
        if retry is not None:
            self.batch_size = retry.batch_size
            shutdown_loader(self.loader)
            self.loader, self.per_epoch = self._loader(), self._steps_per_epoch()
            self.retry_at = retry.resume_batch // self.cfg.accumulate
            log.warning(retry.text)
            self.reporter.note(tags.MEMORY_OOM, self.step, retry.text)
            return
        nonfinite = self.cfg.on_nan == "stop" and window.nonfinite_here()
        raise oom.stop(failure, self.cfg, self.raw_model, self.input_shape, self.batch_size, self.device, step,
                       self.phase, world, nonfinite, self.save_checkpoint,
                       f"{self.ckpt_path} holds step {self.step}; rerun with the same --name to go on from there")

    # --- log points ----------------------------------------------------------------------

    def _log_point(self, window: LogWindow) -> None:
        """Reduce the window across ranks (the one sync), then emit its scalars and time breakdown."""
        steps = window.steps
        self.clock.enter("other")  # the sync waits for the device (and the other ranks): not telemetry's time
        totals = window.reduce(self.strategy, self.skipped, self.should_stop() is not None,
                               self.scaler.scale(self.runner.one) if self.scaler is not None else None,
                               self.health.window.for_reduce(self.rank, self.strategy.world_size))
        health = self.health.window.read(totals.extra, self.strategy.world_size)
        self.clock.enter("telemetry")
        times = self.clock.window(steps)  # after the sync: every CUDA event of the window has completed
        if totals.stops and self.agreed_stop is None:
            self.agreed_stop = self.should_stop() or "a stop request on another rank"
        if totals.nonfinite and self.cfg.on_nan == "stop":
            self._stop_nonfinite(health.first_bad_step)
        self.health.new_window()
        self.amp_skipped += round(totals.amp_skipped)
        self.reporter.log_point(self.step, steps, totals, times, self.optimizer.param_groups[0]["lr"],
                                self.amp_skipped, totals.amp_scale if self.scaler is not None else None, health)
        self.probe.reset_peak()

    # --- start and end -------------------------------------------------------------------

    def _emit_start(self) -> None:
        params = sum(p.numel() for p in self.raw_model.parameters())
        text = (f"training {self.cfg.model} ({params:,} parameters) on {self.device}, "
                f"{self.strategy.name} x{self.strategy.world_size}, batch {self.batch_size}, "
                f"steps {self.step}→{self.total_steps}")
        if self.cfg.resolved_task == "classify":  # the chance level of the not-learning finding
            text += f", {len(getattr(self.dataset, 'classes', [])) or self.cfg.num_classes} classes"
        self.live_estimate = self.reporter.start(self.step, text, self.resumed_from, self.batch_search,
                                                 self.raw_model, self.input_shape, self.batch_size)

    def close(self) -> None:
        try:
            if self.profiler is not None:
                self.profiler.finish()  # a run that failed inside the window still leaves its trace
        finally:
            try:
                shutdown_loader(self.loader)  # persistent workers: also those blocked in __getitem__
            finally:
                self.probe.close()
                self.sync_debug.close()
