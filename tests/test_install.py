"""Installing runner where users do: a bare venv with the oldest typer pyproject.toml allows (no torch), and
an environment that already has torch (README: "Install into an existing environment"). Real venvs, real pip."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _source_copy(tmp_path: Path) -> Path:
    """The package's sources, copied so that building it leaves nothing in the working tree."""
    dest = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("runner", "dashboards"):
        shutil.copytree(ROOT / folder, dest / folder, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, dest / name)
    return dest


def _venv(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=120)
    return path / "bin"


def _run(*args: str | Path, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNNER_", "PYTHON", "VIRTUAL_ENV"))}
    env["COLUMNS"] = "200"
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def _ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _oldest(requirement: str) -> str:
    """The lower bound pyproject.toml gives a dependency, e.g. `typer>=0.20` → `0.20`."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        match = re.fullmatch(rf"{requirement}>=([\d.]+)", dep.split(";")[0].strip())
        if match:
            return match.group(1)
    raise AssertionError(f"no lower bound for {requirement} in pyproject.toml")


def test_cli_works_with_the_oldest_typer_allowed_and_without_torch(tmp_path: Path) -> None:
    bin_dir = _venv(tmp_path / "venv")
    typer = f"typer=={_oldest('typer')}"
    tomli_w = f"tomli-w=={_oldest('tomli-w')}"
    _ok(_run(bin_dir / "pip", "install", "-q", typer, tomli_w, "rich", "psutil", "setuptools>=77.0.3", cwd=tmp_path))
    _ok(_run(bin_dir / "pip", "install", "-q", "--no-deps", "--no-build-isolation", _source_copy(tmp_path),
             cwd=tmp_path))
    assert _run(bin_dir / "python", "-c", "import torch", cwd=tmp_path).returncode != 0  # really without torch
    runner = bin_dir / "runner"
    for args in (["--help"], ["train", "--help"], ["cleanup", "--help"], ["dashboards", "--help"]):
        assert "Usage: runner" in _ok(_run(runner, *args, cwd=tmp_path)), args
    assert "train" in _ok(_run(runner, cwd=tmp_path))
    assert _ok(_run(runner, "--version", cwd=tmp_path)).startswith("runner ")
    assert 'viz = "none"' in _ok(_run(runner, "train", "--viz", "none", "--print-config", cwd=tmp_path))
    for args, hint in ((["train", "--viz", "visdmo"], "did you mean 'visdom'?"), (["trian"], "Did you mean 'train'?"),
                       (["train", "--steps", "x"], "'--steps'")):
        proc = _run(runner, *args, cwd=tmp_path)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and hint in proc.stderr, (args, proc.stderr)


def test_install_into_an_environment_that_already_has_torch(tmp_path: Path) -> None:
    """The README's path: `pip install .` where torch is installed already (here: a venv that sees the
    project venv's packages through a .pth file), then a short run of the installed `runner`."""
    bin_dir = _venv(tmp_path / "venv")
    site = Path(_ok(_run(bin_dir / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                         cwd=tmp_path)).strip())
    (site / "existing_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = _ok(_run(bin_dir / "pip", "install", _source_copy(tmp_path), cwd=tmp_path))
    assert not re.search(r"^Collecting torch", installed, re.MULTILINE), installed  # torch was reused
    runner = bin_dir / "runner"
    where = _ok(_run(bin_dir / "python", "-c", "import runner, torch; print(runner.__file__)", cwd=tmp_path))
    assert where.startswith(str(site)), where
    assert _ok(_run(runner, "--version", cwd=tmp_path)).startswith("runner ")
    runs = tmp_path / "runs"
    printed = _ok(_run(runner, "train", "--print-config", "--run-dir", runs, "--name", "r", cwd=tmp_path))
    assert f'run_dir = "{runs}"' in printed
    _ok(_run(runner, "train", "--model", "mlp", "--steps", "2", "--image-size", "16", "--batch-size", "4",
             "--samples", "16", "--viz", "none", "--no-progress", "--run-dir", runs, "--name", "r", cwd=tmp_path))
    assert (runs / "r" / "checkpoints").is_dir() and (runs / "r" / "config.toml").is_file()
