"""Checkpoints: what they hold (`build_state`, `restore`), written atomically (temp file in the same
folder, fsync, rename), loaded weights-only."""

from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

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


@dataclass
class Progress:
    """How far a run has come: what a resumed run must go on from, beside the weights."""

    step: int = 0  # training steps taken (batches trained on)
    skipped: int = 0  # unreadable samples so far
    amp_skipped: int = 0  # of the steps, those whose update GradScaler skipped (inf/NaN gradients)
    best_value: float | None = None  # the --monitor tag's best value so far (best.pt holds its weights)
    best_step: int = 0


def build_state(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                progress: Progress, config_text: str, scheduler: Any = None) -> dict[str, Any]:
    """What last.pt holds: weights, optimizer, scheduler and scaler state, progress (the best value
    included), the CPU RNG and the config."""
    return {
        "scheduler": scheduler.state_dict() if scheduler is not None else {},
        "best": [progress.best_value, progress.best_step] if progress.best_value is not None else [],
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "step": progress.step,
        "skipped": progress.skipped,
        "amp_skipped": progress.amp_skipped,
        "rng": torch.get_rng_state(),
        "config": config_text,
    }


def restore(state: dict[str, Any], path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
            scaler: torch.amp.GradScaler | None, scheduler: Any = None) -> Progress:
    """Load `state` (from `path`) into the model, optimizer, scheduler, scaler and the CPU RNG; a
    one-line RunnerError (exit 2) when it does not fit this model or optimizer."""
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise RunnerError(f"checkpoint {path} does not fit this model/optimizer ({str(exc).splitlines()[0]})",
                          2) from None
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if scheduler is not None and state.get("scheduler"):
        scheduler.load_state_dict(state["scheduler"])
    if "rng" in state:
        torch.set_rng_state(state["rng"])
    best = state.get("best") or [None, 0]
    return Progress(int(state["step"]), int(state.get("skipped", 0)), int(state.get("amp_skipped", 0)),
                    None if best[0] is None else float(best[0]), int(best[1]))


def read_for_resume(resume: str, own: Path) -> tuple[Path | None, dict[str, Any] | None, tuple[str, int] | None]:
    """--resume (auto: the run's own last.pt `own`, if any; never; or a PATH): the path, its state, or
    the error (message, exit code) to raise on every rank once they all know it."""
    path = None if resume == "never" else (own if own.is_file() else None) if resume == "auto" else Path(resume)
    if path is None:
        return None, None, None
    try:
        return path, load(path), None
    except RunnerError as exc:
        return path, None, (str(exc), exc.code)
