"""The acceptance run rehearsed without a GPU or torch: every check, with its children replaced by
recorded failures (scripts/gpu_checks/replay.py), through the same loop, read-back, judging, reports and
archive as on the GPU; then what came out is verified. Used by `make gpu-rehearsal` (and the tests)."""

from __future__ import annotations

import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from scripts.gpu_checks import archive, plan, replay, runs

GiB = 1 << 30


def run(out: Path, checks: list[plan.Check], visdom_url: str, server_log: Path) -> int:
    """Each recorded failure through `checks` into out/<kind>/, against the Visdom server at `visdom_url`
    (its log, `server_log`, goes into each archive); 0 when every verdict names the failure."""
    problems = [] if visdom_url else ["the Visdom server (the bundle's, offline) did not start"]
    for kind, marker in replay.MARKERS.items():
        with tempfile.TemporaryDirectory(prefix=f"rehearse-{kind}-") as tmp:
            ctx = runs.Context(work=Path(tmp), gpus=1, total_memory=80 * GiB, visdom_url=visdom_url,
                               python=[sys.executable, str(Path(replay.__file__)), kind])
            began = time.monotonic()
            facts = {"rehearsal": kind}
            verdicts = plan.run_checks(ctx, checks, out / kind, facts, began + plan.DEADLINE, lambda _: "")
            if server_log.is_file():
                shutil.copy(server_log, ctx.work / server_log.name)
            plan.save(ctx, out / kind, verdicts, facts)
            problems += verify(out / kind, kind, marker, [(v.check, v.status, v.reason) for v in verdicts], ctx.started)
    for problem in problems:
        print(f"rehearsal: {problem}", file=sys.stderr)
    print(f"rehearsal: {len(checks)} checks × {len(replay.MARKERS)} recorded failures, "
          f"{'all verdicts name the failure' if not problems else f'{len(problems)} problems'}; reports in {out}")
    return 1 if problems else 0


def verify(out: Path, kind: str, marker: str, verdicts: list[tuple[str, str, str]], children: int) -> list[str]:
    """What must hold after a replay: every check failed with the replayed error in its reason (a SKIP
    only for what one GPU cannot run), the reports written, the archive under its cap holding every
    child's logs."""
    problems = []
    for check, status, reason in verdicts:
        if status == "PASS" or (status == "FAIL" and marker not in reason):
            problems.append(f"{kind}: {check} is {status} without the run's error: {reason[:200]!r}")
        if status == "SKIP" and "GPU visible" not in reason:
            problems.append(f"{kind}: {check} skipped: {reason}")
    for name in ("report.md", "report.json", archive.ARCHIVE):
        if not (out / name).is_file():
            problems.append(f"{kind}: no {name}")
    target = out / archive.ARCHIVE
    if target.is_file():
        size = target.stat().st_size
        if size > archive.CAP:
            problems.append(f"{kind}: {archive.ARCHIVE} is {size} bytes, over {archive.CAP}")
        with tarfile.open(target) as tar:
            names = tar.getnames()
        logged = sum(1 for n in names if n.startswith("logs/") and n.endswith(".stderr"))
        if logged != children or not {"MANIFEST.txt", "visdom-server.log"} <= set(names):
            problems.append(f"{kind}: archive holds {logged} stderr logs for {children} children, "
                            f"MANIFEST.txt and visdom-server.log: {sorted(names)[:5]}...")
    return problems
