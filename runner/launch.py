"""From a resolved config to running processes: the trainer in a supervised child process
(`python -m runner.train`), or torchrun for ddp, whose ranks run that same entry point. Training in this
process is runner/train/run.py's `train_here`, the one action behind all of them."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from runner.config import TrainConfig
from runner.errors import usage_error
from runner.run_dir import prepare_run_dir


def torchrun_command(cfg: TrainConfig, config_path: Path) -> list[str]:
    """`python -m torch.distributed.run` with the runner's rank entry point; multi-node flags pass through.

    One node: `--standalone`. Several: c10d rendezvous at --rdzv-endpoint, id --rdzv-id (default: the
    run name, which every node must share).
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={cfg.nproc}", f"--nnodes={cfg.nnodes}",
           f"--max-restarts={cfg.max_restarts}"]
    if cfg.rdzv_endpoint:
        cmd += [f"--node-rank={cfg.node_rank}", "--rdzv-backend=c10d", f"--rdzv-endpoint={cfg.rdzv_endpoint}",
                f"--rdzv-id={cfg.rdzv_id or cfg.name}"]
    else:
        cmd += ["--standalone"]
    return cmd + ["-m", "runner.train", "--config", str(config_path)]


def _cuda_for(device: str) -> bool:
    if device == "cpu":
        return False
    import torch  # only for --sync-bn: the supervisor otherwise never loads torch

    return torch.cuda.is_available()


def _check_distribution(cfg: TrainConfig) -> None:
    """Distribution flags that cannot work are usage errors here, before any process starts: torchrun's
    flags without --strategy ddp (rather than ignored), several nodes without a rendezvous endpoint,
    --sync-bn without CUDA, --gpus without dp."""
    if cfg.gpus and cfg.strategy != "dp":
        raise usage_error(f"--gpus applies to --strategy dp only (this run is --strategy {cfg.strategy}; "
                          "ddp runs one rank per GPU)")
    if cfg.strategy == "ddp":
        if cfg.nnodes != "1" and not cfg.rdzv_endpoint:
            raise usage_error(f"--nnodes {cfg.nnodes}: the nodes meet at --rdzv-endpoint HOST:PORT (on node 0)")
        if cfg.sync_bn and not _cuda_for(cfg.device):  # here, before torchrun, rather than once per rank
            raise usage_error("--sync-bn needs CUDA: SyncBatchNorm layers only work with GPU modules")
        return
    given = [flag for flag, used in (("--nproc", cfg.nproc != 1), ("--nnodes", cfg.nnodes != "1"),
                                     ("--node-rank", cfg.node_rank != 0), ("--rdzv-endpoint", bool(cfg.rdzv_endpoint)),
                                     ("--rdzv-id", bool(cfg.rdzv_id)), ("--max-restarts", cfg.max_restarts != 0),
                                     ("--sync-bn", cfg.sync_bn)) if used]
    if given:
        verb = "applies" if len(given) == 1 else "apply"
        raise usage_error(f"{', '.join(given)} {verb} to --strategy ddp only (this run is --strategy {cfg.strategy})")


def launch(cfg: TrainConfig) -> int:
    """Run the configured training; returns the exit code of the run."""
    if "TORCHELASTIC_RUN_ID" in os.environ:  # `torchrun ... -m runner train`: this process is one rank already
        from runner.train.run import train_here

        return train_here(cfg)
    _check_distribution(cfg)
    config_path = prepare_run_dir(cfg)
    if cfg.strategy == "ddp":
        cmd = torchrun_command(cfg, config_path)
        if cfg.rdzv_endpoint and cfg.max_restarts:
            # Restarts over several nodes: a fresh rendezvous store per attempt. With the shared one,
            # torch ≥ 2.5 hands a restarted group the old attempt's keys and its init hangs (pytorch#135712);
            # on one node the ranks keep attempts apart themselves (strategy._attempt_store). Only where
            # needed, as the fresh store costs a race: torchrun picks its port by binding and closing a
            # socket, rank 0 binds it seconds later, and anything on the machine may take it in between.
            os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    else:
        cmd = [sys.executable, "-m", "runner.train", "--config", str(config_path)]
    from runner.procs.supervisor import supervise

    return supervise(cmd, cfg)
