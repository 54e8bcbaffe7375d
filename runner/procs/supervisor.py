"""The supervisor: the `runner` process the user started, over the trainer (or torchrun).

It forwards SIGINT/SIGTERM/SIGHUP to the child's process group and returns the child's exit code.
"""

from __future__ import annotations

import os
import signal
import subprocess

from runner.config import TrainConfig


def supervise(cmd: list[str], cfg: TrainConfig) -> int:
    """Start `cmd` in its own process group, forward signals to it, wait, return its exit code."""
    env = dict(os.environ, RUNNER_IN_PROCESS="1", RUNNER_RUN_NAME=cfg.name)
    child = subprocess.Popen(cmd, env=env, process_group=0)

    def forward(signum: int, _frame: object) -> None:
        try:
            os.killpg(child.pid, signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    code = child.wait()
    return code if code >= 0 else 128 - code
