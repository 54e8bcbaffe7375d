"""Shared fixtures: the CLI in this process (fast), isolated run state, and the marker-folder teardown.

Helpers and models live in tests/support (imported as `tests.support.X`); `gpu` tests are skipped here,
in one place, when CUDA is absent."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs the suite in several workers on a small machine: one math thread per process (and in
    # every process a test starts) instead of each oversubscribing every core. Set before torch is imported.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

from tests.support.runs import Outcome, child_pythonpath, in_process_cli


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`@pytest.mark.gpu` tests need CUDA: without it they are skipped (and reported so)."""
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu:
        return
    import torch

    if torch.cuda.is_available():
        return
    for item in gpu:
        item.add_marker(pytest.mark.skip(reason="needs CUDA"))


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the run registry and anything under XDG state out of the real home."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Outcome]:
    """`cli("train", ...)`: runner's commands in this process, `train` training right here (see
    tests.support.runs.in_process_cli); processes the run starts (dashboards, spawned workers) find
    `tests.support` too."""
    monkeypatch.setenv("PYTHONPATH", child_pythonpath())
    return in_process_cli()


@pytest.fixture
def markers(tmp_path: Path) -> Iterator[Path]:
    """The test's marker folder; at teardown every process still carrying it is killed."""
    folder = tmp_path / "markers"
    folder.mkdir(exist_ok=True)
    yield folder
    from runner.procs import proc_table
    from tests.support.proc_runs import tagged
    from tests.support.procs import MARKERS_ENV

    for pid, start in tagged(MARKERS_ENV, str(folder)).items():
        fd = None
        try:
            fd = os.pidfd_open(pid)
            if proc_table.is_same_process(pid, start):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
        except ProcessLookupError:
            pass
        finally:
            if fd is not None:
                os.close(fd)
