"""The judging of every GPU check: numbers in, a Verdict out. No torch, no CUDA, no I/O, so the CPU tests
feed recorded numbers and the judging cannot rot between GPU runs."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from scripts.gpu_checks.verdict import Verdict, failed, passed, skipped, verdict_of

MEMORY_TAGS = ("memory/allocated", "memory/reserved", "memory/peak")
NVML_TAGS = ("system/gpu_util", "system/gpu_power_w", "system/gpu_temp_c", "memory/gpu_used", "memory/gpu_total")
ESTIMATE_TOLERANCE = 0.15  # |estimate - measured| / measured
AUTO_HEADROOM = 0.8  # the chosen batch's peak within this share of the budget
PEAK_TOLERANCE = 0.01
INTERRUPT_SECONDS = 5.0
OVERHEAD_GOAL = 1.01
MIB = 1 << 20


def _missing_steps(steps: Iterable[int], expected: Iterable[int]) -> list[int]:
    return sorted(set(expected) - set(steps))


def streams(check: str, exit_code: int, scalars: Mapping[str, Sequence[int]], images: Sequence[str],
            histograms: Sequence[str], graph: bool, visdom_types: Mapping[str, int], steps: int, log_every: int,
            amp_scale: Sequence[float] | None) -> Verdict:
    """A run with every stream on: TensorBoard read back (scalar tag → steps, image and histogram tags, the
    graph) and the Visdom env's windows counted by type; `amp_scale` the GradScaler's logged scale (fp16)."""
    problems = [] if exit_code == 0 else [f"exit code {exit_code}"]
    log_points = [s for s in range(1, steps + 1) if s % log_every == 0 or s == steps]
    missing = _missing_steps(scalars.get("train/loss", ()), log_points)
    if missing:
        problems.append(f"train/loss missing at steps {missing[:5]}")
    if not images:
        problems.append("no image grid in TensorBoard")
    if not any(t.startswith("grad") for t in histograms) or not any(t.startswith("weight") for t in histograms):
        problems.append(f"weight and gradient histograms expected, got {len(histograms)} tags")
    if not graph:
        problems.append("no model graph in TensorBoard")
    if visdom_types.get("plot", 0) + visdom_types.get("line", 0) < 3 or not visdom_types.get("image"):
        problems.append(f"Visdom env lacks line or image panes: {dict(visdom_types)}")
    if amp_scale is not None:
        if not amp_scale:
            problems.append("no train/amp_scale under fp16 + GradScaler")
        elif not all(math.isfinite(v) and 0 < v <= 65536.0 for v in amp_scale):
            problems.append(f"GradScaler scale out of range: {list(amp_scale)[:5]}")
    summary = (f"{len(scalars)} scalar tags, {len(images)} image tags, {len(histograms)} histogram tags, "
               f"graph {'yes' if graph else 'no'}, Visdom {sum(visdom_types.values())} windows"
               + (f", amp scale {amp_scale[-1]:g}" if amp_scale else ""))
    return verdict_of(check, summary, problems, scalar_tags=len(scalars), visdom=dict(visdom_types))


def syncs(check: str, report: Mapping[str, Any] | None) -> Verdict:
    """The trainer's RUNNER_SYNC_DEBUG report: no sync on the training thread between log points."""
    if report is None:
        return failed(check, "no report", "the trainer wrote no sync report: RUNNER_SYNC_DEBUG not honoured")
    steady = report.get("steady_syncs", {})
    training, others = int(steady.get("training_thread", 0)), int(steady.get("other_threads", 0))
    per_point = [int(p["syncs"]) for p in report.get("log_points", [])]
    steps = int(report.get("steady_steps", 0))
    cost = f"log points cost {min(per_point)}-{max(per_point)} syncs" if per_point else "no steady log point"
    summary = f"{training} syncs on the training thread in {steps} steady steps ({others} on sink threads); {cost}"
    problems = []
    if steps <= 0:
        problems.append("no steady-state steps were observed")
    if training:
        sites = ", ".join(f"{site} ×{n}" for site, n in list(report.get("steady_sites", {}).items())[:5])
        problems.append(f"syncs between log points at {sites}")
    return verdict_of(check, summary, problems, training=training, others=others, log_points=per_point,
                      steps=steps)


def memory_series(check: str, series: Mapping[str, Mapping[int, float]], steps: int,
                  reference_peaks: Sequence[float]) -> Verdict:
    """allocated/reserved/peak at every step 1..steps; each step's peak equal (1 %) to
    torch.cuda.max_memory_allocated() read in the same process right after that step's update."""
    problems = []
    for tag in MEMORY_TAGS:
        missing = _missing_steps(series.get(tag, {}).keys(), range(1, steps + 1))
        if missing:
            problems.append(f"{tag} missing at {len(missing)} steps (first {missing[:3]})")
    peaks = [series.get("memory/peak", {}).get(s) for s in range(1, steps + 1)]
    worst = 0.0
    if len(reference_peaks) != steps:
        problems.append(f"{len(reference_peaks)} reference readings for {steps} steps")
    else:
        for step, (got, want) in enumerate(zip(peaks, reference_peaks, strict=True), start=1):
            if got is None:
                continue
            error = abs(got - want) / max(want, 1.0)
            worst = max(worst, error)
            if error > PEAK_TOLERANCE:
                problems.append(f"step {step}: peak {got:.0f} vs max_memory_allocated {want:.0f}")
                break
    allocated, reserved = series.get("memory/allocated", {}), series.get("memory/reserved", {})
    if any(allocated[s] > reserved.get(s, math.inf) for s in allocated):
        problems.append("allocated above reserved")
    summary = f"{steps} steps × {len(MEMORY_TAGS)} series; peak vs max_memory_allocated worst {100 * worst:.2f}%"
    return verdict_of(check, summary, problems, worst_peak_error=worst)


def nvml(check: str, readings: Mapping[str, Sequence[float]], torch_total: int) -> Verdict:
    """NVML readings as logged (tag → values): present and plausible, and of torch's device (its size)."""
    problems = [f"{tag} never logged" for tag in NVML_TAGS if not readings.get(tag)]
    util, power, temp = (readings.get(t, []) for t in ("system/gpu_util", "system/gpu_power_w", "system/gpu_temp_c"))
    used, total = readings.get("memory/gpu_used", []), readings.get("memory/gpu_total", [])
    if any(not 0 <= u <= 100 for u in util):
        problems.append(f"utilisation outside 0-100 %: {max(util)}")
    if util and max(util) == 0:
        problems.append("utilisation 0 % throughout a training run")
    if any(not 10 <= p <= 2000 for p in power):
        problems.append(f"power outside 10-2000 W: {min(power)}-{max(power)}")
    if any(not 5 <= t <= 110 for t in temp):
        problems.append(f"temperature outside 5-110 °C: {min(temp)}-{max(temp)}")
    if total and abs(total[-1] - torch_total) > 0.1 * torch_total:
        problems.append(f"NVML total {total[-1]:.3g} B is not torch's device ({torch_total:.3g} B): wrong GPU?")
    if used and total and any(u > t for u, t in zip(used, total, strict=False)):
        problems.append("used above total")
    summary = ", ".join(f"{tag.split('/')[-1]} {min(vals):.4g}-{max(vals):.4g}"
                        for tag, vals in readings.items() if vals and tag in NVML_TAGS)
    return verdict_of(check, summary or "no readings", problems)


def estimates(check: str, rows: Sequence[Mapping[str, Any]], expected: int) -> Verdict:
    """The estimate's five parts against two real steps, each row {model, precision, estimate, parts, peak
    (cudnn.benchmark off), peak_benchmark} or {model, precision, error}, the most important first. The
    estimate is judged against the peak without cuDNN's autotuning workspaces (which it does not model);
    the workspace is reported apart, so a miss says which of the two it is."""
    problems, parts = [], []
    table = ["| row | estimate MiB | peak MiB (benchmark off) | error | cuDNN workspace MiB | biggest part |",
             "|---|---:|---:|---:|---:|---|"]
    worst = 0.0
    for row in rows:
        name = f"{row['model']} {row['precision']}"
        if "peak" not in row:
            problems.append(f"{name}: {row.get('error', 'not measured')}")
            table.append(f"| {name} | | | | | {row.get('error', 'not measured')} |")
            continue
        error = (row["estimate"] - row["peak"]) / max(row["peak"], 1)
        workspace = row.get("peak_benchmark", row["peak"]) - row["peak"]
        worst = max(worst, abs(error))
        parts.append(f"{name} {100 * error:+.1f}%")
        biggest = max(row.get("parts", {}).items(), key=lambda kv: kv[1], default=("?", 0))
        table.append(f"| {name} | {row['estimate'] / MIB:.1f} | {row['peak'] / MIB:.1f} | {100 * error:+.1f}% "
                     f"| {workspace / MIB:.1f} | {biggest[0]} {biggest[1] / MIB:.1f} MiB |")
        if abs(error) > ESTIMATE_TOLERANCE:
            problems.append(f"{name} off by {100 * error:+.1f}%")
    if len(rows) < expected:
        problems.append(f"{len(rows)} of {expected} rows measured")
    result = verdict_of(check, ", ".join(parts) or "no rows", problems, worst=worst, rows=list(rows))
    result.table = "\n".join(table)
    return result


def auto_batch(check: str, exit_code: int, budget: int, chosen: int | None, max_batch: int,
               trials: Sequence[tuple[int, bool]], peak: float | None) -> Verdict:
    """--batch-size auto under a per-process budget: a trial ran out of memory, the choice is capped, and
    the training's measured peak is within 80 % of the budget."""
    problems = [] if exit_code == 0 else [f"exit code {exit_code}"]
    if chosen is None:
        problems.append("no choice printed")
    elif not 1 <= chosen <= max_batch:
        problems.append(f"chose {chosen}, cap {max_batch}")
    if not any(not fits for _b, fits in trials):
        problems.append("no trial ran out of memory: the out-of-memory path of the search never ran")
    if peak is None:
        problems.append("no measured peak")
    elif peak > AUTO_HEADROOM * budget:
        problems.append(f"peak {peak / 2**30:.2f} GiB over 80% of the {budget / 2**30:.2f} GiB budget")
    share = f"{100 * peak / budget:.0f}%" if peak else "?"
    summary = f"chose {chosen} after {len(trials)} trials; peak {share} of a {budget / 2**30:.2f} GiB budget"
    return verdict_of(check, summary, problems, chosen=chosen, trials=list(trials), peak=peak, budget=budget)


def oom(check: str, exit_code: int, error_line: str, files: Sequence[str], summary_text: str,
        snapshot_keys: Sequence[str], snapshot_ooms: int, last_step: int | None, oom_step: int,
        viewer_ok: bool) -> Verdict:
    """A real out-of-memory error at step K: exit 1, one-line diagnosis, memory_summary, a snapshot the
    memory-viz tools load (with the OOM recorded), last.pt at K-1."""
    problems = [] if exit_code == 1 else [f"exit code {exit_code}, expected 1"]
    if f"out of memory at step {oom_step}" not in error_line:
        problems.append(f"error line: {error_line[:120]!r}")
    for name in ("diagnosis.txt", "error.txt", "memory_summary.txt", "memory_snapshot.pickle"):
        if name not in files:
            problems.append(f"no {name}")
    if "memory summary" not in summary_text.lower():
        problems.append("memory_summary.txt is not torch.cuda.memory_summary()")
    if not {"segments", "device_traces"} <= set(snapshot_keys):
        problems.append(f"snapshot keys {sorted(snapshot_keys)}")
    if snapshot_ooms < 1:
        problems.append("the snapshot's trace holds no oom event (history not recorded?)")
    if not viewer_ok:
        problems.append("torch.cuda._memory_viz could not render the snapshot")
    if last_step != oom_step - 1:
        problems.append(f"last.pt at step {last_step}, expected {oom_step - 1}")
    summary = (f"exit {exit_code}, {len(files)} post-mortem files, snapshot ooms {snapshot_ooms}, "
               f"last.pt step {last_step}")
    return verdict_of(check, summary, problems)


def oom_retry(check: str, exit_code: int, notes: Sequence[str], batch: int, steps_logged: Sequence[int],
              steps: int) -> Verdict:
    """--oom retry: each note halves the batch, and the run finishes every step."""
    problems = [] if exit_code == 0 else [f"exit code {exit_code}"]
    if not notes:
        problems.append("no out-of-memory note: the batch never ran out of memory")
    sizes = [batch]
    for note in notes:
        if f"with batch {sizes[-1]}: going on with batch {sizes[-1] // 2}" not in note:
            problems.append(f"unexpected note {note!r}")
            break
        sizes.append(sizes[-1] // 2)
    if max(steps_logged, default=0) != steps:
        problems.append(f"last logged step {max(steps_logged, default=0)} of {steps}")
    return verdict_of(check, f"batch {' → '.join(map(str, sizes))}, finished {max(steps_logged, default=0)} steps",
                      problems, sizes=sizes)


def data_parallel(check: str, exit_code: int, gpus: int, loss: Sequence[float], activations: float | None) -> Verdict:
    """--strategy dp: trains, finite loss, and the live estimate counts the replicas' activations."""
    problems = [] if exit_code == 0 else [f"exit code {exit_code}"]
    if not loss or not all(math.isfinite(v) for v in loss):
        problems.append(f"loss {list(loss)[:3]}")
    if not activations:
        problems.append("memory/estimate_activations is 0 or missing (saved-tensor hooks missed the replicas)")
    act = f"{activations / 2**20:.1f} MiB" if activations else "none"
    return verdict_of(check, f"{gpus} GPU(s), {len(loss)} log points, activations {act}", problems)


def nccl(check: str, gpus: int, exit_code: int | None, steps_logged: Sequence[int], steps: int) -> Verdict:
    """ddp --nproc 2 over NCCL: needs two GPUs (one per rank)."""
    if gpus < 2:
        return skipped(check, f"{gpus} GPU visible: NCCL needs one GPU per rank, a 2-rank run needs 2")
    problems = [] if exit_code == 0 else [f"exit code {exit_code}"]
    if max(steps_logged, default=0) != steps:
        problems.append(f"last logged step {max(steps_logged, default=0)} of {steps}")
    return verdict_of(check, f"2 ranks on {gpus} GPUs, {len(steps_logged)} log points", problems)


def interrupt(check: str, started: bool, pids: Sequence[int], alive_after: Sequence[int], seconds: float,
              exit_code: int | None, nvml_pids: Sequence[int] | None, used_before: float | None,
              used_after: float | None) -> Verdict:
    """Ctrl+C during a GPU run with workers: every process gone within 5 s; NVML shows none of them."""
    if not started:
        return failed(check, "never started", "the run did not reach its first step in time")
    problems = []
    if alive_after:
        problems.append(f"{len(alive_after)} of {len(pids)} processes alive after {INTERRUPT_SECONDS:g} s: "
                        f"{list(alive_after)}")
    if exit_code != 130:  # stopped by SIGINT
        problems.append(f"exit code {exit_code}, expected 130")
    holding = sorted(set(pids) & set(nvml_pids or ()))
    if holding:
        problems.append(f"NVML lists run processes {holding}")
    freed = ""
    if used_before is not None and used_after is not None:
        freed = f", GPU used {used_after / 2**20:.0f} MiB after vs {used_before / 2**20:.0f} MiB before the run"
        if used_after > used_before + (256 << 20):
            problems.append(f"GPU memory not returned{freed}")
    nv = "NVML unavailable" if nvml_pids is None else f"NVML lists {len(nvml_pids)} processes"
    gone = "all gone" if not alive_after else f"{len(alive_after)} still alive"
    summary = f"{len(pids)} processes, {gone} after {seconds:.1f} s, exit {exit_code}; {nv}{freed}"
    return verdict_of(check, summary, problems, seconds=seconds, pids=len(pids))


def overhead(check: str, pairs: Sequence[tuple[float, float]], error: str = "") -> Verdict:
    """Median over alternating pairs of runner's steady-state step time / the bare loop's, against the
    1.01× goal. `pairs` are (bare, runner) seconds per step; `error` the helper's own (a timeout after
    some pairs still judges the pairs it wrote)."""
    if not pairs:
        return failed(check, "no runs", error or "no paired runs completed")
    ratio = statistics.median(r / b for b, r in pairs)
    bare = statistics.median(b for b, _r in pairs)
    summary = f"runner {ratio:.3f}× the bare loop (median of {len(pairs)} pairs, bare {1000 * bare:.1f} ms/step)"
    problems = [] if ratio <= OVERHEAD_GOAL else [f"{ratio:.3f}× is above the {OVERHEAD_GOAL}× goal"]
    if error:
        problems.append(f"helper: {error}")
    return verdict_of(check, summary, problems, ratio=ratio, pairs=list(pairs))


def findings(records: Sequence[Mapping[str, Any]], error: str) -> list[str]:
    """Problems in a healthy run's findings.json: it must exist and hold no warning or error (GPU-only
    false positives, such as allocator pressure from cuDNN workspaces, show up here)."""
    if error:
        return [f"findings: {error}"]
    return [f"finding {f.get('severity')} {f.get('kind')} at step {f.get('step')}: {str(f.get('message'))[:160]}"
            for f in records if f.get("severity") in ("warning", "error")]


def nccl_one(check: str, steps_logged: Sequence[int], steps: int, stderr: str) -> Verdict:
    """ddp --nproc 1 over NCCL with SyncBatchNorm: init_process_group(device_id=), DDP with device_ids,
    gather_object and barriers at log points, teardown; every log point reached."""
    problems = []
    if max(steps_logged, default=0) != steps:
        problems.append(f"last logged step {max(steps_logged, default=0)} of {steps}")
    said = [line.strip() for line in stderr.splitlines()
            if "nccl" in line.lower() and ("error" in line.lower() or "warn" in line.lower())]
    if said:
        problems.append(f"NCCL said ({len(said)} lines): {said[0][:160]}")
    return verdict_of(check, f"1 rank over NCCL, {len(steps_logged)} log points", problems)


def profile(check: str, files: Sequence[str], categories: Mapping[str, int], snapshot_allocs: int,
            error: str) -> Verdict:
    """--profile on CUDA: a Chrome trace with GPU kernels in it and an allocator snapshot with allocations."""
    problems = [f"profile read-back: {error}"] if error else []
    if not any(f.startswith("trace") for f in files):
        problems.append(f"no trace file in profile/ ({list(files)})")
    kernels = sum(n for cat, n in categories.items() if cat.lower() in ("kernel", "gpu_memcpy", "gpu_memset"))
    if not kernels:
        problems.append(f"the trace holds no GPU kernels (categories {sorted(categories)[:8]})")
    if not snapshot_allocs:
        problems.append("no allocations in the profile's memory snapshot")
    summary = f"{len(files)} files, {kernels} GPU events, {snapshot_allocs} allocations in the snapshot"
    return verdict_of(check, summary, problems, kernels=kernels, allocs=snapshot_allocs)


def out_of_time(check: str, budget: float, left: float, ident: str) -> Verdict:
    return skipped(check, f"its {budget:.0f} s budget did not fit the {max(left, 0):.0f} s left: "
                          f"rerun with --only {ident}")


__all__ = ["auto_batch", "data_parallel", "estimates", "findings", "interrupt", "memory_series", "nccl", "nccl_one",
           "nvml", "oom", "oom_retry", "out_of_time", "overhead", "passed", "profile", "streams", "syncs"]
