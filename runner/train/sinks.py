"""Which sinks a run gets: the console and the diagnosis (findings.json, summary.json) always,
TensorBoard and/or Visdom as --viz says."""

from __future__ import annotations

from runner.config import TrainConfig
from runner.diagnosis.sink import DiagnosisSink
from runner.telemetry.console import ConsoleSink
from runner.telemetry.events import Sink


def build_sinks(cfg: TrainConfig, total_steps: int, start_step: int = 0) -> list[Sink]:
    """The writer rank's sinks (other ranks get none: the hub then drops nothing and writes nothing).

    `start_step` > 0 on resume: sinks drop what an earlier attempt logged after that step.
    """
    sinks: list[Sink] = [ConsoleSink(total_steps, cfg.name, live=None if cfg.progress else False),
                         DiagnosisSink(cfg.run_path, cfg.name, start_step=start_step)]
    if cfg.viz in ("tensorboard", "both"):
        from dashboards.tensorboard import TensorBoardSink

        sinks.append(TensorBoardSink(cfg.run_path, purge_step=start_step + 1 if start_step else None,
                                     flush_secs=cfg.flush_secs))
    if cfg.viz in ("visdom", "both"):
        from dashboards.visdom import VisdomSink

        sinks.append(VisdomSink.for_run(cfg, start_step=start_step))
    for sink in sinks[1:]:  # files current within --flush-secs of each event (the console prints at once)
        sink.flush_every = cfg.flush_secs
    return sinks
