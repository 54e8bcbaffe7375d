"""The rules: from what a run's events show to typed findings (kind, severity, one sentence, evidence, advice).

Each rule looks at the history at a log point and returns a Finding or None; `Rules` runs them and
raises each kind (per subject: a rank, a cause) once. Thresholds are named, with why that value; the
gradient rules and theirs are in `gradient_rules`.
The rules see the writer rank's event stream only, on the diagnosis sink's thread.
"""

from __future__ import annotations

import itertools
import logging
import statistics
from collections.abc import Callable

from runner.diagnosis.evidence import finding, rounded
from runner.diagnosis.fit_rules import overfitting
from runner.diagnosis.gradient_rules import exploding_gradients, vanishing_gradients
from runner.diagnosis.health_rules import diverging, loss_spike, not_learning
from runner.diagnosis.history import History
from runner.telemetry import tags
from runner.telemetry.events import Event, Finding, LogPoint

log = logging.getLogger("runner.telemetry")

# Warm-up: the first steps build the allocator's cache, start workers, fill Adam's state and run the
# one-off memory estimate; nothing measured there says anything about the steady run.
WARMUP_STEPS = 10
WARMUP_LOG_POINTS = 2  # and at least this many log points, whatever --log-every is

# input_bound: the device idles while the step waits for data. Above half the step, adding workers
# pays for itself on any device; three log points in a row rule out one slow batch or a GC pause.
INPUT_BOUND_SHARE = 0.5
INPUT_BOUND_POINTS = 3

# unreadable_samples: a corrupt file or two in a large set is noise; over 1 % of what was loaded
# skews what the model sees (and usually means a broken download or a wrong folder).
UNREADABLE_SHARE = 0.01

# memory_growth: steady training holds memory flat after warm-up (allocator and malloc noise go up
# and down). A leak (a loss kept with its graph, outputs appended to a list) only goes up: every
# reading in the last third of the window above every reading in its first third, a trend over
# 16 MiB per 100 steps, and 5 % above where it stood after warm-up.
MEMORY_POINTS = 6  # log points after warm-up the rule needs (and looks at, at most 12)
MEMORY_WINDOW = 12
MEMORY_SLOPE_MIB_PER_100 = 16.0
MEMORY_GROWTH_RATIO = 1.05

# allocator_pressure (CUDA): each alloc retry is a failed cudaMalloc, a cache flush and a retry (a
# device sync): a few after warm-up mean the run lives at the edge of the device. Reserved memory
# 1.5× the window's peak allocation and over 1 GiB idle in the cache, three log points running, is
# fragmentation the allocator cannot reuse.
ALLOC_RETRIES_MIN = 3
RESERVED_OVER_PEAK = 1.5
RESERVED_SLACK_BYTES = 1024**3
RESERVED_POINTS = 3

# straggler_rank (DDP): a rank's own work (data wait, copy, forward, optimizer: the parts without a
# collective) above the other ranks' median by 20 % of the step and at least 5 ms, at three log
# points in a row for the same rank. Below that, ranks differ by noise.
STRAGGLER_SHARE = 0.2
STRAGGLER_MIN_MS = 5.0
STRAGGLER_POINTS = 3
OWN_PARTS = ("data_wait", "h2d", "forward", "optimizer")

# dashboard_trouble: the hub dropped or coalesced events at two log points running (a sink is
# falling behind for good, not a hiccup), or a backend has been unreachable for 30 s (longer than a
# server restart takes). The finding names each sink and event kind (telemetry/dropped/<sink>/<kind>).
DROPPED_POINTS = 2
UNREACHABLE_S = 30.0
COALESCED_KINDS = ("Scalar", "MemorySample")  # past a queue limit these keep their newest value per tag

Rule = Callable[[History, int], "Finding | None"]


def input_bound(h: History, step: int) -> Finding | None:
    wait_tag, step_tag = tags.DATA_WAIT_MS, tags.STEP_MS
    points = list(h.steady)[-INPUT_BOUND_POINTS:]
    if len(points) < INPUT_BOUND_POINTS:
        return None
    waits = [w for s in points if (w := h.value(wait_tag, s)) is not None]
    steps = [t for s in points if (t := h.value(step_tag, s))]  # neither missing nor 0
    if len(waits) < len(points) or len(steps) < len(points):
        return None
    shares = [w / s for w, s in zip(waits, steps, strict=True)]
    if min(shares) <= INPUT_BOUND_SHARE:
        return None
    facts, cores = h.facts, h.facts.cores()
    per_rank = max(1, cores // facts.world)
    workers = facts.workers
    evidence = {"steps": points, "data_wait_ms": [rounded(w) for w in waits], "step_ms": [rounded(s) for s in steps],
                "share": [rounded(x, 3) for x in shares], "workers": workers, "cores": cores, "world": facts.world,
                "pin_memory": facts.cuda, "persistent_workers": workers > 0}
    if workers < per_rank:
        advice = (f"raise --workers from {workers} to {min(per_rank, max(2, 2 * workers))} "
                  f"({cores} cores available{f', {per_rank} per rank' if facts.world > 1 else ''})")
    else:
        advice = (f"the {workers} workers already use every core ({cores}): make __getitem__ cheaper "
                  "(decode and resize once, cache, store smaller images)")
    if facts.cuda:
        advice += "; batches are already pinned (pin_memory)"
    advice += "; workers persist across epochs" if workers else "; workers would persist across epochs"
    return finding("input_bound", "warning", step,
                    f"the step waits for data {100 * statistics.fmean(shares):.0f} % of the time "
                    f"({statistics.fmean(waits):.1f} of {statistics.fmean(steps):.1f} ms) at the last "
                    f"{len(points)} log points", evidence, advice)


def unreadable_samples(h: History, step: int) -> Finding | None:
    skipped = h.value(tags.SKIPPED, step)
    if not skipped or not h.facts.batch:
        return None
    loaded = max(step * h.facts.batch * h.facts.world, skipped)  # each step's batch counts its skipped samples
    share = skipped / loaded
    if share <= UNREADABLE_SHARE:
        return None
    files = h.unreadable[:5]
    evidence = {"step": step, "skipped": int(skipped), "loaded": int(loaded), "share": rounded(share, 4),
                "files": files}
    named = f" (e.g. {', '.join(files[:3])})" if files else ""
    return finding("unreadable_samples", "warning", step,
                    f"{int(skipped)} of {int(loaded)} samples loaded so far ({100 * share:.1f} %) were unreadable "
                    f"and skipped{named}", evidence,
                    "check or remove the files that fail to open (corrupt, truncated, not images); "
                    "a share this high often means a broken download or the wrong folder")


def memory_growth(h: History, step: int) -> Finding | None:
    key = "allocated" if h.facts.cuda else "rss"
    if len(h.memory) < MEMORY_POINTS or h.memory_baseline is None or key not in h.memory_baseline[1]:
        return None
    first, baseline = h.memory_baseline[0], h.memory_baseline[1][key]
    window = [(s, v[key]) for s, v in list(h.memory)[-MEMORY_WINDOW:] if key in v]
    steps = [s for s, _ in window]
    values = [v for _, v in window]
    third = len(values) // 3
    sustained = min(values[-third:]) > max(values[:third])
    slope = _slope(steps, values) * 100 / tags.MIB  # MiB per 100 steps
    growth = values[-1] / baseline if baseline else 1.0
    if not sustained or slope < MEMORY_SLOPE_MIB_PER_100 or growth < MEMORY_GROWTH_RATIO:
        return None
    estimate = h.latest(tags.ESTIMATE)
    evidence = {"measure": "device allocated" if h.facts.cuda else "host RSS", "steps": steps,
                "mib": [rounded(v / tags.MIB, 1) for v in values], "slope_mib_per_100_steps": rounded(slope, 1),
                "growth_ratio": rounded(growth, 3), "baseline_step": first,
                "estimate_total_mib": rounded(estimate.get(tags.ESTIMATE_TOTAL, 0.0) / tags.MIB, 1)}
    return finding("memory_growth", "warning", step,
                    f"{evidence['measure']} keeps rising after warm-up: {slope:.0f} MiB per 100 steps, "
                    f"{values[-1] / tags.MIB:.0f} MiB at step {steps[-1]} ({100 * (growth - 1):.0f} % above step "
                    f"{first})", evidence,
                    "something keeps tensors alive across steps: summing `loss` instead of `loss.item()` or "
                    "`loss.detach()`, appending outputs or losses to a list, a cache that never evicts")


def allocator_pressure(h: History, step: int) -> Finding | None:
    if not h.facts.cuda or h.memory_baseline is None or "reserved" not in h.memory_baseline[1]:
        return None
    (since, first), last = h.memory_baseline, list(h.memory)[-RESERVED_POINTS:]
    estimate = {k[len(tags.ESTIMATE):]: rounded(v / tags.MIB, 1) for k, v in h.latest(tags.ESTIMATE).items()}
    parts = ", ".join(f"{k} {v:.0f} MiB" for k, v in estimate.items() if k != "total")
    sized = f" (runner memory's estimate: {estimate['total']:.0f} MiB: {parts})" if "total" in estimate else ""
    advice = ("set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, lower --batch-size, or turn on --amp" + sized)
    retries = last[-1][1].get("alloc_retries", 0.0) - first.get("alloc_retries", 0.0)
    if retries >= ALLOC_RETRIES_MIN:
        evidence = {"alloc_retries": int(retries), "since_step": since, "step": last[-1][0],
                    "reserved_mib": rounded(last[-1][1]["reserved"] / tags.MIB, 1), "estimate_mib": estimate}
        return finding("allocator_pressure", "warning", step,
                        f"the CUDA allocator had to free its cache and retry {int(retries)} times since step "
                        f"{since}: the run is at the edge of device memory", evidence, advice)
    slack = [v["reserved"] - v.get("peak", v.get("allocated", 0.0)) for _, v in last]
    over = [v["reserved"] / max(v.get("peak", v.get("allocated", 0.0)), 1.0) for _, v in last]
    if len(last) == RESERVED_POINTS and min(slack) >= RESERVED_SLACK_BYTES and min(over) >= RESERVED_OVER_PEAK:
        evidence = {"steps": [s for s, _ in last],
                    "reserved_mib": [rounded(v["reserved"] / tags.MIB, 1) for _, v in last],
                    "peak_allocated_mib": [rounded(v.get("peak", v.get("allocated", 0.0)) / tags.MIB, 1)
                                           for _, v in last],
                    "estimate_mib": estimate}
        return finding("allocator_pressure", "warning", step,
                        f"the CUDA cache holds {min(over):.1f}× the peak allocation ({min(slack) / tags.MIB:.0f} MiB "
                        "reserved but unused): fragmentation", evidence, advice)
    return None


def straggler_rank(h: History, step: int) -> Finding | None:
    points = list(h.steady)[-STRAGGLER_POINTS:]
    if h.facts.world < 2 or len(points) < STRAGGLER_POINTS:
        return None
    laggards, gaps, own_by_point = set(), [], []
    for s in points:
        parts = [h.ranked(p, s) for p in OWN_PARTS]
        ranks = set.intersection(*(set(p) for p in parts if p)) if any(parts) else set()
        if len(ranks) < 2:
            return None
        own = {r: sum(p.get(r, 0.0) for p in parts) for r in sorted(ranks)}
        step_ms = h.value(tags.STEP_MS, s) or max(h.ranked("step", s).values(), default=0.0)
        slow = max(own, key=lambda r: own[r])
        gap = own[slow] - statistics.median(v for r, v in own.items() if r != slow)
        if gap < max(STRAGGLER_MIN_MS, STRAGGLER_SHARE * step_ms):
            return None
        laggards.add(slow)
        gaps.append(gap)
        own_by_point.append({str(r): rounded(v) for r, v in own.items()})
    if len(laggards) != 1:
        return None
    rank = laggards.pop()
    waits = {str(r): rounded(v) for r, v in h.ranked("data_wait", points[-1]).items()}
    evidence = {"rank": rank, "steps": points, "own_work_ms": own_by_point, "gap_ms": [rounded(g) for g in gaps],
                "data_wait_ms": waits, "skew": h.value(tags.TIME_SKEW, points[-1])}
    data_heavy = waits and waits.get(str(rank), 0.0) - min(waits.values()) >= 0.5 * statistics.fmean(gaps)
    cause = ("its data wait: its input pipeline is slower (disk, fewer cores, heavier samples)" if data_heavy
             else "its compute: another job on its device or node, throttling, or uneven inputs")
    return finding("straggler_rank", "warning", step,
                    f"rank {rank} is {statistics.fmean(gaps):.1f} ms per step slower than the other ranks at the "
                    f"last {len(points)} log points; every rank waits for it", evidence,
                    f"most of the gap is {cause}", subject=str(rank))


def dashboard_trouble(h: History, step: int) -> Finding | None:
    dropped = h.series(tags.DROPPED)[-(DROPPED_POINTS + 1):]
    if len(dropped) == DROPPED_POINTS + 1 and all(b[1] > a[1] for a, b in itertools.pairwise(dropped)):
        by = {tag[len(tags.DROPPED_BY):]: int(v) for tag, v in h.latest(tags.DROPPED_BY).items() if v}
        where = "; ".join(f"{sink} {'coalesced' if kind in COALESCED_KINDS else 'dropped'} {n:,} {kind} events"
                          for (sink, kind), n in ((key.split("/", 1), n) for key, n in sorted(by.items())))
        heavy = any(key.split("/", 1)[1] not in COALESCED_KINDS for key in by)
        advice = ("log images and histograms less often (--images-every, --hist-every)" if heavy else
                  "log scalars less often (--log-every, --memory-every)")
        return finding("dashboard_trouble", "warning", step,
                        f"the dashboards are falling behind ({where or f'{int(dropped[-1][1])} events'} so far), "
                        f"more at each of the last {DROPPED_POINTS} log points",
                        {"dropped": [[s, int(v)] for s, v in dropped], "by_sink_and_kind": by,
                         "backlog": h.value(tags.BACKLOG, dropped[-1][0])},
                        advice + ", or check that the Visdom server is not overloaded (`runner dashboards status`); "
                        "what a sink coalesced is still in the run's TensorBoard files when only Visdom fell behind",
                        subject="dropped")
    unreachable = h.value(tags.UNREACHABLE_S, step)
    if unreachable is not None and unreachable >= UNREACHABLE_S:
        run = f"{h.facts.config.get('run_dir', 'runs')}/{h.facts.config.get('name', 'RUN')}"
        return finding("dashboard_trouble", "warning", step,
                        f"a dashboard backend has been unreachable for {unreachable:.0f} s",
                        {"unreachable_s": rounded(unreachable, 1), "step": step},
                        "start it with `runner dashboards up`; what it missed is kept in the run's visdom.log "
                        f"(send it later with `runner dashboards replay {run}`)", subject="unreachable")
    return None


RULES: tuple[Rule, ...] = (input_bound, unreadable_samples, exploding_gradients, vanishing_gradients,
                           memory_growth, allocator_pressure, straggler_rank, dashboard_trouble,
                           loss_spike, diverging, not_learning, overfitting)


def _slope(xs: list[int], ys: list[float]) -> float:
    """Least-squares slope of ys over xs."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


class Rules:
    """Feeds the history and runs every rule at each log point; each (kind, subject) fires once."""

    def __init__(self, rules: tuple[Rule, ...] = RULES) -> None:
        self.history = History()
        self.rules = rules
        self.fired: set[tuple[str, str]] = set()

    def observe(self, event: Event) -> list[Finding]:
        """Take one event; at the end of a log point (LogPoint), returns what the rules found there."""
        if isinstance(event, LogPoint):
            return self.evaluate(event.step)
        self.history.add(event)
        return []

    def evaluate(self, step: int) -> list[Finding]:
        """Run the rules on the log point that ended at `step`."""
        h = self.history
        h.mark_log_point(step, steady=step > max(WARMUP_STEPS, WARMUP_LOG_POINTS * h.facts.log_every))
        found = []
        for rule in self.rules:
            try:
                found_now = rule(h, step)
            except Exception:
                log.exception("diagnosis rule %s failed; it is off for the rest of the run", rule.__name__)
                self.rules = tuple(r for r in self.rules if r is not rule)
                continue
            if found_now is None:
                continue
            key = (found_now.kind, str(found_now.evidence.get("subject", "")))
            if key not in self.fired:
                self.fired.add(key)
                found.append(found_now)
        return found
