"""The training-health rules on recorded numbers: loss_spike, diverging, not_learning fire on the
pattern they name (with the evidence and combined advice) and stay quiet on a healthy descent."""

from __future__ import annotations

from runner.diagnosis.rules import Rules
from runner.telemetry import tags
from runner.telemetry.events import Event, Finding, LogPoint, Scalar, Text

CONFIG = '[train]\nmodel = "cnn"\nworkers = 0\nlog_every = 10\nbatch_size = 16\nlr = 3.0\noptimizer = "sgd"\n'
START = "training cnn (1,000 parameters) on cpu, single x1, batch 16, steps 0→60, 10 classes"


def point(step: int, **values: float) -> list[Event]:
    return [*(Scalar(tag=tag, step=step, value=v) for tag, v in values.items()), LogPoint(step=step)]


def run(points: list[tuple[int, dict[str, float]]], texts: tuple[Event, ...] = ()) -> list[Finding]:
    engine = Rules()
    events: list[Event] = [Text(tag=tags.CONFIG, step=0, text=CONFIG), Text(tag=tags.STATUS, step=0, text=START),
                           *texts]
    for step, values in points:
        events += point(step, **values)
    return [f for e in events for f in engine.observe(e)]


def by_kind(found: list[Finding]) -> dict[str, Finding]:
    return {f.kind: f for f in found}


def window(loss: float, loss_max: float | None = None, at: int = 0, grad: float = 1.0, grad_max: float | None = None,
           **more: float) -> dict[str, float]:
    return {tags.LOSS: loss, tags.LOSS_MAX: loss_max or loss * 1.1, tags.LOSS_MAX_STEP: float(at),
            tags.LOSS_MIN: loss * 0.9, tags.GRAD_GLOBAL: grad, tags.GRAD_GLOBAL_MAX: grad_max or grad * 1.2, **more}


def test_spike_in_the_first_window_with_a_gradient_jump() -> None:
    first = window(6.5e6, loss_max=6.5e7, at=5, grad=5e5, grad_max=4.5e6) | {tags.LOSS_MIN: 2.37,
                                                                           tags.GRAD_GLOBAL_MIN: 3.0}
    later = [(s, window(2.33, at=s - 3, **{tags.train("accuracy"): 0.1})) for s in range(20, 70, 10)]
    layer = Text(tag=tags.GRAD_LAYER_MAX_NAME, step=10, text="features.0.weight")
    found = by_kind(run([(10, first), *later], (layer,)))
    spike = found["loss_spike"]
    assert spike.severity == "warning" and spike.step == 10
    assert spike.evidence["step"] == 5 and spike.evidence["loss"] == 6.5e7 and spike.evidence["median"] == 2.37
    assert "step 5" in spike.message and "lower --lr (now 3.0)" in spike.advice
    assert "features.0.weight" in spike.advice  # the gradient-norm jump, and where
    stuck = found["not_learning"]  # then the network collapsed to chance: flat loss, accuracy 0.1
    assert stuck.evidence["classes"] == 10 and stuck.evidence["steps"] == [30, 40, 50, 60]
    assert "spiked" in stuck.advice


def test_spike_later_in_the_run_without_a_gradient_jump_points_at_the_data() -> None:
    points = [(s, window(1.0 - s / 1000)) for s in range(10, 60, 10)] + [(60, window(1.2, loss_max=40.0, at=57))]
    spike = by_kind(run(points))["loss_spike"]
    assert spike.evidence["step"] == 57 and "batch of step 57" in spike.advice


def test_a_healthy_fast_descent_raises_nothing() -> None:
    """The demo's shape: the loss falls 2.2× within the first window and 25× over the run."""
    points = [(10, window(0.2, loss_max=0.35, at=1) | {tags.LOSS_MIN: 0.155})]
    points += [(s, window(0.2 * (10 / s) ** 0.9, grad=0.5, **{tags.train("psnr"): 8 + s / 20,
                                                              tags.INPUT_PSNR: 14.5}))
               for s in range(20, 210, 10)]
    assert run(points) == []


def test_diverging_loss_before_any_nan() -> None:
    points = [(s, window(v)) for s, v in ((10, 1.0), (20, 1.5), (30, 2.4), (40, 3.9))]
    found = by_kind(run(points))["diverging"]
    assert found.evidence["steps"] == [10, 20, 30, 40] and "the loss" in found.message


def test_not_learning_denoise_compares_with_the_noisy_input() -> None:
    flat = [(s, window(0.04, **{tags.train("psnr"): 14.2, tags.INPUT_PSNR: 14.5})) for s in range(10, 70, 10)]
    found = by_kind(run(flat))["not_learning"]
    assert found.evidence["input_psnr"] == [14.5] * 4 and "noisy input" in found.message
    learning = [(s, window(0.04, **{tags.train("psnr"): 18.0, tags.INPUT_PSNR: 14.5})) for s in range(10, 70, 10)]
    assert "not_learning" not in by_kind(run(learning))


def test_dashboard_trouble_names_the_sink_and_kind() -> None:
    """Only scalars were coalesced (Visdom fell behind): the finding says so, not 'image/histogram'."""
    points = [(s, {tags.DROPPED: n, tags.dropped("VisdomSink", "Scalar"): n}) for s, n in ((10, 0.0), (20, 50.0),
                                                                                         (30, 90.0))]
    found = by_kind(run(points))["dashboard_trouble"]
    assert "VisdomSink coalesced 90 Scalar events" in found.message and "image" not in found.message
    assert found.evidence["by_sink_and_kind"] == {"VisdomSink/Scalar": 90} and "--log-every" in found.advice
