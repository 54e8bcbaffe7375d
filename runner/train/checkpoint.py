"""Checkpoints: written atomically (temp file in the same folder, fsync, rename), loaded weights-only."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from runner.errors import RunnerError


def save(state: dict[str, Any], path: Path) -> None:
    """Write `state` so that a kill at any moment leaves either the old or the new file, whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load(path: Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint with `weights_only=True`; a clear RunnerError if it is missing or corrupt."""
    if not path.is_file():
        raise RunnerError(f"checkpoint not found: {path}", 2)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RunnerError(f"checkpoint {path} is corrupt or not a runner checkpoint ({first}); "
                          "pass another --resume PATH or --resume never", 2) from None
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise RunnerError(f"checkpoint {path} is not a runner checkpoint (no model/step)", 2)
    return state
