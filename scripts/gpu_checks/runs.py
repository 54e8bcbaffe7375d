"""The GPU checks as real runs: `runner` CLI processes (and two in-process helpers), read back into plain
numbers for `judge`. Each function returns Verdicts; every subprocess has a timeout."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scripts.gpu_checks import judge, readback
from scripts.gpu_checks.verdict import Verdict, skipped

ROOT = Path(__file__).resolve().parents[2]
GiB = 1 << 30


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
    facts: dict[str, Any] = field(default_factory=dict)  # results later checks use (e.g. the auto batch)

    def env(self, **extra: str) -> dict[str, str]:
        paths = [str(ROOT), os.environ.get("PYTHONPATH", "")]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p), **extra)
        env.pop("RUNNER_IN_PROCESS", None)  # a real supervisor and trainer, as a user gets
        return env

    def budget_env(self, budget: int, **extra: str) -> dict[str, str]:
        """A per-process CUDA memory cap, honoured by the caching allocator (torch >= 2.9)."""
        return self.env(PYTORCH_CUDA_ALLOC_CONF=f"per_process_memory_fraction:{budget / self.total_memory:.6f}",
                        **extra)


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str


def runner(ctx: Context, args: list[str], timeout: float, env: dict[str, str] | None = None) -> Outcome:
    """`python -m runner ARGS` as a user would start it (supervisor and trainer processes)."""
    try:
        proc = subprocess.run([sys.executable, "-m", "runner", *args], capture_output=True, text=True,
                              env=env or ctx.env(), timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired as exc:
        return Outcome(124, _text(exc.stdout), _text(exc.stderr) + f"\n(timed out after {timeout:.0f} s)")
    return Outcome(proc.returncode, proc.stdout, proc.stderr)


def _text(data: bytes | str | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def train_args(ctx: Context, name: str, *extra: str) -> list[str]:
    return ["train", "--device", ctx.device, "--run-dir", str(ctx.work), "--name", name, "--no-progress",
            "--resume", "never", "--data", "synthetic", *extra]


def _error_line(stderr: str) -> str:
    return next((line for line in stderr.splitlines() if line.startswith("runner: error:")), stderr[-300:])


def _problem(check: str, out: Outcome) -> Verdict:
    return judge.failed(check, f"exit {out.code}", _error_line(out.stderr))


# --- single GPU, every stream, both sinks; sync debug; NVML ----------------------------------------

def streams(ctx: Context, precision: str, timeout: float) -> list[Verdict]:
    steps, log_every = 40, 10
    name = f"streams-{precision}"
    sync_file = ctx.work / f"{name}-syncs.json"
    args = train_args(ctx, name, "--model", "tinyunet", "--image-size", str(ctx.size), "--batch-size",
                      str(ctx.batch), "--amp", "--workers", "4", "--steps", str(steps), "--log-every", str(log_every), "--images-every", "20",
                      "--hist-every", "20", "--system-every", "0.5", "--viz", "both", "--visdom-url", ctx.visdom_url,
                      "--experiment", "accept", "--checkpoint-every", "1000")
    if precision == "bf16":
        args += ["--amp-dtype", "bf16"]
    out = runner(ctx, args, timeout, ctx.env(RUNNER_SYNC_DEBUG=str(sync_file)))
    board = readback.board(ctx.work / name)
    windows = readback.visdom_windows(ctx.visdom_url, f"accept_{name}") if ctx.visdom_url else {}
    amp_scale = board.values("train/amp_scale") if precision == "fp16" else None
    verdicts = [judge.streams(f"single GPU {precision}", out.code, {t: board.steps(t) for t in board.scalars},
                              board.images, board.histograms, board.graph, readback.window_types(windows), steps,
                              log_every, amp_scale)]
    if out.code != 0:
        verdicts[0].reason += f"; {_error_line(out.stderr)}"
    if precision == "fp16":
        report = json.loads(sync_file.read_text()) if sync_file.is_file() else None
        verdicts.append(judge.syncs("no added syncs", report))
        readings = {tag: board.values(tag) for tag in judge.NVML_TAGS}
        verdicts.append(judge.nvml("NVML readings", readings, ctx.total_memory))
    return verdicts


def bf16(ctx: Context, timeout: float) -> list[Verdict]:
    helps = runner(ctx, ["train", "--help"], 60)
    if "--amp-dtype" not in helps.stdout:
        return [skipped("single GPU bf16", "runner train has no --amp-dtype option: CUDA AMP is fp16 only")]
    return streams(ctx, "bf16", timeout)


# --- in-process helpers ----------------------------------------------------------------------------

def _inprocess(ctx: Context, kind: str, timeout: float, *args: str) -> tuple[dict[str, Any] | None, str]:
    out_file = ctx.work / f"{kind}.json"
    try:
        proc = subprocess.run([sys.executable, "-m", "scripts.gpu_checks.inprocess", kind, str(out_file), *args],
                              capture_output=True, text=True, env=ctx.env(), timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    if proc.returncode != 0 or not out_file.is_file():
        return None, (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
    return json.loads(out_file.read_text()), ""


def memory_series(ctx: Context, timeout: float) -> list[Verdict]:
    data, error = _inprocess(ctx, "memory", timeout, "--steps", "12", "--size", "128", "--batch", "16",
                             "--log-every", "4")
    if data is None:
        return [judge.failed("per-step CUDA memory", "no run", error)]
    series = {tag: {int(s): v for s, v in values.items()} for tag, values in data["series"].items()}
    return [judge.memory_series("per-step CUDA memory", series, data["steps"], data["reference"])]


def overhead(ctx: Context, timeout: float) -> list[Verdict]:
    data, error = _inprocess(ctx, "overhead", timeout, "--steps", "60", "--size", "256", "--batch", "32", "--amp",
                             "--pairs", "5", "--visdom-url", ctx.visdom_url, "--seconds", str(0.7 * timeout))
    if data is None:
        return [judge.failed("overhead vs bare loop", "no run", error)]
    return [judge.overhead("overhead vs bare loop", [tuple(p) for p in data["pairs"]],
                           {k: [tuple(p) for p in v] for k, v in data["peers"].items()})]


# --- runner memory: estimate vs measured -----------------------------------------------------------

ESTIMATED = (("mlp", 128, 64), ("cnn", 128, 64), ("resnet18", 128, 64), ("tinyunet", 256, 16))


def estimates(ctx: Context, timeout: float) -> list[Verdict]:
    rows: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    for model, size, batch in ESTIMATED:
        for amp in (False, True):
            left = deadline - time.monotonic()
            precision = "amp" if amp else "fp32"
            if left < 5:
                rows.append({"model": model, "precision": precision, "error": "no time left"})
                continue
            out = runner(ctx, ["memory", "--model", model, "--input-shape", f"3,{size},{size}", "--batch-size",
                               str(batch), "--device", "cuda", "--json", *(["--amp"] if amp else [])], left)
            try:
                measured = json.loads(out.stdout[out.stdout.index("{"):])["measured"]  # past any stray line
                rows.append({"model": model, "precision": precision, "estimate": measured["estimate"],
                             "peak": measured["peak"]})
            except (ValueError, KeyError) as exc:
                rows.append({"model": model, "precision": precision,
                             "error": f"{type(exc).__name__}: {_error_line(out.stderr)[:100]}"})
    return [judge.estimates("estimate vs measured", rows)]


# --- --batch-size auto under a budget; real OOM at step K; --oom retry ------------------------------

AUTO_BUDGET = 6 * GiB
TRIAL = re.compile(r"batch\s+(\d+): (fits|does not fit)")


def auto_batch(ctx: Context, timeout: float) -> list[Verdict]:
    name, cap = "auto", 1024
    out = runner(ctx, train_args(ctx, name, "--model", "tinyunet", "--image-size", "256", "--amp", "--batch-size",
                                 "auto", "--max-batch-size", str(cap), "--samples", "4096", "--steps", "3",
                                 "--log-every", "1", "--viz", "tensorboard", "--no-graph"),
                 timeout, ctx.budget_env(AUTO_BUDGET))
    trials = [(int(b), verdict == "fits") for b, verdict in TRIAL.findall(out.stderr)]
    chosen_match = re.search(r"using (\d+) \(", out.stderr)
    chosen = int(chosen_match.group(1)) if chosen_match else None
    largest = max((b for b, fits in trials if fits), default=None)
    ctx.facts["auto_largest"] = largest
    peaks = readback.board(ctx.work / name).values("memory/peak")
    verdict = judge.auto_batch("batch size auto", out.code, AUTO_BUDGET, chosen, cap, trials, max(peaks, default=None))
    if out.code != 0:
        verdict.reason += f"; {_error_line(out.stderr)}"
    return [verdict]


def oom_at_step(ctx: Context, timeout: float) -> list[Verdict]:
    from scripts.gpu_checks.models import OOM_STEP

    name = "oom"
    out = runner(ctx, train_args(ctx, name, "--model", "scripts.gpu_checks.models:oom_at_step_3", "--image-size", "64",
                                 "--batch-size", "8", "--steps", "6", "--log-every", "1", "--checkpoint-every", "100",
                                 "--memory-snapshot", "--viz", "tensorboard", "--no-graph"),
                 timeout, ctx.budget_env(2 * GiB))
    pm = readback.post_mortem(ctx.work / name / "oom")
    last = ctx.work / name / "checkpoints" / "last.pt"
    last_step = None
    if last.is_file():
        from runner.train import checkpoint

        last_step = int(checkpoint.load(last)["step"])
    return [judge.oom("real OOM at step K", out.code, _error_line(out.stderr), pm.files, pm.summary,
                      pm.snapshot_keys, pm.snapshot_ooms, last_step, OOM_STEP, pm.viewer_ok)]


def oom_retry(ctx: Context, timeout: float) -> list[Verdict]:
    name, steps = "retry", 4
    largest = ctx.facts.get("auto_largest") or 64
    batch = 4 * largest  # two halvings from out of memory to what the search found to fit
    out = runner(ctx, train_args(ctx, name, "--model", "tinyunet", "--image-size", "256", "--amp", "--batch-size",
                                 str(batch), "--samples", str(2 * batch), "--steps", str(steps), "--log-every", "1",
                                 "--oom", "retry", "--viz", "tensorboard", "--no-graph"),
                 timeout, ctx.budget_env(AUTO_BUDGET))
    board = readback.board(ctx.work / name)
    verdict = judge.oom_retry("oom retry", out.code, board.texts.get("memory_oom", []), batch,
                              board.steps("train/loss"), steps)
    if out.code != 0:
        verdict.reason += f"; {_error_line(out.stderr)}"
    return [verdict]


# --- strategies ------------------------------------------------------------------------------------

def data_parallel(ctx: Context, timeout: float) -> list[Verdict]:
    name = "dp"
    out = runner(ctx, train_args(ctx, name, "--strategy", "dp", "--model", "tinyunet", "--image-size",
                                 str(ctx.size // 2), "--batch-size", str(2 * ctx.batch), "--steps", "6", "--log-every", "2", "--viz", "tensorboard",
                                 "--no-graph"), timeout)
    board = readback.board(ctx.work / name)
    activations = board.values("memory/estimate_activations")
    verdict = judge.data_parallel("strategy dp", out.code, ctx.gpus, board.values("train/loss"),
                                  activations[0] if activations else None)
    if out.code != 0:
        verdict.reason += f"; {_error_line(out.stderr)}"
    return [verdict]


def nccl(ctx: Context, timeout: float) -> list[Verdict]:
    if ctx.gpus < 2:
        return [judge.nccl("ddp nproc 2 NCCL", ctx.gpus, None, [], 0)]
    name, steps = "ddp", 6
    out = runner(ctx, train_args(ctx, name, "--strategy", "ddp", "--nproc", "2", "--sync-bn", "--model", "cnn",
                                 "--image-size", "64", "--batch-size", "16", "--steps", str(steps), "--log-every",
                                 "2", "--viz", "tensorboard", "--no-graph"), timeout)
    return [judge.nccl("ddp nproc 2 NCCL", ctx.gpus, out.code, readback.board(ctx.work / name).steps("train/loss"),
                       steps)]


# --- Ctrl+C with workers -----------------------------------------------------------------------------

def nvml_processes() -> tuple[list[int] | None, float | None]:
    """Pids NVML lists on any GPU (whatever memory they report), and the first GPU's used bytes."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return None, None
    try:
        pids: list[int] = []
        used = None
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            if used is None:
                used = float(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
            for query in (pynvml.nvmlDeviceGetComputeRunningProcesses, pynvml.nvmlDeviceGetGraphicsRunningProcesses):
                try:
                    pids += [p.pid for p in query(handle)]
                except pynvml.NVMLError:
                    continue
        return pids, used
    finally:
        pynvml.nvmlShutdown()


def interrupt(ctx: Context, timeout: float) -> list[Verdict]:
    import psutil

    _pids, used_before = nvml_processes()
    args = train_args(ctx, "interrupt", "--model", "tinyunet", "--image-size", str(ctx.size), "--batch-size",
                      str(ctx.batch), "--amp", "--workers", "4", "--steps", "100000", "--log-every", "1", "--viz", "tensorboard", "--no-graph")
    proc = subprocess.Popen([sys.executable, "-m", "runner", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=ctx.env(), cwd=ROOT, start_new_session=True)
    started = threading.Event()

    def watch() -> None:
        for line in proc.stderr:  # type: ignore[union-attr]
            if re.search(r"step [1-9]\d*/", line):
                started.set()

    threading.Thread(target=watch, daemon=True).start()
    started.wait(timeout=min(timeout - 15, 90))
    if proc.poll() is not None:
        return [judge.failed("Ctrl+C with 4 workers", f"exit {proc.returncode}", "the run ended before Ctrl+C")]
    root = psutil.Process(proc.pid)
    processes = [root, *root.children(recursive=True)]  # taken before the signal: pids are not reused meanwhile
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends the foreground process group on Ctrl+C
    began = time.monotonic()
    _gone, alive = psutil.wait_procs(processes, timeout=judge.INTERRUPT_SECONDS)
    seconds = time.monotonic() - began
    # psutil reaps the root (our child) when it waits for it: its exit code is psutil's, not Popen's
    code: int | None = getattr(root, "returncode", None)
    if root in alive:
        try:
            code = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
    for process in alive:  # leave nothing behind for the next check
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    tree = [p.pid for p in processes]
    nvml_pids, used_after = nvml_processes()
    return [judge.interrupt("Ctrl+C with 4 workers", started.is_set(), tree, [p.pid for p in alive], seconds, code,
                            nvml_pids, used_before, used_after)]
