"""Where a run came from, written once at its start to `runs/<name>/env.json`: the command line, the
resolved config, the code version (git commit, plus a hash and size of the uncommitted diff), the
installed packages, Python, the host, the devices and the world size.

Why: "what is different from the run that worked?" needs more than the config; `runner diff` compares
two of these files, `runner report` shows a short form. Never fails a run: git may be missing or slow
(each call has a short timeout), NVML may be absent. Torch-free at import: devices are read through
torch only when the caller (the trainer) has already imported it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from runner.procs import proc_table, run_tag

log = logging.getLogger("runner")

ENV_FILE = "env.json"
GIT_TIMEOUT_S = 2.0


def _git(folder: Path, *args: str) -> str | None:
    """`git -C folder ARGS`'s stdout, or None (no git, not a work tree, too slow)."""
    try:
        done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, timeout=GIT_TIMEOUT_S,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.decode(errors="replace") if done.returncode == 0 else None


def code_folder() -> Path:
    """The folder of the code that runs: the script's (`python train.py`, `python -m pkg`), else the cwd."""
    script = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if script is not None and script.is_file():
        return script.resolve().parent
    return Path.cwd()


def git_state(folder: Path) -> dict[str, Any] | None:
    """Commit, branch and the uncommitted diff (sha256 and size) of the work tree holding `folder`."""
    top = _git(folder, "rev-parse", "--show-toplevel")
    if top is None:
        return None
    commit = (_git(folder, "rev-parse", "HEAD") or "").strip() or None
    branch = (_git(folder, "rev-parse", "--abbrev-ref", "HEAD") or "").strip() or None
    diff = _git(folder, "diff", "HEAD", "--no-color", "--no-ext-diff")
    untracked = _git(folder, "ls-files", "--others", "--exclude-standard")
    state: dict[str, Any] = {"root": top.strip(), "commit": commit, "branch": branch}
    if diff is not None:
        raw = diff.encode()
        state["dirty"] = bool(raw)
        state["diff_sha256"] = hashlib.sha256(raw).hexdigest() if raw else None
        state["diff_bytes"] = len(raw)
    if untracked is not None:
        state["untracked_files"] = len(untracked.splitlines())
    return state


def packages() -> dict[str, str]:
    """Every installed distribution's version, by normalised name."""
    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").strip().lower().replace("_", "-")
        if name:
            found.setdefault(name, dist.version)
    return dict(sorted(found.items()))


def devices() -> dict[str, Any]:
    """The accelerators as torch and NVML see them; only when torch is already imported (never loads it)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return {}
    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                            "cuda_available": torch.cuda.is_available(), "gpus": []}
    if torch.cuda.is_available():
        info["cudnn"] = torch.backends.cudnn.version()
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            info["gpus"].append({"name": props.name, "memory_bytes": props.total_memory,
                                 "capability": f"{props.major}.{props.minor}"})
        info["driver"] = _nvml_driver()
    return info


def _nvml_driver() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # no driver, no library: the rest of env.json still matters
        return None


def collect(config: dict[str, Any], world_size: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything env.json holds (`extra`: what the caller adds, e.g. an own loop's model and optimizer)."""
    return {
        "written": time.time(),
        "command": _command(),
        "config": config,
        "git": git_state(code_folder()),
        "runner": _runner_version(),
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation()},
        "packages": packages(),
        "host": {"name": socket.gethostname(), "platform": platform.platform(), "machine": platform.machine(),
                 "cpus": os.cpu_count()},
        "devices": devices(),
        "world_size": world_size,
        **(extra or {}),
    }


def _command() -> dict[str, Any]:
    """This process's command line, and the one that started the run where that was another process (the
    `runner train ...` of a supervised trainer, the `torchrun ...` of a rank): the run root's."""
    command: dict[str, Any] = {"argv": list(getattr(sys, "orig_argv", sys.argv)), "cwd": os.getcwd(),
                               "executable": sys.executable}
    root = run_tag.parse_root(os.environ.get(run_tag.ROOT_ENV))
    if root is not None and root[0] != os.getpid() and proc_table.is_running(*root):
        command["run_argv"] = proc_table.read_argv(root[0])
    return command


def _runner_version() -> str:
    from runner.version import __version__

    return __version__


def write(run_path: Path, config: dict[str, Any], world_size: int, extra: dict[str, Any] | None = None) -> None:
    """Write `<run>/env.json` (whole, atomically); a failure is a warning, never the run's end."""
    try:
        data = collect(config, world_size, extra)
        path = Path(run_path) / ENV_FILE
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str))
        os.replace(tmp, path)
    except Exception as exc:  # provenance is a record, not a requirement
        log.warning("env.json not written (%s: %s)", type(exc).__name__, exc)


def read(run_path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((Path(run_path) / ENV_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def short(env: dict[str, Any]) -> str:
    """One line for `runner report`: torch, Python, code version, host and devices, world size."""
    parts = []
    torch_version = (env.get("devices") or {}).get("torch") or (env.get("packages") or {}).get("torch")
    if torch_version:
        parts.append(f"torch {torch_version}")
    parts.append(f"Python {(env.get('python') or {}).get('version', '?')}")
    git = env.get("git")
    if isinstance(git, dict) and git.get("commit"):
        dirty = f" + uncommitted diff {git.get('diff_bytes', 0):,} B" if git.get("dirty") else ""
        parts.append(f"git {str(git['commit'])[:10]}{dirty}")
    host = (env.get("host") or {}).get("name")
    gpus = [g.get("name") for g in (env.get("devices") or {}).get("gpus") or []]
    parts.append(f"on {host or '?'}" + (f" ({len(gpus)}x {gpus[0]})" if gpus else " (cpu)"))
    parts.append(f"world size {env.get('world_size', '?')}")
    return ", ".join(parts)
