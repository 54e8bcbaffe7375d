"""What every GPU check shares: the context, the one way a child process is started (its command line,
stdout and stderr kept for the evidence archive), and the rules that put a run's own error into its
verdict whatever its read-back found."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scripts.gpu_checks import judge, readback
from scripts.gpu_checks.verdict import Verdict, amend

ROOT = Path(__file__).resolve().parents[2]
GiB = 1 << 30
TAIL_CHARS = 500  # of a run's stderr, in a verdict's reason
GRACE = 5.0  # seconds between SIGTERM and SIGKILL for a child past its budget (plan.ENDING covers both waits)


@dataclass
class Context:
    """What the checks share: folders, the environment for child processes, the GPU, a Visdom server."""

    work: Path
    gpus: int
    total_memory: int
    visdom_url: str = ""
    device: str = "cuda"  # "cpu" only to rehearse the checks' own code where there is no GPU (tests)
    size: int = 256  # image side of the Tiny-UNet runs
    batch: int = 16
    overhead_steps: int = 300  # per overhead run, updates 50-250 timed (the image and histogram steps 100, 200 in)
    python: list[str] = field(default_factory=lambda: [sys.executable])  # the rehearsal replays instead
    facts: dict[str, Any] = field(default_factory=dict)  # results later checks use (e.g. the auto batch)
    started: int = 0  # child processes so far: numbers their log files in order
    last: Outcome | None = None  # the latest child's, for a check whose own code then failed

    @property
    def runs(self) -> Path:
        return self.work / "runs"

    @property
    def logs(self) -> Path:
        return self.work / "logs"

    def env(self, **extra: str) -> dict[str, str]:
        """The children's environment: this tree first on the path, the run registry under the work
        folder (not the machine's ~/.local/state), a real supervisor and trainer as a user gets."""
        paths = [str(ROOT), os.environ.get("PYTHONPATH", "")]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p),
                   XDG_STATE_HOME=str(self.work / "state"), **extra)
        return env

    def budget_env(self, budget: int, **extra: str) -> dict[str, str]:
        """A per-process CUDA memory cap, honoured by the caching allocator (torch >= 2.9)."""
        return self.env(PYTORCH_CUDA_ALLOC_CONF=f"per_process_memory_fraction:{budget / self.total_memory:.6f}",
                        **extra)

    def log_files(self, label: str) -> Path:
        """`logs/NN-label`: the stem of one child's .cmd/.stdout/.stderr files."""
        self.started += 1
        self.logs.mkdir(parents=True, exist_ok=True)
        return self.logs / f"{self.started:02d}-{label}"


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str


def execute(ctx: Context, label: str, args: list[str], timeout: float, env: dict[str, str] | None = None
            ) -> Outcome:
    """`<python> ARGS` with a timeout; its command line, exit code, stdout and stderr go to logs/."""
    stem = ctx.log_files(label)
    cmd = [*ctx.python, *args]
    began = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or ctx.env(),
                            cwd=ROOT, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        out = Outcome(proc.returncode, stdout, stderr)
    except subprocess.TimeoutExpired:
        stdout, stderr = _end_group(proc)
        out = Outcome(124, stdout, stderr + f"\n(timed out after {timeout:.0f} s)")
    record(stem, cmd, env or ctx.env(), out, time.monotonic() - began)
    ctx.last = out
    return out


def record(stem: Path, cmd: list[str], env: dict[str, str], out: Outcome, seconds: float) -> None:
    """The evidence of one child: what ran, under which of our variables, how it ended, what it said."""
    ours = {k: v for k, v in env.items() if k.startswith(("RUNNER_", "PYTORCH_", "XDG_STATE", "CUDA_", "NCCL_"))}
    lines = [" ".join(cmd), *(f"{k}={v}" for k, v in sorted(ours.items())), f"exit {out.code} after {seconds:.1f} s"]
    stem.with_suffix(".cmd").write_text("\n".join(lines) + "\n")
    stem.with_suffix(".stdout").write_text(out.stdout)
    stem.with_suffix(".stderr").write_text(out.stderr)


def _end_group(proc: subprocess.Popen) -> tuple[str, str]:
    """A child past its budget, with everything it started (trainer, workers, torchrun ranks): SIGTERM to
    its process group (runner checkpoints and exits), SIGKILL after GRACE s. Nothing may outlive a check
    and hold GPU memory during the next one. What it printed."""
    for sig, wait in ((signal.SIGTERM, GRACE), (signal.SIGKILL, GRACE)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            return proc.communicate(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    return "", "(the child did not end after SIGKILL)"


def runner(ctx: Context, label: str, args: list[str], timeout: float, env: dict[str, str] | None = None) -> Outcome:
    """`python -m runner ARGS` as a user would start it (supervisor and trainer processes)."""
    return execute(ctx, label, ["-m", "runner", *args], timeout, env)


def train_args(ctx: Context, name: str, *extra: str) -> list[str]:
    return ["train", "--device", ctx.device, "--run-dir", str(ctx.runs), "--name", name, "--no-progress",
            "--resume", "never", "--data", "synthetic", *extra]


def error_tail(stderr: str) -> str:
    """A run's own error in a few lines: runner's one-line error if it printed one, else the end of its
    stderr (a traceback's last lines name the exception)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    mine = [line for line in lines if line.startswith("runner: error:")]
    text = mine[-1] if mine else " | ".join(lines[-4:])
    return text[-TAIL_CHARS:] or "(no stderr)"


def explain(verdict: Verdict, out: Outcome) -> Verdict:
    """A run that failed: its exit code and its own error first in the reason, whatever else was found."""
    if out.code == 0:
        return verdict
    return amend(verdict, [f"exit {out.code}: {error_tail(out.stderr)}"], first=True)


def healthy(verdict: Verdict, out: Outcome, run: Path) -> Verdict:
    """A run that should be healthy: its error (if any) first, then any warning or error finding."""
    if out.code == 0:
        records, error = readback.findings(run)
        verdict = amend(verdict, judge.findings(records, error))
    return explain(verdict, out)


def inprocess(ctx: Context, kind: str, timeout: float, *args: str) -> tuple[dict[str, Any] | None, str]:
    """`python -m scripts.gpu_checks.inprocess KIND OUT.json ARGS`: its JSON (written as it goes, so a
    timeout still leaves what was measured), and "" or the child's own error."""
    out_file = ctx.work / f"{kind}.json"
    out = execute(ctx, kind, ["-m", "scripts.gpu_checks.inprocess", kind, str(out_file), "--device", ctx.device,
                              *args], timeout)
    data = readback.json_dict(out_file)  # None: nothing written, or cut short mid-write
    return data, "" if out.code == 0 else f"exit {out.code}: {error_tail(out.stderr)}"
