"""RUNNER_SYNC_DEBUG: counting sync warnings by phase and thread. The warnings are raised as torch's
"warn" sync-debug mode raises them (a UserWarning from the syncing call); setting the mode needs a
GPU, so it is recorded instead where there is none."""

from __future__ import annotations

import json
import threading
import warnings
from pathlib import Path

import pytest
import torch

from runner.probes.sync_debug import ENV, MESSAGE, SyncDebug


def _sync() -> None:
    warnings.warn(f"{MESSAGE} (Triggered internally at c10/cuda/CUDAFunctions.cpp:154.)", UserWarning, stacklevel=1)


@pytest.fixture
def modes(monkeypatch: pytest.MonkeyPatch) -> list:
    recorded: list = []
    if not torch.cuda.is_available():
        monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", recorded.append)
    return recorded


def test_off_without_the_variable_or_on_cpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(ENV, raising=False)
    assert not SyncDebug.from_env(torch.device("cuda")).active
    monkeypatch.setenv(ENV, str(tmp_path / "s.json"))
    assert not SyncDebug.from_env(torch.device("cpu")).active
    assert SyncDebug.from_env(torch.device("cuda"), rank=1).path == tmp_path / "s.json.rank1"


def test_counts_steady_state_log_points_and_other_threads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                          modes: list) -> None:
    target = tmp_path / "syncs.json"
    monkeypatch.setenv(ENV, str(target))
    debug = SyncDebug.from_env(torch.device("cuda"))
    _sync()  # warm-up (before the first log point): not counted
    with debug.outside_steady_state(10):
        _sync()
    _sync()  # steady state, training thread
    other = threading.Thread(target=_sync)
    other.start()
    other.join()
    with debug.outside_steady_state(20):
        _sync()
        _sync()
    with warnings.catch_warnings(record=True) as shown:  # other warnings still reach the user
        warnings.simplefilter("always")
        warnings.warn("something else", UserWarning, stacklevel=1)
    with debug.outside_steady_state(30):
        pass
    debug.close()
    report = json.loads(target.read_text())
    assert report["steady_steps"] == 20
    assert report["steady_syncs"] == {"training_thread": 1, "other_threads": 1}
    assert report["log_points"] == [{"step": 20, "syncs": 2}, {"step": 30, "syncs": 0}]
    assert list(report["steady_sites"]) == [f"{__file__}:{_sync.__code__.co_firstlineno + 1}"]
    assert [str(w.message) for w in shown] == ["something else"]
    if not torch.cuda.is_available():
        assert modes == ["warn", "default"]  # on after the first log point, off at close
