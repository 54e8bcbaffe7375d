"""The training checks: one run with every stream and both sinks (fp16, bf16), strategies (DataParallel,
NCCL with one rank and with two), --profile, Ctrl+C with workers, and the overhead against a bare loop.
Each returns Verdicts; a failed run's own error comes first in its verdict's reason."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time

from runner.telemetry import tags
from scripts.gpu_checks import judge, readback
from scripts.gpu_checks.runs import (
    ROOT,
    Context,
    Outcome,
    error_tail,
    explain,
    healthy,
    inprocess,
    record,
    runner,
    train_args,
)
from scripts.gpu_checks.verdict import Verdict, amend

# --- single GPU, every stream, both sinks; sync debug; NVML; findings ------------------------------


def streams(ctx: Context, precision: str, timeout: float) -> list[Verdict]:
    steps, log_every = 40, 10
    name, check = f"streams-{precision}", f"single GPU {precision}"
    sync_file = ctx.work / f"{name}-syncs.json"
    args = train_args(ctx, name, "--model", "tinyunet", "--image-size", str(ctx.size), "--batch-size",
                      str(ctx.batch), "--amp", "--workers", "4", "--steps", str(steps), "--log-every", str(log_every),
                      "--images-every", "20", "--hist-every", "20", "--system-every", "0.5", "--viz", "both",
                      "--visdom-url", ctx.visdom_url, "--experiment", "accept", "--checkpoint-every", "1000")
    if precision == "bf16":  # fp16 is what --amp gives on CUDA: a GradScaler with it
        args += ["--amp-dtype", "bf16"]
    out = runner(ctx, name, args, timeout, ctx.env(RUNNER_SYNC_DEBUG=str(sync_file)))
    board = readback.board(ctx.runs / name)
    windows, visdom_error = readback.visdom_windows(ctx.visdom_url, f"accept_{name}") if ctx.visdom_url else ({}, "")
    amp_scale = board.values(tags.AMP_SCALE) if precision == "fp16" else None
    main = judge.streams(check, out.code, {t: board.steps(t) for t in board.scalars}, board.images, board.histograms,
                         board.graph, readback.window_types(windows), steps, log_every, amp_scale)
    main = amend(main, [e for e in (board.error, visdom_error) if e])
    verdicts = [healthy(main, out, ctx.runs / name)]
    if precision == "fp16":
        verdicts.append(explain(judge.syncs("no added syncs", readback.json_dict(sync_file)), out))
        readings = {tag: board.values(tag) for tag in judge.NVML_TAGS}
        verdicts.append(explain(judge.nvml("NVML readings", readings, ctx.total_memory), out))
    return verdicts


def fp16(ctx: Context, timeout: float) -> list[Verdict]:
    return streams(ctx, "fp16", timeout)


def bf16(ctx: Context, timeout: float) -> list[Verdict]:
    return streams(ctx, "bf16", timeout)


# --- strategies ------------------------------------------------------------------------------------

def data_parallel(ctx: Context, timeout: float) -> list[Verdict]:
    name = "dp"
    out = runner(ctx, name, train_args(ctx, name, "--strategy", "dp", "--model", "tinyunet", "--image-size",
                                       str(ctx.size // 2), "--batch-size", str(2 * ctx.batch), "--steps", "6",
                                       "--log-every", "2", "--viz", "tensorboard", "--no-graph"), timeout)
    board = readback.board(ctx.runs / name)
    activations = board.values(tags.estimate("activations"))
    verdict = judge.data_parallel("strategy dp", out.code, ctx.gpus, board.values(tags.LOSS),
                                  activations[0] if activations else None)
    return [healthy(verdict, out, ctx.runs / name)]


def nccl_one(ctx: Context, timeout: float) -> list[Verdict]:
    """The NCCL path on one GPU: torchrun, init_process_group(device_id=), SyncBatchNorm conversion, DDP
    with device_ids, gather_object and barriers at log points, teardown."""
    name, steps = "ddp1", 6
    out = runner(ctx, name, train_args(ctx, name, "--strategy", "ddp", "--nproc", "1", "--sync-bn", "--model", "cnn",
                                       "--image-size", "64", "--batch-size", "16", "--steps", str(steps),
                                       "--log-every", "2", "--viz", "tensorboard", "--no-graph"), timeout)
    board = readback.board(ctx.runs / name)
    verdict = amend(judge.nccl_one("ddp nproc 1 NCCL", board.steps(tags.LOSS), steps, out.stderr),
                    [board.error] if board.error else [])
    return [healthy(verdict, out, ctx.runs / name)]


def nccl_two(ctx: Context, timeout: float) -> list[Verdict]:
    if ctx.gpus < 2:
        return [judge.nccl("ddp nproc 2 NCCL", ctx.gpus, None, [], 0)]
    name, steps = "ddp2", 6
    out = runner(ctx, name, train_args(ctx, name, "--strategy", "ddp", "--nproc", "2", "--sync-bn", "--model", "cnn",
                                       "--image-size", "64", "--batch-size", "16", "--steps", str(steps),
                                       "--log-every", "2", "--viz", "tensorboard", "--no-graph"), timeout)
    verdict = judge.nccl("ddp nproc 2 NCCL", ctx.gpus, out.code, readback.board(ctx.runs / name).steps(tags.LOSS),
                         steps)
    return [healthy(verdict, out, ctx.runs / name)]


# --- --profile on CUDA -------------------------------------------------------------------------------

def profile(ctx: Context, timeout: float) -> list[Verdict]:
    name = "profile"
    out = runner(ctx, name, train_args(ctx, name, "--model", "tinyunet", "--image-size", "128", "--batch-size",
                                       str(ctx.batch), "--amp", "--steps", "8", "--log-every", "4", "--profile",
                                       "3:5", "--viz", "tensorboard", "--no-graph"), timeout)
    found = readback.profile(ctx.runs / name / "profile")
    verdict = judge.profile("profile on CUDA", found.files, found.categories, found.snapshot_allocs, found.error)
    return [healthy(verdict, out, ctx.runs / name)]


# --- overhead: steady-state steps against a bare loop, alternating pairs ----------------------------

def overhead(ctx: Context, timeout: float) -> list[Verdict]:
    data, error = inprocess(ctx, "overhead", timeout, "--steps", str(ctx.overhead_steps),
                            "--size", str(ctx.size), "--batch", "32", "--amp",
                            "--visdom-url", ctx.visdom_url, "--seconds", str(0.75 * timeout))
    pairs = [(float(b), float(r)) for b, r in (data or {}).get("pairs", [])]
    return [judge.overhead("overhead vs bare loop", pairs, error)]


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

    check = "Ctrl+C with 4 workers"
    _pids, used_before = nvml_processes()
    args = train_args(ctx, "interrupt", "--model", "tinyunet", "--image-size", str(ctx.size), "--batch-size",
                      str(ctx.batch), "--amp", "--workers", "4", "--steps", "100000", "--log-every", "1", "--viz",
                      "tensorboard", "--no-graph")
    cmd = [*ctx.python, "-m", "runner", *args]
    stem, began_run = ctx.log_files("interrupt"), time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ctx.env(),
                            cwd=ROOT, start_new_session=True)
    started, lines = threading.Event(), []

    def watch() -> None:
        for line in proc.stderr:  # type: ignore[union-attr]
            lines.append(line)
            if re.search(r"step [1-9]\d*/", line):
                started.set()

    reader = threading.Thread(target=watch, daemon=True)
    reader.start()
    deadline = time.monotonic() + min(timeout - 15, 90)
    while not started.is_set() and proc.poll() is None and time.monotonic() < deadline:
        started.wait(0.2)
    if proc.poll() is not None:
        reader.join(timeout=5)
        out = Outcome(proc.returncode, "", "".join(lines))
        record(stem, cmd, ctx.env(), out, time.monotonic() - began_run)
        why = f"the run ended before Ctrl+C: {error_tail(out.stderr)}"
        return [judge.failed(check, f"exit {proc.returncode}", why)]
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
    reader.join(timeout=5)
    record(stem, cmd, ctx.env(), Outcome(-1 if code is None else code, "", "".join(lines)),
           time.monotonic() - began_run)
    tree = [p.pid for p in processes]
    nvml_pids, used_after = nvml_processes()
    verdict = judge.interrupt(check, started.is_set(), tree, [p.pid for p in alive], seconds, code, nvml_pids,
                              used_before, used_after)
    return [verdict if started.is_set() else amend(verdict, [error_tail("".join(lines))])]
