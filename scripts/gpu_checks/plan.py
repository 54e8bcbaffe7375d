"""Which checks run, in what order, within what time: the table of checks (most telling first) and the
loop that starts each only if its budget fits the time left, and after each rewrites report.md,
report.json and the evidence archive, so a run cut short still leaves all it found."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scripts.gpu_checks import archive, checks_features, checks_memory, checks_train, judge, verdict
from scripts.gpu_checks.runs import Context, error_tail

DEADLINE = 390.0  # seconds from the script's start (cold `import torch` included) until no check may run past
ENDING = 12.0  # of a check's budget, kept for ending a child past its timeout (SIGTERM, then SIGKILL) and read-back
NEEDS_FRACTION = "fraction"  # PYTORCH_CUDA_ALLOC_CONF per_process_memory_fraction honoured (torch >= 2.9)
NEEDS_VISDOM = "visdom"  # the local Visdom server answers


@dataclass(frozen=True)
class Check:
    ident: str  # what --only takes
    title: str
    budget: float  # seconds: its children's timeout, and what must be left to start it
    what: str
    run: Callable[[Context, float], list[verdict.Verdict]]
    needs: tuple[str, ...] = ()


CHECKS: list[Check] = [
    Check("fp16", "single GPU fp16", 75, "Tiny-UNet 256², --amp (fp16 + GradScaler), 4 workers, every stream to "
          "TensorBoard and a local Visdom, both read back; no syncs between log points (RUNNER_SYNC_DEBUG); "
          "NVML plausible; findings.json without warnings", checks_train.fp16, (NEEDS_VISDOM,)),
    Check("estimates", "estimate vs measured", 70, "the memory estimate against two real steps, tinyunet AMP "
          "first; peak with cudnn.benchmark off (judged, 15 %) and on (the workspace, reported apart)",
          checks_memory.estimates),
    Check("overhead", "overhead vs bare loop", 80, "runner at its default cadence, both sinks, against a bare loop; "
          "4 DataLoader workers in both; steady-state steps 50-250 of 300; alternating pairs (goal 1.01×)",
          checks_train.overhead),
    Check("nccl1", "ddp nproc 1 NCCL", 55, "--strategy ddp --nproc 1 --sync-bn: torchrun, NCCL init with device_id, "
          "SyncBatchNorm conversion (one rank syncs nothing), DDP device_ids, gather_object, barriers, teardown",
          checks_train.nccl_one),
    Check("oom", "real OOM at step K", 40, "out of memory from the allocator at step 3 under a budget: exit 1, "
          "memory_summary, a snapshot torch's memory-viz renders, last.pt at step 2", checks_memory.oom_at_step,
          (NEEDS_FRACTION,)),
    Check("auto", "batch size auto", 60, "--batch-size auto under a 6 GiB per-process budget: a trial runs out of "
          "memory, the training peak stays within 80 % of the budget", checks_memory.auto_batch, (NEEDS_FRACTION,)),
    Check("memory", "per-step CUDA memory", 40, "allocated/reserved/peak every step; peak = max_memory_allocated() "
          "(1 %)", checks_memory.memory_series),
    Check("profile", "profile on CUDA", 45, "--profile 3:5: a Chrome trace with GPU kernels, an allocator snapshot",
          checks_train.profile),
    Check("ctrl-c", "Ctrl+C with 4 workers", 60, "SIGINT to the process group: all gone within 5 s, NVML lists none",
          checks_train.interrupt),
    Check("stall", "stall with flight recorder", 70, "one NCCL rank asleep at step 6, --stall-timeout 5 --on-stall "
          "stop: stacks, heartbeats, the NCCL flight recorder's dump, a stall finding, exit 1", checks_features.stall),
    Check("val-amp", "evaluation under AMP", 45, "--val-split 0.2 --eval-every 5 with --amp: val/loss at each "
          "evaluation, finite; findings.json without warnings", checks_features.evaluation),
    Check("bf16", "single GPU bf16", 60, "the fp16 run under --amp-dtype bf16 (no GradScaler)", checks_train.bf16,
          (NEEDS_VISDOM,)),
    Check("observe", "runner.observe", 40, "an own CUDA loop (its own GradScaler, pinned workers) under "
          "runner.observe: loss, step time and CUDA memory logged; findings.json without warnings",
          checks_features.own_loop),
    Check("compile", "compile", 120, "--compile with --amp: inductor/Triton on this GPU, time/compile_s apart, the "
          "loss at every log point", checks_features.compiled),
    Check("retry", "oom retry", 50, "--oom retry halves the batch until it fits and finishes", checks_memory.oom_retry,
          (NEEDS_FRACTION,)),
    Check("dp", "strategy dp", 35, "nn.DataParallel on the visible GPUs; the live estimate counts replica threads",
          checks_train.data_parallel),
    Check("nccl2", "ddp nproc 2 NCCL", 45, "two ranks over NCCL with SyncBatchNorm (SKIP with one GPU)",
          checks_train.nccl_two),
]


def select(only: list[str]) -> list[Check]:
    """The checks named by --only (comma-separated ids, the option repeated or not), in table order."""
    wanted = {ident.strip() for item in only for ident in item.split(",") if ident.strip()}
    unknown = wanted - {c.ident for c in CHECKS}
    if unknown:
        raise ValueError(f"unknown check(s) {', '.join(sorted(unknown))}; known: {', '.join(c.ident for c in CHECKS)}")
    return [c for c in CHECKS if not wanted or c.ident in wanted]


def run_checks(ctx: Context, checks: list[Check], out: Path, environment: dict[str, Any], deadline: float,
               missing: Callable[[str], str]) -> list[verdict.Verdict]:
    """Each check whose budget fits before `deadline` (time.monotonic()), and whose needs are met
    (`missing(need)` says why not, or ""); the reports and the archive rewritten after each."""
    verdicts: list[verdict.Verdict] = []
    for check in checks:
        began, left = time.monotonic(), deadline - time.monotonic()
        lacking = [why for why in map(missing, check.needs) if why] if check.budget <= left else []
        if check.budget > left:
            results = [judge.out_of_time(check.title, check.budget, left, check.ident)]
        elif lacking:
            results = [verdict.failed(check.title, "not run", "; ".join(lacking))]
        else:
            ctx.last = None
            try:
                results = check.run(ctx, check.budget - ENDING)
            except Exception as exc:  # the checks' own bug: named with the run's error, the next check still runs
                ran = ctx.last if ctx.last is not None and ctx.last.code != 0 else None
                run_error = f"; the last run: exit {ran.code}: {error_tail(ran.stderr)}" if ran else ""
                results = [verdict.failed(check.title, "crashed", f"{type(exc).__name__}: {exc}{run_error}")]
        for result in results:
            result.seconds = time.monotonic() - began
            print(result.line(), flush=True)
        verdicts += results
        save(ctx, out, verdicts, environment)
    return verdicts


def save(ctx: Context, out: Path, verdicts: list[verdict.Verdict], environment: dict[str, Any]) -> None:
    """report.md, report.json and the evidence archive (its size and what it left out go in the report)."""
    out.mkdir(parents=True, exist_ok=True)
    verdict.write(ctx.work, verdicts, environment)  # a copy inside the archive too
    size, left_out = archive.write(ctx.work, out / archive.ARCHIVE)
    facts = dict(environment, evidence=f"{archive.ARCHIVE} {size / 2**20:.2f} MiB, {len(left_out)} files left out")
    verdict.write(out, verdicts, facts)
