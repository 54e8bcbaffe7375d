"""The Visdom sink against a real Visdom server: panes and their data, resume, pane cost, the graph
picture, and resilience (no server, a server that never answers, a server killed mid-run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dashboards import servers
from dashboards.graph_svg import graph_svg
from dashboards.visdom import Message, VisdomConnection, VisdomSink, normalize_url, read_log
from runner.telemetry.events import MemorySample, Scalar
from tests.support.runs import ROOT, child_pythonpath, in_process_cli, run_runner
from tests.support.visdom_server import HungServer, VisdomServer, by_title, free_port, line, logged

TINY = ["--image-size", "16", "--batch-size", "4", "--samples", "32", "--no-progress"]


def _train(run_dir: Path, name: str, url: str, *extra: str) -> tuple[int, str]:
    """A run in experiment `t` (its env is `t_<name>`), in this process: what these tests check is the sink
    and the server, not the processes around the trainer."""
    out = in_process_cli()("train", "--run-dir", str(run_dir), "--name", name, "--experiment", "t", "--viz",
                           "visdom", "--visdom-url", url, *TINY, *extra)
    return out.code, out.stderr


def _steps(panes_log: Path, win: str, series: str) -> list[int]:
    return logged(panes_log, win, series)[0]


@pytest.mark.slow
def test_train_fills_the_runs_env(tmp_path: Path) -> None:
    from runner.models import build_model

    with VisdomServer(tmp_path / "envs") as server:
        code, err = _train(tmp_path, "unet", server.url, "--model", "tinyunet", "--steps", "6", "--log-every", "2",
                           "--images-every", "3", "--hist-every", "3")
        assert code == 0, err
        windows = by_title(server.windows("t_unet"))
    for title in ("loss", "metric", "learning rate", "gradient norm (all layers)"):
        assert title in windows, sorted(windows)
    assert line(windows["loss"])["loss"][0] == [2, 4, 6]
    assert line(windows["metric"])["psnr"][0] == [2, 4, 6]
    assert line(windows["step time (ms)"]).keys() >= {"step"}
    steps, rss = line(windows["process RSS (MiB)"])["rss"]
    assert steps == [1, 2, 3, 4, 5, 6] and min(rss) > 10  # MiB
    assert windows["images/samples"]["type"] == "image"
    assert windows["images/samples"]["content"]["src"].startswith("data:image/png;base64,")
    assert "step 6" in windows["images/samples"]["content"]["caption"]
    sizes = {name: p.numel() for name, p in build_model("tinyunet", 3, 16, 10).named_parameters()}
    for kind in ("weights", "grads"):
        traces = windows[f"{kind} histograms · step 6"]["content"]["data"]
        assert {t["name"]: sum(t["y"]) for t in traces} == sizes  # every value of every tensor, binned
    norms = line(windows["weight norms per layer"])
    assert norms.keys() == sizes.keys() and norms["enc1.0.weight"][0] == [1, 3, 6]
    assert "<svg" in windows["model graph"]["content"] and "enc1" in windows["model graph"]["content"]
    assert "<table" in windows["model layers"]["content"] and "enc1.0" in windows["model layers"]["content"]
    run_text = windows["run t_unet"]["content"]
    assert "finished at step 6" in run_text and "[train]" in run_text and "final metrics" in run_text
    saved = json.loads((tmp_path / "envs" / "t_unet.json").read_text())  # the env survives the server
    assert {w["title"] for w in saved["jsons"].values()} == set(windows)
    for entry in (tmp_path / "unet" / "visdom.log").read_text().splitlines():
        endpoint, msg = json.loads(entry)  # the client's log format
        assert endpoint in ("events", "update") and msg["eid"] == "t_unet"


def test_resume_replaces_points_after_the_resumed_step(tmp_path: Path) -> None:
    log = tmp_path / "visdom.log"
    with VisdomServer(tmp_path / "envs") as server:
        first = VisdomSink(server.url, "r", log, send_every=0)
        for step in range(1, 11):
            first.write(Scalar(tag="train/loss", step=step, value=1.0))
        first.close()
        second = VisdomSink(server.url, "r", log, start_step=6, send_every=0)  # the checkpoint was at step 6
        for step in range(7, 13):
            second.write(Scalar(tag="train/loss", step=step, value=2.0))
        second.close()
        steps, values = line(by_title(server.windows("r"))["loss"])["loss"]
    assert steps == list(range(1, 13))
    assert values == [1.0] * 6 + [2.0] * 6
    assert _steps(log, "loss", "loss") == list(range(1, 13))
    assert json.loads(log.read_text().splitlines()[0])[0] == "events"  # the resumed log starts compacted


def test_appends_send_only_new_points(tmp_path: Path) -> None:
    """Pane cost stays flat: after the first message, each send carries only the points since the last."""
    log = tmp_path / "visdom.log"
    with VisdomServer(tmp_path / "envs") as server:
        sink = VisdomSink(server.url, "flat", log, send_every=0)
        for step in range(1, 101):
            sink.write(Scalar(tag="train/loss", step=step, value=float(step)))
            sink.write(Scalar(tag="norms/weights/a", step=step, value=1.0))
            sink.write(Scalar(tag="norms/weights/b", step=step, value=2.0))
        sink.close()
        windows = by_title(server.windows("flat"))
    updates = [json.loads(entry)[1] for entry in log.read_text().splitlines() if entry.startswith('["update"')]
    assert updates and all(len(trace["x"]) <= 1 for msg in updates for trace in msg["data"])
    assert line(windows["loss"])["loss"][0] == list(range(1, 101))
    assert line(windows["weight norms per layer"])["b"][0] == list(range(1, 101))


def test_memory_of_every_rank_shares_a_pane(tmp_path: Path) -> None:
    """DDP: one series per rank in each memory pane (as TensorBoard's custom-scalars page groups them)."""
    mib = float(1 << 20)
    with VisdomServer(tmp_path / "envs") as server:
        sink = VisdomSink(server.url, "ddp", tmp_path / "visdom.log", send_every=0)
        for step in (1, 2, 3):
            for rank in (0, 1):
                values = {"rss": 100 * mib * (rank + 1), "allocated": 8 * mib, "cpu_percent": 50.0}
                sink.write(MemorySample(tag="memory", step=step, rank=rank, world_size=2, values=values))
        sink.close()
        windows = by_title(server.windows("ddp"))
    assert line(windows["process RSS (MiB)"]) == {"rss rank0": ([1, 2, 3], [100] * 3),
                                                  "rss rank1": ([1, 2, 3], [200] * 3)}
    assert line(windows["CUDA memory (MiB)"]).keys() == {"allocated rank0", "allocated rank1"}
    assert line(windows["CPU (%)"])["cpu_percent rank1"] == ([1, 2, 3], [50] * 3)


def test_a_restart_between_sends_is_noticed(tmp_path: Path) -> None:
    """A server restarted between two sends (no failed send to see) has lost the env: a new connection
    means the panes go whole again, so nothing is missing."""
    with VisdomServer(tmp_path / "envs") as server:
        sink = VisdomSink(server.url, "quick", tmp_path / "visdom.log", send_every=0)
        for step in range(1, 6):
            sink.write(Scalar(tag="train/loss", step=step, value=1.0))
        server.kill()
        server.start()
        for step in range(6, 11):
            sink.write(Scalar(tag="train/loss", step=step, value=1.0))
        sink.close()
        windows = by_title(server.windows("quick"))
    assert line(windows["loss"])["loss"][0] == list(range(1, 11))
    assert sink.link.state == "up"


def test_login_is_used_when_the_server_asks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    creds = {"VISDOM_USERNAME": "ada", "VISDOM_PASSWORD": "s3cret", "VISDOM_USE_ENV_CREDENTIALS": "1",
             "VISDOM_COOKIE": "test-cookie-secret", "HOME": str(tmp_path)}
    with VisdomServer(tmp_path / "envs", extra_env=creds, login=True) as server:
        monkeypatch.delenv("VISDOM_USERNAME", raising=False)
        monkeypatch.delenv("VISDOM_PASSWORD", raising=False)
        anonymous = VisdomSink(server.url, "locked", tmp_path / "a.log", send_every=0)
        anonymous.write(Scalar(tag="train/loss", step=1, value=1.0))
        anonymous.close()
        assert anonymous.link.state == "down"
        monkeypatch.setenv("VISDOM_USERNAME", "ada")
        monkeypatch.setenv("VISDOM_PASSWORD", "s3cret")
        sink = VisdomSink(server.url, "locked", tmp_path / "b.log", send_every=0)
        sink.write(Scalar(tag="train/loss", step=1, value=1.0))
        sink.close()
        conn = VisdomConnection(server.url)
        conn.connect()
        windows = json.loads(conn.post(Message.of("win_data", {"eid": "locked", "win": None})))
        conn.close()
    assert line(by_title(windows)["loss"])["loss"][0] == [1]


@pytest.mark.slow
def test_no_server_then_replay(tmp_path: Path) -> None:
    """(a) Nothing listens: the run finishes, warns once, visdom.log holds it all; replay fills a server later."""
    code, err = _train(tmp_path, "offline", f"http://127.0.0.1:{free_port()}", "--model", "cnn", "--steps", "8",
                       "--log-every", "2", "--images-every", "4", "--hist-every", "4")
    assert code == 0, err
    assert err.count("is unreachable") == 1 and "Traceback" not in err
    log = tmp_path / "offline" / "visdom.log"
    assert _steps(log, "loss", "loss") == [2, 4, 6, 8]
    assert _steps(log, "process_RSS", "rss") == list(range(1, 9))
    panes = read_log(log)
    assert {"images_samples", "weights", "gradients", "model_graph", "run"} <= set(panes.panes)
    with VisdomServer(tmp_path / "envs") as server:
        out = in_process_cli()("dashboards", "replay", "offline", "--run-dir", str(tmp_path), "--visdom-url",
                               server.url)
        assert out.code == 0, out.stderr
        windows = by_title(server.windows("t_offline"))
    assert line(windows["loss"])["loss"][0] == [2, 4, 6, 8]
    assert line(windows["process RSS (MiB)"])["rss"][0] == list(range(1, 9))
    assert "finished at step 8" in windows["run t_offline"]["content"]
    assert windows["images/samples"]["type"] == "image"


@pytest.mark.slow
def test_stock_client_replays_the_log(tmp_path: Path) -> None:
    """visdom.log is the client's own format: `Visdom.replay_log` rebuilds the same env."""
    code, err = _train(tmp_path, "stock", f"http://127.0.0.1:{free_port()}", "--model", "mlp", "--steps", "4",
                       "--log-every", "1", "--images-every", "2", "--hist-every", "2")
    assert code == 0, err
    with VisdomServer(tmp_path / "envs") as server:
        script = ("import sys, visdom; v = visdom.Visdom(server='http://127.0.0.1', port=int(sys.argv[1]), "
                  "use_incoming_socket=False, raise_exceptions=True); v.replay_log(sys.argv[2])")
        subprocess.run([sys.executable, "-c", script, str(server.port), str(tmp_path / "stock" / "visdom.log")],
                       check=True, capture_output=True, timeout=120)
        windows = by_title(server.windows("t_stock"))
    assert line(windows["loss"])["loss"][0] == [1, 2, 3, 4]
    assert {"images/samples", "model graph", "run t_stock"} <= set(windows)


def _logged_points(log: Path, win: str, series: str) -> int:
    return len(logged(log, win, series)[0]) if log.is_file() else 0


def _step_times(log: Path) -> list[float]:
    return [v for v in logged(log, "step_time", "step")[1] if v is not None]


@pytest.mark.slow
def test_hung_server_does_not_stall_training(tmp_path: Path) -> None:
    """(b) A socket that accepts and never answers: the run finishes, every step is in visdom.log, and no step
    waited for the server (a send on the training thread would hold that step for the link's read timeout)."""
    from dashboards.visdom_link import READ_TIMEOUT

    args = ["--model", "tests.support.visdom_server:slow_model", "--steps", "25", "--log-every", "1",
            "--checkpoint-every", "100"]
    with HungServer() as hung:
        code, err = _train(tmp_path, "hung", hung.url, *args)
    assert code == 0, err
    assert err.count("is unreachable") == 1 and "no answer in time" in err and "Traceback" not in err
    step_ms = _step_times(tmp_path / "hung" / "visdom.log")
    assert len(step_ms) == 25
    # not a speed bound: a step is tens of ms; one that waited for the server would last the whole timeout
    assert max(step_ms) < READ_TIMEOUT * 1000, step_ms


@pytest.mark.slow
def test_server_killed_mid_run_ends_complete(tmp_path: Path) -> None:
    """(c) The server dies mid-run and comes back on the same port: the env ends with every point of every step."""
    steps = 200
    with VisdomServer(tmp_path / "envs") as server:
        env = dict(os.environ, PYTHONPATH=child_pythonpath())
        with open(tmp_path / "stderr.txt", "w") as err_file:
            proc = subprocess.Popen([sys.executable, "-m", "runner", "train", "--run-dir", str(tmp_path), "--name",
                                     "killed", "--experiment", "t", "--viz", "visdom", "--visdom-url", server.url,
                                     *TINY, "--model", "tests.support.visdom_server:slow_model", "--steps", str(steps),
                                     "--log-every", "1", "--checkpoint-every", "1000"], cwd=ROOT, env=env,
                                    stderr=err_file, stdout=subprocess.DEVNULL)
            log = tmp_path / "killed" / "visdom.log"
            deadline = time.monotonic() + 120
            while _logged_points(log, "loss", "loss") < 10:
                assert proc.poll() is None and time.monotonic() < deadline, "the run ended before the kill"
                time.sleep(0.2)
            server.kill()
            # down until the run has noticed (a send that fails on a fresh connection), however long that takes
            stderr = tmp_path / "stderr.txt"
            while "is unreachable" not in stderr.read_text():
                assert proc.poll() is None, "the run ended before it noticed the server was gone: make it longer"
                time.sleep(0.1)
            server.start()
            assert proc.wait(180) == 0, (tmp_path / "stderr.txt").read_text()
        windows = by_title(server.windows("t_killed"))
    err = (tmp_path / "stderr.txt").read_text()
    assert err.count("is unreachable") == 1 and err.count("is back") == 1 and "Traceback" not in err, err
    assert line(windows["loss"])["loss"][0] == list(range(1, steps + 1))
    assert line(windows["process RSS (MiB)"])["rss"][0] == list(range(1, steps + 1))
    assert line(windows["step time (ms)"])["step"][0] == list(range(1, steps + 1))


@pytest.mark.slow
def test_run_starts_a_server_for_itself_when_none_answers(tmp_path: Path) -> None:
    """No --visdom-url and nothing on the port: the run starts a server, uses it, stops it at its end;
    the env stays on disk (under the runs folder) for `runner dashboards up`."""
    port = free_port()
    out = run_runner("train", "--run-dir", str(tmp_path), "--name", "embedded", "--experiment", "t", "--viz", "visdom",
                     "--visdom-port", str(port), *TINY, "--model", "mlp", "--steps", "3")
    assert out.code == 0, out.stderr
    assert "started a Visdom server for this run" in out.stderr and "stopped this run's Visdom server" in out.stderr
    assert "leftover" not in out.stderr  # it stopped its server itself; the supervisor found nothing to reap
    assert servers.recorded(tmp_path) == {} and not servers.port_busy("127.0.0.1", port)
    assert (tmp_path / ".dashboards" / "visdom" / "t_embedded.json").is_file()  # -env_path under the runs folder
    up = run_runner("dashboards", "up", "--run-dir", str(tmp_path), "--tb-port", str(free_port()), "--visdom-port",
                    str(port))
    try:
        assert up.code == 0, up.stderr
        probe = VisdomServer(tmp_path / ".dashboards" / "visdom", port=port)
        assert line(by_title(probe.windows("t_embedded"))["loss"])["loss"][0] == [3]
    finally:
        run_runner("dashboards", "down", "--run-dir", str(tmp_path))


def test_graph_picture_of_a_unet() -> None:
    import torch

    from runner.models import build_model
    from runner.probes.model_graph import trace_graph

    event = trace_graph(build_model("tinyunet", 3, 32, 10), torch.rand(2, 3, 32, 32))
    svg = graph_svg(event.nodes, event.layer_table)
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    for box in ("enc1 · Sequential", "bottom · Sequential", "dec1 · Sequential", "head · Conv2d", "input", "output"):
        assert f">{box}</text>" in svg, box
    assert svg.count(">cat</text>") == 3  # the three skip joins, each its own box
    assert svg.count("<path") >= 20  # edges, skip connections included
    fallback = graph_svg([], event.layer_table)  # tracing failed: the layer table as a chain
    assert ">enc1.0 · Conv2d</text>" in fallback and ">head · Conv2d</text>" in fallback


def test_urls_get_a_scheme_and_the_default_port() -> None:
    assert normalize_url("myhost", 8097) == "http://myhost:8097"
    assert normalize_url("http://myhost:9000/dash/visdom/", 8097) == "http://myhost:9000/dash/visdom"
    assert normalize_url("https://proxy/visdom", 443) == "https://proxy:443/visdom"
