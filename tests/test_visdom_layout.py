"""Visdom conventions: env names that group under their experiment, panes in the layout's order (kept
when the server reloads the env from disk), the findings pane, the stacked step time breakdown, and
markdown text panes."""

from __future__ import annotations

from pathlib import Path

from dashboards.visdom import VisdomSink, env_name
from runner.config import TrainConfig
from runner.telemetry.events import Finding, Scalar, Text
from tests.support.visdom_server import SCRAMBLED, VisdomServer, by_title, deliver, line

# The titles SCRAMBLED's env must show, in order.
ORDER = ["loss", "learning rate", "metric", "throughput (samples/s)", "step time breakdown (ms)",
         "process RSS (MiB)", "CPU (%)", "images/samples", "findings", "run e_r"]


def _in_order(windows: dict[str, dict]) -> list[str]:
    return [w["title"] for w in sorted(windows.values(), key=lambda w: w["i"])]


def test_env_names_group_by_experiment() -> None:
    default = TrainConfig(model="tinyunet", data="synthetic", name="tinyunet-synthetic-20261203-101010")
    assert env_name(default) == "tinyunet-synthetic_20261203-101010"
    assert env_name(TrainConfig(model="tinyunet", name="demo")) == "tinyunet-synthetic_demo"
    assert env_name(TrainConfig(model="tests.support.models:my_net", name="a_b")) == "my-net-synthetic_a_b"
    assert env_name(TrainConfig(experiment="ablation", name="lr-3")) == "ablation_lr-3"


def test_panes_follow_the_layout_and_keep_it_after_a_reload(tmp_path: Path) -> None:
    with VisdomServer(tmp_path / "envs") as server:
        sink = VisdomSink(server.url, "e_r", tmp_path / "visdom.log", send_every=3600)
        for event in SCRAMBLED:  # each pane reaches the server before the panes that go before it
            sink.write(event)
            deliver(sink)
        sink.close()
        assert _in_order(server.windows("e_r")) == ORDER
        server.kill()
        server.start()  # the env comes back from the file the server saved
        assert _in_order(server.windows("e_r")) == ORDER


def test_findings_most_severe_first_and_the_breakdown_stacked(tmp_path: Path) -> None:
    with VisdomServer(tmp_path / "envs") as server:
        sink = VisdomSink(server.url, "f_r", tmp_path / "visdom.log", send_every=0)
        for step, severity in enumerate(("info", "error", "warning"), 1):
            sink.write(Finding(tag="findings", step=step, kind=f"rule_{severity}", severity=severity,
                               message=f"a {severity} <finding>", evidence={"x": 1.5}, advice="do this"))
        for step in (1, 2):
            for part, ms in (("data_wait", 1.0), ("forward", 3.0), ("backward", 5.0), ("other", 0.5)):
                sink.write(Scalar(tag=f"time/{part}_ms", step=step, value=ms))
        sink.close()
        windows = by_title(server.windows("f_r"))
    html = windows["findings"]["content"]
    assert html.index('data-severity="error"') < html.index('data-severity="warning"') < \
        html.index('data-severity="info"')
    assert "a error &lt;finding&gt;" in html and "do this" in html and "x=1.5" in html
    breakdown = windows["step time breakdown (ms)"]["content"]["data"]
    assert [t["name"] for t in breakdown] == ["data_wait", "forward", "backward", "other"]
    assert {t.get("stackgroup") for t in breakdown} == {"parts"}
    assert line(windows["step time breakdown (ms)"])["backward"] == ([1, 2], [5.0, 5.0])


def test_text_panes_render_markdown(tmp_path: Path) -> None:
    text = "Estimate for batch 8:\n\n| part | MiB |\n|---|--:|\n| weights | 1.5 |\n| **total** | <b>2</b> |\n"
    with VisdomServer(tmp_path / "envs") as server:
        sink = VisdomSink(server.url, "m_r", tmp_path / "visdom.log", send_every=0)
        sink.write(Text(tag="memory_estimate", step=1, text=text))
        sink.close()
        html = by_title(server.windows("m_r"))["memory_estimate"]["content"]
    assert "<table>" in html and "<th>part</th>" in html and "<strong>total</strong>" in html
    assert "&lt;b&gt;2&lt;/b&gt;" in html and "<b>2</b>" not in html  # raw HTML is shown, not run
