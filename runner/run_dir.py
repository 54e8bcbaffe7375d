"""The run folder `<run_dir>/<name>/`: created, checked writable, and given the resolved config.toml.

Below both the launcher (which hands the config file to the trainer child or torchrun) and the trainer
(which prepares the folder itself when it is started directly, e.g. by a user's own torchrun)."""

from __future__ import annotations

import os
from pathlib import Path

from runner import config as config_io
from runner.config import TrainConfig
from runner.errors import usage_error


def prepare_run_dir(cfg: TrainConfig) -> Path:
    """Create `<run_dir>/<name>/`, check it is writable, save the resolved config.toml there (rank 0 only)."""
    path = cfg.run_path
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise usage_error(f"cannot write to run dir {path} ({exc.strerror}); "
                          "pass --run-dir to a writable folder") from None
    config_path = path / "config.toml"
    if os.environ.get("RANK", "0") == "0":
        config_io.save(cfg, config_path)
    return config_path
