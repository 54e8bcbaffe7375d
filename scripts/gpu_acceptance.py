"""The GPU acceptance run (issue 22): every CUDA path of runner, in at most 7 minutes of one GPU window.

    python scripts/gpu_acceptance.py --dry-run             # the checks and the shell line; no torch needed
    python scripts/gpu_acceptance.py --out DIR             # one line per check; DIR gets 3 files
    python scripts/gpu_acceptance.py --out DIR --only nccl1,profile   # chosen checks (a second window)
    python scripts/gpu_acceptance.py --out DIR --rehearse  # no GPU, no torch: recorded failures end to end

DIR gets report.md, report.json and evidence.tar.gz (every child's command line, stdout and stderr, the
runs' summaries, findings, OOM post-mortems, sync counts and the Visdom server's log, capped at
12 MiB), rewritten after each check. Checks run most telling first; each starts only if its budget fits
before the deadline (else a SKIP naming the --only that reruns it). Exit code: 0 all passed or
skipped, 1 a check failed, 2 no CUDA here (or a bad option).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STARTED = time.monotonic()  # the deadline counts from here: a cold `import torch` is inside it
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.gpu_checks import archive, plan, rehearse, runs, verdict  # noqa: E402
from scripts.gpu_checks.bundle import BUNDLE, SHELL_LINE  # noqa: E402

FRACTION_TORCH = "2.9"  # the first torch whose PYTORCH_CUDA_ALLOC_CONF takes per_process_memory_fraction


def dry_run() -> int:
    print("GPU acceptance checks, most telling first (--only ID[,ID] runs chosen ones):")
    for check in plan.CHECKS:
        print(f"  - {check.ident}: {check.title} [{check.budget:.0f} s]: {check.what}")
    print(f"deadline: {plan.DEADLINE:.0f} s from start; a check starts only if its budget fits the time left")
    print(f"back in --out: report.md, report.json, {archive.ARCHIVE} (at most {archive.CAP >> 20} MiB)")
    print(f"\nbuild the bundle here: make gpu-bundle  (then carry {BUNDLE}/ with the working tree)")
    print(f"on the GPU machine, from the repository root (ACCEPT=\"--only ID,ID\" reruns chosen checks):\n{SHELL_LINE}")
    return 0


def environment() -> dict[str, str]:
    import torch

    props = torch.cuda.get_device_properties(0)
    facts = {"python": platform.python_version(), "torch": torch.__version__, "cuda": str(torch.version.cuda),
             "gpu": props.name, "gpus": str(torch.cuda.device_count()),
             "memory": f"{props.total_memory / 2**30:.1f} GiB"}
    from importlib.metadata import PackageNotFoundError, version

    for package in ("typer", "visdom", "tornado", "tensorboard"):
        try:
            facts[package] = version(package)
        except PackageNotFoundError:
            facts[package] = "missing"
    return facts


class FractionProbe:
    """Whether a child under PYTORCH_CUDA_ALLOC_CONF=per_process_memory_fraction:0.5 reports 0.5; started at
    once in the background (its cold `import torch` overlaps the first checks), asked when first needed."""

    def __init__(self, env: dict[str, str]) -> None:
        code = "import torch; torch.cuda.init(); print(torch.cuda.get_per_process_memory_fraction(0))"
        env = dict(env, PYTORCH_CUDA_ALLOC_CONF="per_process_memory_fraction:0.5")
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)
        self.answer: str | None = None

    def problem(self) -> str:
        if self.answer is None:
            try:
                stdout, stderr = self.proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                stdout, stderr = "", "the probe timed out"
            self.answer = "" if stdout.strip() == "0.5" else (
                f"PYTORCH_CUDA_ALLOC_CONF per_process_memory_fraction not honoured (needs torch >= {FRACTION_TORCH}): "
                f"{runs.error_tail(stderr) if stderr.strip() else stdout.strip()}")
        return self.answer


def start_visdom(work: Path) -> tuple[subprocess.Popen | None, str]:
    """A real Visdom server on 127.0.0.1 (offline: the bundle's assets), its output in work/visdom-server.log;
    (None, '') if it won't answer."""
    from dashboards import servers

    (work / "visdom").mkdir(parents=True, exist_ok=True)
    port = 8097 + os.getpid() % 1000
    cmd = servers.visdom_command(port, "127.0.0.1", work / "visdom", "", False)
    with (work / "visdom-server.log").open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        if servers.answers(url + "/"):
            return proc, url
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    return None, ""


def stop(server: subprocess.Popen | None) -> None:
    if server is not None:
        server.kill()
        server.wait()


def run_gpu(out: Path, checks: list[plan.Check], deadline_s: float) -> int:
    import torch

    work = Path(tempfile.mkdtemp(prefix="gpu-acceptance-"))
    ctx = runs.Context(work=work, gpus=torch.cuda.device_count(),
                       total_memory=torch.cuda.get_device_properties(0).total_memory)
    probe = FractionProbe(ctx.env())
    env = environment()
    print("environment: " + ", ".join(f"{k} {v}" for k, v in env.items()) + f"; work folder {work}", flush=True)
    server, ctx.visdom_url = start_visdom(work)

    def missing(need: str) -> str:
        if need == plan.NEEDS_VISDOM:
            return "" if ctx.visdom_url else "the local Visdom server did not start (see visdom-server.log)"
        return probe.problem()

    try:
        verdicts = plan.run_checks(ctx, checks, out, env, STARTED + deadline_s, missing)
    finally:
        stop(server)
        if probe.proc.poll() is None:
            probe.proc.kill()
            probe.proc.wait()
    plan.save(ctx, out, verdicts, env)  # the server's last log lines too
    print(f"{sum(v.status == 'FAIL' for v in verdicts)} failed, report in {out}/report.md "
          f"({time.monotonic() - STARTED:.0f} s)", flush=True)
    return verdict.exit_code(verdicts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for report.md, report.json and the evidence archive")
    parser.add_argument("--dry-run", action="store_true", help="list the checks and the GPU machine's shell line")
    parser.add_argument("--rehearse", action="store_true", help="no GPU: replay recorded failures through every "
                                                                "check, then verify the reports and the archive")
    parser.add_argument("--deadline", type=float, default=plan.DEADLINE,
                        help=f"seconds from start after which no check may still run ({plan.DEADLINE:.0f})")
    parser.add_argument("--only", action="append", default=[], metavar="ID[,ID]", help="run only these checks")
    args = parser.parse_args()
    try:
        checks = plan.select(args.only)
    except ValueError as exc:
        parser.error(str(exc))
    if args.dry_run:
        return dry_run()
    if args.out is None:
        parser.error("--out DIR is required")
    if args.rehearse:
        with tempfile.TemporaryDirectory(prefix="gpu-rehearsal-") as tmp:
            server, url = start_visdom(Path(tmp))
            try:
                return rehearse.run(args.out, checks, url, Path(tmp) / "visdom-server.log")
            finally:
                stop(server)
    import torch

    if not torch.cuda.is_available():
        print("gpu_acceptance: needs CUDA (torch.cuda.is_available() is False); try --dry-run", file=sys.stderr)
        return 2
    return run_gpu(args.out, checks, args.deadline)


if __name__ == "__main__":
    sys.exit(main())
