"""The TensorBoard sink, read back with TensorBoard's own EventAccumulator after short real runs."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as reference_crc
from tensorboard.plugins.custom_scalar.layout_pb2 import Layout
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

from dashboards.event_file import masked_crc32c
from dashboards.tensorboard import TensorBoardSink
from runner.models import build_model
from runner.probes.tensor_stats import parameter_stats
from runner.telemetry.events import HParams, ImageGrid, MemorySample, Scalar
from tests.support.runs import ROOT, child_pythonpath, in_process_cli, run_runner

TINY = ["--image-size", "16", "--batch-size", "4", "--samples", "32", "--no-progress", "--resume", "never",
        "--viz", "tensorboard"]


def read(run: Path) -> EventAccumulator:
    events = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0, "histograms": 0, "tensors": 0})
    events.Reload()
    return events


def steps(events: EventAccumulator, tag: str) -> list[int]:
    return [e.step for e in events.Scalars(tag)]


def texts(events: EventAccumulator, tag: str) -> list[str]:
    return [e.tensor_proto.string_val[0].decode() for e in events.Tensors(f"{tag}/text_summary")]


def train(cli, tmp_path: Path, name: str, *args: str) -> tuple[Path, EventAccumulator, str]:
    result = cli("train", *TINY, "--run-dir", str(tmp_path), "--name", name, *args)
    assert result.code == 0, result.stderr
    return tmp_path / name, read(tmp_path / name), result.stderr


@pytest.fixture(scope="module")
def unet_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, EventAccumulator]:
    """One Tiny-UNet run shared by the read-back checks (6 steps, everything on at small cadences)."""
    tmp = tmp_path_factory.mktemp("tb")
    with pytest.MonkeyPatch.context() as env:  # as the `cli` fixture, for a module-scoped run
        env.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))
        result = in_process_cli()("train", *TINY, "--model", "tinyunet", "--steps", "6", "--log-every", "2",
                                  "--images-every", "3", "--hist-every", "3", "--run-dir", str(tmp), "--name", "unet")
    assert result.code == 0, result.stderr
    return tmp / "unet", read(tmp / "unet")


def test_loss_and_metric_at_every_log_point(unet_run: tuple[Path, EventAccumulator]) -> None:
    _, events = unet_run
    for tag in ("train/loss", "train/psnr", "train/lr", "train/samples_per_s", "time/step_ms",
                "time/data_wait_ms", "train/skipped", "telemetry/dropped"):
        assert steps(events, tag) == [2, 4, 6], tag
    losses = [e.value for e in events.Scalars("train/loss")]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_memory_rss_at_every_step(unet_run: tuple[Path, EventAccumulator]) -> None:
    _, events = unet_run
    assert steps(events, "memory/rss") == [1, 2, 3, 4, 5, 6]
    assert all(e.value > 10e6 for e in events.Scalars("memory/rss"))  # bytes: a Python process with torch
    assert steps(events, "system/cpu_percent") == [1, 2, 3, 4, 5, 6]
    assert "memory/rss/rank0" not in events.Tags()["scalars"]  # one process: one series


def test_image_grid_noisy_output_clean(unet_run: tuple[Path, EventAccumulator]) -> None:
    _, events = unet_run
    images = events.Images("images/samples")
    assert [i.step for i in images] == [1, 3, 6]
    # make_grid: 4 images a row (the batch) of 16 px with 2 px padding; 3 rows (noisy | output | clean)
    assert (images[0].width, images[0].height) == (4 * 18 + 2, 3 * 18 + 2)
    assert texts(events, "images/samples/caption")[0] == "rows: noisy | output | clean"


def test_weight_and_grad_histograms_of_every_parameter(unet_run: tuple[Path, EventAccumulator]) -> None:
    _, events = unet_run
    model = build_model("tinyunet", 3, 16, 10)
    tags = set(events.Tags()["histograms"])
    for name, param in model.named_parameters():
        for kind in ("weights", "grads"):
            tag = f"{kind}/{name}"
            assert tag in tags, tag
            histograms = events.Histograms(tag)
            assert [h.step for h in histograms] == [1, 3, 6], tag
            value = histograms[-1].histogram_value
            assert value.num == param.numel() == sum(value.bucket), tag
            assert value.min <= value.max
    assert steps(events, "train/grad_norm") == [1, 3, 6]
    assert "norms/grads/enc1.0.weight" in events.Tags()["scalars"]


def test_graph_of_the_unet(unet_run: tuple[Path, EventAccumulator]) -> None:
    _, events = unet_run
    assert events.Tags()["graph"]
    ops = [node.op for node in events.Graph().node]
    assert ops.count("aten::cat") == 3  # the three skip connections
    assert "| enc1.0 | Conv2d | 2×16×16×16 |" in texts(events, "model")[0]  # the layer table


def test_config_status_hparams_and_layout_in_one_folder(unet_run: tuple[Path, EventAccumulator]) -> None:
    run, events = unet_run
    assert 'model = "tinyunet"' in texts(events, "config")[0]
    status = texts(events, "status")
    assert status[0].startswith("training tinyunet") and status[-1] == "finished at step 6"
    assert set(events.PluginTagToContent("hparams")) >= {"_hparams_/session_start_info", "_hparams_/experiment"}
    layout = Layout.FromString(events.Tensors("custom_scalars__config__")[-1].tensor_proto.string_val[0])
    categories = {category.title: {chart.title: list(chart.multiline.tag) for chart in category.chart}
                  for category in layout.category}
    assert list(categories) == ["loss and optimiser", "metric", "time", "memory", "system", "histograms"]
    assert categories["loss and optimiser"]["loss"][:2] == ["^(?:train/loss)$", "^(?:val/loss)$"]  # train, val together
    assert "memory/rss" in categories["memory"]["process RSS (bytes)"][0]
    assert "train/samples_per_s" in categories["time"]["throughput (samples/s)"][0]
    assert [p.name for p in run.iterdir() if p.is_dir()] == ["checkpoints"]  # hparams: no sub-run


def test_dict_output_model_gets_a_graph(cli, tmp_path: Path) -> None:
    _, events, _ = train(cli, tmp_path, "dict", "--model", "tests.support.models:dict_denoiser", "--task", "denoise",
                         "--steps", "2")
    assert events.Tags()["graph"]
    assert "aten::cat" in [node.op for node in events.Graph().node]
    assert events.Images("images/samples")


def test_data_parallel_model_gets_a_graph(cli, tmp_path: Path) -> None:
    _, events, _ = train(cli, tmp_path, "dp", "--model", "cnn", "--strategy", "dp", "--steps", "2")
    assert events.Tags()["graph"]
    assert "aten::_convolution" in [node.op for node in events.Graph().node]
    assert "weights/features.0.weight" in events.Tags()["histograms"]  # the user's names, not module.…
    assert texts(events, "images/samples/caption")[0].startswith("pred/true: ")
    assert steps(events, "train/accuracy") == [2]


def test_untraceable_model_gets_the_warning_and_the_layer_table(cli, tmp_path: Path) -> None:
    _, events, stderr = train(cli, tmp_path, "untraceable", "--model", "tests.support.models:untraceable",
                              "--task", "denoise", "--steps", "2")
    assert "tracing failed" in stderr
    assert not events.Tags()["graph"]
    model_text = texts(events, "model")[0]
    assert "Model graph unavailable" in model_text and "| encode.0 | Conv2d |" in model_text
    assert steps(events, "train/loss") == [2]  # and the run went on


def test_purge_step_drops_what_an_earlier_attempt_logged_after_it(tmp_path: Path) -> None:
    first = TensorBoardSink(tmp_path)
    for step in range(1, 11):
        first.write(Scalar(tag="train/loss", step=step, value=float(step)))
    first.close()
    resumed = TensorBoardSink(tmp_path, purge_step=6)  # the checkpoint was at step 5
    for step in range(6, 9):
        resumed.write(Scalar(tag="train/loss", step=step, value=100.0 + step))
    resumed.close()
    points = [(e.step, e.value) for e in read(tmp_path).Scalars("train/loss")]
    assert points == [(s, float(s)) for s in range(1, 6)] + [(s, 100.0 + s) for s in range(6, 9)]


def test_memory_samples_of_several_ranks_become_one_series_each(tmp_path: Path) -> None:
    sink = TensorBoardSink(tmp_path)
    for step in (1, 2):
        for rank in (0, 1):
            sink.write(MemorySample(tag="memory", step=step, rank=rank, world_size=2,
                                    values={"rss": 1e6 * (rank + 1), "cpu_percent": 50.0}))
    sink.close()
    scalars = read(tmp_path).Tags()["scalars"]
    assert {"memory/rss/rank0", "memory/rss/rank1", "system/cpu_percent/rank0", "system/cpu_percent/rank1"} \
        <= set(scalars)
    assert "memory/rss" not in scalars


def test_histogram_buckets_are_the_device_counts(tmp_path: Path) -> None:
    model = torch.nn.Linear(50, 20)
    model.bias.data.fill_(0.5)  # a constant tensor: one bucket
    sink = TensorBoardSink(tmp_path)
    for event in parameter_stats(model, step=3, rank=0):
        sink.write(event)
    sink.close()
    events = read(tmp_path)
    weight = events.Histograms("weights/weight")[0].histogram_value
    data = model.weight.detach().flatten()
    expected, _ = torch.histogram(data, bins=64, range=(data.min().item(), data.max().item()))
    assert weight.bucket == expected.tolist()
    assert weight.bucket_limit[-1] == pytest.approx(data.max().item())
    assert weight.sum == pytest.approx(data.sum().item(), abs=1e-4)
    bias = events.Histograms("weights/bias")[0].histogram_value
    assert (bias.min, bias.max, list(bias.bucket)) == (0.5, 0.5, [20.0])
    assert "grads/weight" not in events.Tags()["histograms"]  # no backward yet: no gradients


@pytest.mark.parametrize("size", [0, 1, 63, 64, 65, 255, 256, 257, 1000, 4096, 100_003])
def test_record_checksum_matches_tensorboards(size: int) -> None:
    data = os.urandom(size)
    assert masked_crc32c(data) == reference_crc(data)


def test_the_sink_never_uses_tensorboards_pure_python_checksum(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TensorBoard's own CRC (0.2 µs a byte) is not on the sink's path; its reader accepts the records."""
    from tensorboard.compat.tensorflow_stub import pywrap_tensorflow

    def refuse(data: bytes) -> int:
        raise AssertionError("TensorBoard's pure-Python CRC was used")

    monkeypatch.setattr(pywrap_tensorflow, "masked_crc32c", refuse)
    sink = TensorBoardSink(tmp_path)
    for step in (1, 2):
        sink.write(Scalar(tag="train/loss", step=step, value=0.5))
        sink.write(ImageGrid(tag="images/samples", step=step, image=np.random.rand(3, 40, 60)))
    sink.close()
    monkeypatch.undo()
    events = read(tmp_path)  # the reader checks every record's CRC with TensorBoard's own
    assert steps(events, "train/loss") == [1, 2] and len(events.Images("images/samples")) == 2


# --- HParams: in the table from the start, completed at the end --------------------------------

def hparams_data(events: EventAccumulator) -> dict[str, plugin_data_pb2.HParamsPluginData]:
    """tag → the HParams plugin data written under it (experiment, session start, session end)."""
    return {tag: plugin_data_pb2.HParamsPluginData.FromString(content)
            for tag, content in events.PluginTagToContent("hparams").items()}


def test_hparams_open_the_session_at_the_start_and_close_it_with_the_status(tmp_path: Path) -> None:
    hparams = {"model": "cnn", "lr": 0.01, "amp": False, "batch_size": 4, "extra": [1, 2]}
    for name, status, expected in (("ok", "finished", api_pb2.STATUS_SUCCESS),
                                   ("broken", "failed: disk full", api_pb2.STATUS_FAILURE),
                                   ("stopped", "stopped by SIGINT at step 3", api_pb2.STATUS_UNKNOWN)):
        sink = TensorBoardSink(tmp_path / name)
        sink.write(HParams(tag="hparams", step=0, hparams=hparams, metrics={"train/loss": math.nan}, status="running"))
        started = hparams_data(read(tmp_path / name))  # on disk before the first step: a SIGKILL keeps it
        assert set(started) == {"_hparams_/experiment", "_hparams_/session_start_info"}
        sink.write(Scalar(tag="train/loss", step=3, value=0.25))
        sink.write(HParams(tag="hparams", step=3, hparams=hparams, metrics={"train/loss": 0.25}, status=status))
        sink.close()
        data = hparams_data(read(tmp_path / name))
        experiment = data["_hparams_/experiment"].experiment
        assert [m.name.tag for m in experiment.metric_infos] == ["train/loss"]
        assert sorted(h.name for h in experiment.hparam_infos) == sorted(hparams)
        start = data["_hparams_/session_start_info"].session_start_info
        assert start.group_name == name  # one row per run, even for runs with the same hparams
        assert (start.hparams["model"].string_value, start.hparams["lr"].number_value) == ("cnn", 0.01)
        assert start.hparams["amp"].bool_value is False and start.hparams["extra"].string_value == "[1, 2]"
        assert data["_hparams_/session_end_info"].session_end_info.status == expected, name


@pytest.mark.slow
def test_a_run_killed_mid_run_is_in_the_hparams_table(tmp_path: Path) -> None:
    """`runner train`, its trainer SIGKILLed after a few steps: experiment and session start are on disk
    (the session never ended), and the scalars its metric column reads are there too."""
    env = dict(os.environ, PYTHONPATH=child_pythonpath())
    run = tmp_path / "runs" / "killed"
    with open(tmp_path / "run.log", "wb") as log:
        sup = subprocess.Popen([sys.executable, "-m", "runner", "train", "--model", "mlp", "--image-size", "8",
                                "--batch-size", "4", "--steps", "100000", "--log-every", "1", "--no-progress",
                                "--resume", "never", "--viz", "tensorboard", "--device", "cpu", "--name", "killed",
                                "--run-dir", str(tmp_path / "runs")],
                               env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (run.is_dir() and len(read(run).Tags()["scalars"]) and len(steps(read(run), "train/loss")) >= 3):
            assert sup.poll() is None, (tmp_path / "run.log").read_text()
            assert time.monotonic() < deadline, "no logged steps within 120 s"
            time.sleep(0.5)
        (trainer,) = [p for p in psutil.Process(sup.pid).children(recursive=True)
                      if "runner.train" in " ".join(p.cmdline())]
        trainer.kill()
        assert sup.wait(30) != 0
    finally:
        if sup.poll() is None:
            os.killpg(sup.pid, signal.SIGKILL)
            sup.wait(10)
    events = read(run)
    data = hparams_data(events)
    assert "_hparams_/session_end_info" not in data  # killed: it never ended
    experiment = data["_hparams_/experiment"].experiment
    assert "train/loss" in [m.name.tag for m in experiment.metric_infos]
    start = data["_hparams_/session_start_info"].session_start_info
    assert start.hparams["model"].string_value == "mlp" and start.hparams["batch_size"].number_value == 4
    assert steps(events, "train/loss")[:3] == [1, 2, 3]


# --- `runner dashboards up`: every image grid, not TensorBoard's sample of 10 ---------------------

def free_port(ports: range = range(6100, 6200)) -> int:
    for port in ports:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {ports}")  # TensorBoard servers of this file: ports 6100-6199


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_dashboards_up_serves_every_image_step(tmp_path: Path) -> None:
    from dashboards import servers

    runs = tmp_path / "runs"
    sink = TensorBoardSink(runs / "grids")
    image_steps = list(range(1, 26))  # 25 grids: TensorBoard's default keeps 10 of them
    for step in image_steps:
        sink.write(ImageGrid(tag="images/samples", step=step, image=np.random.rand(3, 8, 8)))
    sink.close()
    tb, vis = free_port(), free_port(range(6199, 6099, -1))
    result = run_runner("dashboards", "up", "--run-dir", str(runs), "--tb-port", str(tb), "--visdom-port", str(vis))
    try:
        assert result.code == 0, result.stderr
        server = servers.recorded(runs)["tensorboard"]
        assert f"--samples_per_plugin={servers.SAMPLES_PER_PLUGIN}" in psutil.Process(server.pid).cmdline()
        query = f"?run=grids&tag={urllib.parse.quote('images/samples')}"
        deadline, served = time.monotonic() + 60, []
        while len(served) < len(image_steps) and time.monotonic() < deadline:  # it loads the folder in the background
            time.sleep(1)
            served = [e["step"] for e in get_json(f"http://127.0.0.1:{tb}/data/plugin/images/images{query}")]
        assert served == image_steps
    finally:
        assert run_runner("dashboards", "down", "--run-dir", str(runs)).code == 0


# --- the graph on every torch release pyproject allows --------------------------------------------

def test_the_graph_helpers_were_checked_on_every_torch_release_pyproject_allows() -> None:
    """A new lower bound in pyproject, or a torch newer than the releases checked, fails here first."""
    import re
    import tomllib

    from runner.probes.model_graph import GRAPH_HELPERS_CHECKED, torch_release

    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (lowest,) = [re.search(r"torch>=([\d.]+)", d)[1] for d in dependencies if re.match(r"torch\b", d)]
    assert GRAPH_HELPERS_CHECKED[0] <= torch_release(lowest)
    assert GRAPH_HELPERS_CHECKED[0] <= torch_release() <= GRAPH_HELPERS_CHECKED[1]
    assert torch_release("2.14.1+cu130") == (2, 14) and torch_release("2.15.0a0+git1234") == (2, 15)


def test_a_torch_without_the_private_graph_helpers_gets_the_layer_table(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.utils.tensorboard._pytorch_graph as helpers

    from runner.probes.model_graph import trace_graph

    model, example = build_model("cnn", 3, 16, 10), torch.rand(2, 3, 16, 16)
    assert trace_graph(model, example).graph_def is not None  # this torch: the graph
    monkeypatch.delattr(helpers, "parse")  # a release that renamed it
    event = trace_graph(model, example)
    assert event.graph_def is None and f"torch {torch.__version__}" in event.error
    assert "lacks the private graph helpers" in event.error and "| features.0 | Conv2d |" in event.layer_table
    sink = TensorBoardSink(tmp_path)
    sink.write(event)
    sink.close()
    assert "Model graph unavailable" in texts(read(tmp_path), "model")[0]
