"""The rules on recorded numbers: each fires on the pattern it names and stays quiet on a healthy run.

The CUDA-only kinds (allocator pressure) are tested here only; the others also through real runs
in test_diagnosis.py.
"""

from __future__ import annotations

import pytest

from runner.diagnosis import rules
from runner.diagnosis.rules import Rules
from runner.telemetry.events import Event, Finding, LogPoint, MemorySample, Scalar, Text

MIB = 1024**2
CONFIG = '[train]\nmodel = "mlp"\nworkers = 0\nlog_every = 10\nbatch_size = 8\nlr = 0.1\noptimizer = "sgd"\n'
START = "training mlp (1,000 parameters) on {device}, {strategy} x{world}, batch 8, steps 0→300"


def start(device: str = "cpu", world: int = 1) -> list[Event]:
    return [Text(tag="config", step=0, text=CONFIG),
            Text(tag="status", step=0, text=START.format(device=device, world=world,
                                                          strategy="ddp" if world > 1 else "single"))]


def log_point(step: int, **scalars: float) -> list[Event]:
    """A log point's scalars (tags with `__` for `/`), closed by its LogPoint as the trainer sends it."""
    events: list[Event] = [Scalar(tag=k.replace("__", "/"), step=step, value=v) for k, v in scalars.items()]
    return [*events, Scalar(tag="train/loss", step=step, value=1.0), LogPoint(step=step)]


def memory(step: int, rank: int = 0, **values: float) -> MemorySample:
    return MemorySample(tag="memory", step=step, rank=rank, values=values)


def run(events: list[Event]) -> list[Finding]:
    engine = Rules()
    return [f for e in events for f in engine.observe(e)]


def kinds(found: list[Finding]) -> list[str]:
    return [f.kind for f in found]


def healthy(steps: int = 300, every: int = 10) -> list[Event]:
    """A steady CPU run: data wait 5 % of the step, flat memory with noise, gradients shrinking slowly."""
    events = start()
    for step in range(1, steps + 1):
        events.append(memory(step, rss=700 * MIB + (step % 7) * MIB))
        if step % 50 == 0 or step == 1:
            for layer, base in (("fc1.weight", 1.0), ("fc1.bias", 0.1), ("bn_conv.bias", 1e-9 * (1 + step % 3)),
                                ("fc2.weight", 2.0)):
                events.append(Scalar(tag=f"norms/grads/{layer}", step=step, value=base / (1 + step / 100)))
        if step % every == 0:
            events += log_point(step, time__data_wait_ms=5.0, time__step_ms=100.0, train__skipped=0.0,
                                telemetry__dropped=0.0, telemetry__unreachable_s=0.0)
    return events


def test_healthy_run_raises_nothing() -> None:
    assert run(healthy()) == []


def test_input_bound_names_workers_and_cores() -> None:
    events = start()
    for step in range(10, 80, 10):
        events += log_point(step, time__data_wait_ms=80.0, time__step_ms=100.0)
    (finding,) = run(events)
    assert finding.kind == "input_bound" and finding.severity == "warning"
    assert finding.evidence["workers"] == 0 and finding.evidence["cores"] >= 1
    assert finding.evidence["share"] == [0.8, 0.8, 0.8]
    assert "--workers" in finding.advice and "80 %" in finding.message


def test_input_bound_needs_consecutive_points_after_warmup() -> None:
    events = start()
    for step, wait in ((10, 90.0), (20, 90.0), (30, 90.0), (40, 10.0), (50, 90.0), (60, 90.0)):
        events += log_point(step, time__data_wait_ms=wait, time__step_ms=100.0)
    assert run(events) == []  # 10 and 20 are warm-up; 40 breaks the run of slow points


def test_unreadable_samples_share_and_file_names() -> None:
    events = start() + [Text(tag="data/unreadable", step=3, text="a/img_001.png\na/img_009.png")]
    events += log_point(10, train__skipped=0.0) + log_point(20, train__skipped=12.0)
    (finding,) = run(events)
    assert finding.kind == "unreadable_samples"
    assert finding.evidence["skipped"] == 12 and finding.evidence["files"] == ["a/img_001.png", "a/img_009.png"]
    assert "img_001.png" in finding.message


def norms_at(step: int, **layers: float) -> list[Event]:
    return [Scalar(tag=f"norms/grads/{k}", step=step, value=v) for k, v in layers.items()]


def test_exploding_gradient_names_the_layer() -> None:
    events = start()
    for step, big in ((1, 1.0), (2, 1.2), (3, 0.9), (4, 5000.0)):
        events += norms_at(step, **{"a.weight": 1.0, "b.weight": big}) + log_point(step)
    (finding,) = run(events)
    assert finding.kind == "exploding_gradients" and finding.severity == "error"
    assert finding.evidence["layer"] == "b.weight" and finding.evidence["step"] == 4
    assert "--lr" in finding.advice


def test_nonfinite_gradient_norm_is_exploding() -> None:
    events = start() + norms_at(1, w=1.0) + log_point(1) + norms_at(2, w=float("inf")) + log_point(2)
    assert kinds(run(events)) == ["exploding_gradients"]


def test_vanishing_gradient_relative_to_other_layers() -> None:
    events = start()
    for step, first in ((1, 1.0), (50, 0.8), (100, 1e-5), (150, 1e-6)):
        events += norms_at(step, **{"early.weight": first, "mid.weight": 1.0, "late.weight": 2.0}) + log_point(step)
    (finding,) = run(events)
    assert finding.kind == "vanishing_gradients" and finding.evidence["layer"] == "early.weight"


def test_memory_growth_on_a_steady_rise() -> None:
    events = start()
    for step in range(1, 121):
        events.append(memory(step, rss=700 * MIB + step * 1.5 * MIB))  # 150 MiB per 100 steps
        if step % 10 == 0:
            events += log_point(step)
    (finding,) = run(events)
    assert finding.kind == "memory_growth" and finding.evidence["measure"] == "host RSS"
    assert finding.evidence["slope_mib_per_100_steps"] == pytest.approx(150, rel=0.01)


def test_memory_growth_ignores_a_plateau_after_warmup_and_noise() -> None:
    events = start()
    for step in range(1, 201):
        rss = 500 * MIB + min(step, 15) * 20 * MIB + ((step * 37) % 11) * MIB  # rises in warm-up, then noise
        events.append(memory(step, rss=rss))
        if step % 10 == 0:
            events += log_point(step)
    assert run(events) == []


def cuda_samples(reserved: float, peak: float, retries: float = 0.0) -> list[Event]:
    events = start(device="cuda:0")
    events += [Scalar(tag="memory/estimate_total", step=0, value=6.0 * 1024 * MIB),
               Scalar(tag="memory/estimate_activations", step=0, value=4.0 * 1024 * MIB)]
    for step in range(10, 80, 10):
        events.append(memory(step, allocated=2.0 * 1024 * MIB, reserved=reserved, peak=peak,
                             alloc_retries=retries * step / 10))
        events += log_point(step)
    return events


def test_allocator_pressure_on_retries() -> None:
    (finding,) = run(cuda_samples(reserved=8 * 1024 * MIB, peak=7.5 * 1024 * MIB, retries=2))
    assert finding.kind == "allocator_pressure" and finding.evidence["alloc_retries"] >= rules.ALLOC_RETRIES_MIN
    assert "expandable_segments:True" in finding.advice and "6,144 MiB" not in finding.advice
    assert "6144 MiB" in finding.advice  # runner memory's estimate in the advice


def test_allocator_pressure_on_fragmentation_and_not_on_a_full_cache() -> None:
    assert kinds(run(cuda_samples(reserved=12 * 1024 * MIB, peak=6 * 1024 * MIB))) == ["allocator_pressure"]
    assert run(cuda_samples(reserved=7 * 1024 * MIB, peak=6.5 * 1024 * MIB)) == []


def test_straggler_rank_from_per_rank_parts() -> None:
    events = start(world=3)
    for step in range(10, 80, 10):
        per_rank = {}
        for rank, wait in ((0, 1.0), (1, 40.0), (2, 1.5)):
            per_rank.update({f"time__data_wait_ms__rank{rank}": wait, f"time__forward_ms__rank{rank}": 20.0,
                             f"time__h2d_ms__rank{rank}": 0.5, f"time__optimizer_ms__rank{rank}": 3.0,
                             f"time__step_ms__rank{rank}": 90.0})
        events += log_point(step, time__step_ms=90.0, time__skew=0.05, **per_rank)
    (finding,) = run(events)
    assert finding.kind == "straggler_rank" and finding.evidence["rank"] == 1
    assert "data wait" in finding.advice


def test_dashboard_trouble_dropped_and_unreachable() -> None:
    events = start()
    for step, dropped in ((10, 0.0), (20, 5.0), (30, 9.0), (40, 20.0)):
        events += log_point(step, telemetry__dropped=dropped)
    assert kinds(run(events)) == ["dashboard_trouble"]
    events = start() + log_point(10, telemetry__unreachable_s=4.0) + log_point(20, telemetry__unreachable_s=45.0)
    (finding,) = run(events)
    assert finding.evidence["unreachable_s"] == 45.0 and "runner dashboards replay" in finding.advice


def test_each_kind_fires_once() -> None:
    events = start()
    for step in range(10, 200, 10):
        events += log_point(step, time__data_wait_ms=80.0, time__step_ms=100.0)
    assert kinds(run(events)) == ["input_bound"]
