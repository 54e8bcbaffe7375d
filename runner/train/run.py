"""One training process: strategy, trainer, hub and sinks, and the teardown on every exit path."""

from __future__ import annotations

import logging
import os

from runner.config import TrainConfig
from runner.diagnosis import provenance
from runner.diagnosis.stall_feed import StallFeed
from runner.procs import heartbeat, stacks
from runner.procs.run_tag import join_run
from runner.procs.signals import GracefulStop
from runner.run_dir import prepare_run_dir
from runner.telemetry import tags
from runner.telemetry.events import Text
from runner.telemetry.hub import Hub

log = logging.getLogger("runner")


def train_here(cfg: TrainConfig) -> int:
    """Prepare the run folder, then train in this process: the supervisor's child, each torchrun rank
    (`python -m runner.train`) and the tests' in-process `cli` all come through here."""
    prepare_run_dir(cfg)
    return run_training(cfg)


def run_training(cfg: TrainConfig) -> int:
    """Train in this process (a single/dp run, or one torchrun rank). Returns the exit code."""
    from runner.train.loop import Trainer
    from runner.train.sinks import build_sinks
    from runner.train.strategy import make_strategy

    stop = GracefulStop().install()
    membership = join_run(cfg.name, str(cfg.run_path.resolve()))  # tag + registry, before any worker starts
    _watched(membership.run_id)  # before the process group: joining it may hang too
    try:
        strategy = make_strategy(cfg)
    except BaseException:
        _unwatched()
        raise
    if not strategy.is_writer:
        log.setLevel(logging.WARNING)  # rank 0 says what every rank would; warnings still come from all
    else:
        provenance.write(cfg.run_path, cfg.to_dict(), strategy.world_size)  # env.json, once, before the first step
    hub = Hub([])
    trainer = None
    feed: StallFeed | None = None
    try:
        trainer = Trainer(cfg, strategy, should_stop=stop.reason, interruptible=stop.interruptible)
        trainer.resume()
        if strategy.is_writer:
            hub = Hub(build_sinks(cfg, trainer.total_steps, start_step=trainer.step))
            feed = StallFeed(cfg.run_path, hub.emit, flush=hub.flush).start()  # stall findings to the dashboards
        return trainer.fit(hub)
    except BaseException as exc:
        text = f"failed: {exc}" if str(exc) else f"failed: {type(exc).__name__}"
        if trainer is not None:
            trainer.reporter.end(trainer.step, trainer.batch_size, text, "failed")  # with the HParams end
        elif hub.active:
            hub.emit(Text(tag=tags.STATUS, step=0, rank=strategy.rank, text=text))
        raise
    finally:
        try:
            heartbeat.enter("ended")  # the teardown (dashboards' last deliveries) is nothing to watch
            if feed is not None:
                feed.stop()
            if trainer is not None:
                trainer.close()
            if not hub.close(timeout=30.0):
                log.warning("some dashboard events were not delivered before exit")
        finally:
            strategy.close()  # destroy_process_group, on every exit path
            membership.leave()
            _unwatched()


def _watched(run_id: str | None) -> None:
    """This rank's heartbeat and stack-dump file: what the supervisor's stall watch reads
    (runner/procs/stall_watch.py). Nothing without a run id (the registry is not writable)."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    heartbeat.install(run_id, rank, world)
    stacks.register(run_id, "rank" if "TORCHELASTIC_RUN_ID" in os.environ else "trainer", rank)


def _unwatched() -> None:
    heartbeat.uninstall()
    stacks.unregister()
