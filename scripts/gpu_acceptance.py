"""The GPU acceptance run (issue 10): every CUDA path of runner, proven in at most 8 minutes on one GPU.

    python scripts/gpu_acceptance.py --dry-run      # the checks and the shell line; no CUDA needed
    python scripts/gpu_acceptance.py --out DIR      # one line per check; DIR/report.md, DIR/report.json

On the GPU machine (no package registry) it starts from a copy of the working tree plus `.gpu-bundle/`
(`make gpu-bundle`) through the one line that --dry-run prints. Exit code: 0 all passed or skipped,
1 a check failed, 2 no CUDA here. Each check has a time budget and the whole run a deadline; a check
the deadline leaves no time for is a SKIP that says so.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.gpu_checks import judge, runs, verdict  # noqa: E402
from scripts.gpu_checks.bundle import BUNDLE, SHELL_LINE  # noqa: E402

DEADLINE = 450.0  # seconds for all checks: the 8 minutes less start-up and installing the bundle
FRACTION_TORCH = "2.9"  # the first torch whose PYTORCH_CUDA_ALLOC_CONF takes per_process_memory_fraction

Check = Callable[[runs.Context, float], list[verdict.Verdict]]
# name, budget in seconds, what it proves, the function; in the order they run (most telling first)
CHECKS: list[tuple[str, float, str, Check]] = [
    ("single GPU fp16", 120, "Tiny-UNet 256², AMP fp16 + GradScaler, 4 workers, pin_memory, every stream to "
     "TensorBoard and a local Visdom, both read back; with it: no syncs between log points "
     "(set_sync_debug_mode, RUNNER_SYNC_DEBUG) and NVML readings plausible", lambda c, t: runs.streams(c, "fp16", t)),
    ("per-step CUDA memory", 60, "allocated/reserved/peak every step; peak = max_memory_allocated() (1 %)",
     runs.memory_series),
    ("estimate vs measured", 90, "runner memory on mlp, cnn, resnet18, tinyunet in fp32 and AMP; target 15 %",
     runs.estimates),
    ("batch size auto", 75, "--batch-size auto under a 6 GiB per-process budget: a trial runs out of memory, "
     "the training peak stays within 80 % of the budget", runs.auto_batch),
    ("real OOM at step K", 45, "out of memory from the allocator at step 3: exit 1, memory_summary, a snapshot "
     "torch's memory-viz tools render, last.pt at step 2", runs.oom_at_step),
    ("oom retry", 60, "--oom retry halves the batch until it fits and finishes", runs.oom_retry),
    ("strategy dp", 45, "nn.DataParallel on the visible GPUs; the live estimate counts replica threads",
     runs.data_parallel),
    ("ddp nproc 2 NCCL", 60, "two ranks over NCCL with SyncBatchNorm (SKIP with one GPU)", runs.nccl),
    ("Ctrl+C with 4 workers", 45, "SIGINT to the process group: all gone within 5 s, NVML lists none of them",
     runs.interrupt),
    ("single GPU bf16", 75, "the same run under bf16 autocast", runs.bf16),
    ("overhead vs bare loop", 120, "Tiny-UNet 256², AMP, batch 32, every stream, both sinks, median of paired "
     "runs against a bare loop (goal 1.01×); Lightning where installed", runs.overhead),
]
NEEDS_FRACTION = ("batch size auto", "real OOM at step K", "oom retry")


def dry_run() -> int:
    print("GPU acceptance checks (each a real run through the runner CLI unless stated):")
    for name, budget, what, _check in CHECKS:
        print(f"  - {name} [{budget:.0f} s]: {what}")
    print(f"deadline for all checks: {DEADLINE:.0f} s")
    print(f"\nbuild the bundle here: make gpu-bundle  (then carry {BUNDLE}/ with the working tree)")
    print(f"on the GPU machine, from the repository root:\n{SHELL_LINE}")
    return 0


def environment() -> dict[str, str]:
    import torch

    props = torch.cuda.get_device_properties(0)
    facts = {"python": platform.python_version(), "torch": torch.__version__, "cuda": str(torch.version.cuda),
             "gpu": props.name, "gpus": str(torch.cuda.device_count()), "memory": f"{props.total_memory / 2**30:.1f} GiB"}
    for package in ("typer", "visdom", "tornado", "tensorboard"):
        try:
            from importlib.metadata import version

            facts[package] = version(package)
        except Exception:
            facts[package] = "missing"
    return facts


def fraction_honoured() -> str:
    """'' when a child process under PYTORCH_CUDA_ALLOC_CONF=per_process_memory_fraction:0.5 reports 0.5."""
    code = "import torch; torch.cuda.init(); print(torch.cuda.get_per_process_memory_fraction(0))"
    env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF="per_process_memory_fraction:0.5")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    except subprocess.TimeoutExpired:
        return "the probe timed out"
    if out.stdout.strip() == "0.5":
        return ""
    return f"PYTORCH_CUDA_ALLOC_CONF per_process_memory_fraction not honoured (needs torch >= {FRACTION_TORCH})"


def start_visdom(work: Path) -> tuple[subprocess.Popen | None, str]:
    """A real Visdom server on 127.0.0.1 (offline: the bundle's assets), or (None, '') if it won't answer."""
    from dashboards import servers

    port = 8097 + os.getpid() % 1000
    cmd = servers.visdom_command(port, "127.0.0.1", work / "visdom", "", False)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        if servers.answers(url + "/"):
            return proc, url
        time.sleep(0.2)
    proc.kill()
    return None, ""


def run_all(out: Path, deadline_s: float, only: set[str]) -> int:
    import tempfile

    import torch

    started = time.monotonic()
    env = environment()
    print("environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    fraction_problem = fraction_honoured()
    work = Path(tempfile.mkdtemp(prefix="gpu-acceptance-"))
    (work / "visdom").mkdir()
    server, url = start_visdom(work)
    ctx = runs.Context(work=work, gpus=torch.cuda.device_count(),
                       total_memory=torch.cuda.get_device_properties(0).total_memory, visdom_url=url)
    verdicts: list[verdict.Verdict] = []
    try:
        for name, budget, _what, check in CHECKS:
            if only and name not in only:
                continue
            left = deadline_s - (time.monotonic() - started)
            began = time.monotonic()
            if left < min(budget, 30):
                results = [judge.out_of_time(name)]
            elif name in NEEDS_FRACTION and fraction_problem:
                results = [verdict.failed(name, "not run", fraction_problem)]
            elif name.startswith("single GPU") and not url:
                results = [verdict.failed(name, "not run", "the local Visdom server did not start")]
            else:
                try:
                    results = check(ctx, min(budget, left))
                except Exception as exc:
                    results = [verdict.failed(name, "crashed", f"{type(exc).__name__}: {exc}")]
            for result in results:
                result.seconds = time.monotonic() - began
                print(result.line(), flush=True)
            verdicts += results
            verdict.write(out, verdicts, env)  # a run cut short still leaves its report
    finally:
        if server is not None:
            server.kill()
    code = verdict.exit_code(verdicts)
    print(f"{sum(v.status == 'FAIL' for v in verdicts)} failed, report in {out}/report.md "
          f"({time.monotonic() - started:.0f} s)", flush=True)
    return code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for report.md and report.json")
    parser.add_argument("--dry-run", action="store_true", help="list the checks and the GPU machine's shell line")
    parser.add_argument("--deadline", type=float, default=DEADLINE, help=f"seconds for all checks ({DEADLINE:.0f})")
    parser.add_argument("--only", action="append", default=[], metavar="CHECK", help="run only this check (repeat)")
    args = parser.parse_args()
    if args.dry_run:
        return dry_run()
    import torch

    if not torch.cuda.is_available():
        print("gpu_acceptance: needs CUDA (torch.cuda.is_available() is False); try --dry-run", file=sys.stderr)
        return 2
    if args.out is None:
        parser.error("--out DIR is required")
    unknown = set(args.only) - {name for name, *_ in CHECKS}
    if unknown:
        parser.error(f"unknown check(s): {', '.join(sorted(unknown))}")
    return run_all(args.out, args.deadline, set(args.only))


if __name__ == "__main__":
    sys.exit(main())
