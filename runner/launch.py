"""From a resolved config to running processes: the trainer in a supervised child process, or
torchrun for ddp. Inside that child (or a torchrun rank) training runs in-process.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from runner import config as config_io
from runner.config import TrainConfig
from runner.errors import usage_error


def in_process() -> bool:
    """True in the trainer child and in torchrun ranks (started by torchrun, ours or the user's)."""
    return os.environ.get("RUNNER_IN_PROCESS") == "1" or "TORCHELASTIC_RUN_ID" in os.environ


def prepare_run_dir(cfg: TrainConfig) -> Path:
    """Create `<run_dir>/<name>/`, check it is writable, save the resolved config.toml there."""
    path = cfg.run_path
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise usage_error(f"cannot write to run dir {path} ({exc.strerror}); pass --run-dir to a writable folder") from None
    config_path = path / "config.toml"
    if os.environ.get("RANK", "0") == "0":
        config_io.save(cfg, config_path)
    return config_path


def torchrun_command(cfg: TrainConfig, config_path: Path) -> list[str]:
    """`python -m torch.distributed.run` with the runner's rank entry point; multi-node flags pass through."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={cfg.nproc}", f"--nnodes={cfg.nnodes}",
           f"--max-restarts={cfg.max_restarts}"]
    if cfg.rdzv_endpoint:
        cmd += [f"--node-rank={cfg.node_rank}", "--rdzv-backend=c10d", f"--rdzv-endpoint={cfg.rdzv_endpoint}",
                f"--rdzv-id={cfg.rdzv_id or cfg.name}"]
    else:
        cmd += ["--standalone"]
    return cmd + ["-m", "runner.train", "--config", str(config_path)]


def launch(cfg: TrainConfig) -> int:
    """Run the configured training; returns the exit code of the run."""
    config_path = prepare_run_dir(cfg)
    if in_process():
        from runner.train.run import run_training

        return run_training(cfg)
    if cfg.strategy == "ddp":
        cmd = torchrun_command(cfg, config_path)
    else:
        cmd = [sys.executable, "-m", "runner.train", "--config", str(config_path)]
    from runner.procs.supervisor import supervise

    return supervise(cmd, cfg)
