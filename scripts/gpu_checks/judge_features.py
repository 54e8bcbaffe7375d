"""The judging of the checks for the features built beside the acceptance run (stall detection with the
NCCL flight recorder, evaluation under AMP, --compile, runner.observe): numbers in, a Verdict out. No
torch, no I/O, so the CPU tests feed recorded numbers."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from scripts.gpu_checks.judge import _missing_steps
from scripts.gpu_checks.verdict import Verdict, verdict_of

STALL_KINDS = ("stalled", "hang_suspected")


def stall(check: str, exit_code: int, files: Sequence[str], stacks: str, kinds: Sequence[str], frame: str) -> Verdict:
    """--on-stall stop on a rank asleep in its forward under NCCL: exit 1, a capture folder with every stack
    (the sleeping frame among them), the heartbeats and NCCL's flight-recorder dump, one stall finding."""
    problems = [] if exit_code == 1 else [f"exit code {exit_code}, expected 1 (--on-stall stop)"]
    for wanted in ("stacks.txt", "heartbeats.json"):
        if wanted not in files:
            problems.append(f"no {wanted} in the capture ({list(files)[:8]})")
    nccl = [f for f in files if f.startswith("nccl_trace")]
    if not nccl:
        problems.append("no nccl_trace_rank_* (the flight recorder's dump)")
    if frame not in stacks:
        problems.append(f"the stacks do not show the stalled frame {frame!r}")
    if not any(kind in STALL_KINDS for kind in kinds):
        problems.append(f"no stalled/hang_suspected finding (found {list(kinds)})")
    summary = f"exit {exit_code}, {len(files)} capture files, {len(nccl)} flight-recorder dumps, findings {list(kinds)}"
    return verdict_of(check, summary, problems)


def evaluation(check: str, val: Mapping[str, Mapping[int, float]], eval_every: int, steps: int) -> Verdict:
    """--val-split with --eval-every under AMP: val/loss at every evaluation step and the last, finite."""
    wanted = sorted({*range(eval_every, steps + 1, eval_every), steps})
    loss = val.get("val/loss", {})
    problems = []
    missing = _missing_steps(loss, wanted)
    if missing:
        problems.append(f"val/loss missing at steps {missing[:5]}")
    bad = [s for s, v in loss.items() if not math.isfinite(v)]
    if bad:
        problems.append(f"val/loss not finite at steps {sorted(bad)[:5]}")
    summary = f"{len(loss)} evaluations, val tags {sorted(val)}" + (
        f", last val/loss {loss[max(loss)]:.4g}" if loss else "")
    return verdict_of(check, summary, problems, evaluations=len(loss))


def compiled(check: str, compile_s: Sequence[float], loss: Mapping[int, float], log_points: Sequence[int]) -> Verdict:
    """--compile: the compile time logged once, the loss at every log point and finite."""
    problems = [] if compile_s and compile_s[0] > 0 else ["no time/compile_s: was the model compiled?"]
    missing = _missing_steps(loss, log_points)
    if missing:
        problems.append(f"train/loss missing at steps {missing[:5]}")
    if not all(math.isfinite(v) for v in loss.values()):
        problems.append("train/loss not finite")
    took = f"compiled in {compile_s[0]:.1f} s" if compile_s else "no compile time"
    return verdict_of(check, f"{took}, {len(loss)} log points", problems)


def own_loop(check: str, loss_steps: Sequence[int], log_points: Sequence[int], tags: Sequence[str],
             wanted_tags: Sequence[str]) -> Verdict:
    """runner.observe around a plain CUDA loop: the loss at every log point, and the device's memory and
    the step's time breakdown among the tags."""
    problems = []
    missing = _missing_steps(loss_steps, log_points)
    if missing:
        problems.append(f"train/loss missing at steps {missing[:5]}")
    absent = sorted(set(wanted_tags) - set(tags))
    if absent:
        problems.append(f"tags missing: {absent}")
    return verdict_of(check, f"{len(loss_steps)} log points, {len(tags)} scalar tags", problems)
