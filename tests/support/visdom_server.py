"""Helpers for the Visdom and dashboards tests: a real Visdom server on a free port, a socket that
never answers, reading an env back through the server, and a deliberately slow model."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dashboards import servers
from runner.telemetry.events import Finding, ImageGrid, MemorySample, Scalar, Text

if TYPE_CHECKING:
    from dashboards.visdom import VisdomSink

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class VisdomServer:
    """A Visdom server process on 127.0.0.1:<port>, envs saved under `env_path`; killable and restartable."""

    def __init__(self, env_path: Path, port: int | None = None, extra_env: dict[str, str] | None = None,
                 login: bool = False) -> None:
        self.env_path, self.port = Path(env_path), port or free_port()
        self.extra_env, self.login = extra_env or {}, login
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> VisdomServer:
        self.env_path.mkdir(parents=True, exist_ok=True)
        if "HOME" in self.extra_env:
            (Path(self.extra_env["HOME"]) / ".visdom").mkdir(exist_ok=True)  # where a login server keeps its cookie
        cmd = servers.visdom_command(self.port, "127.0.0.1", self.env_path, "", self.login)
        self.proc = subprocess.Popen(cmd, env=dict(os.environ, **self.extra_env), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not servers.answers(self.url + "/"):
            assert self.proc.poll() is None, f"visdom exited with {self.proc.returncode}"
            assert time.monotonic() < deadline, "visdom did not answer"
            time.sleep(0.1)
        return self

    def kill(self) -> None:
        """SIGKILL: what the server had not saved is gone."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def windows(self, env: str) -> dict[str, dict]:
        """Every window of `env` as the server holds it (POST /win_data, as the client does)."""
        body = json.dumps({"eid": env, "win": None}).encode()
        request = urllib.request.Request(self.url + "/win_data", data=body, method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def __enter__(self) -> VisdomServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class HungServer:
    """A socket that accepts TCP connections (the kernel's backlog) and never answers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def __enter__(self) -> HungServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def line(window: dict) -> dict[str, tuple[list, list]]:
    """A line window's traces: name → (x, y)."""
    return {t["name"]: (t["x"], t["y"]) for t in window["content"]["data"]}


def by_title(windows: dict[str, dict]) -> dict[str, dict]:
    return {w["title"]: w for w in windows.values()}


def logged(log: Path, win: str, series: str) -> tuple[list[int], list[float | None]]:
    """Every point of one series as visdom.log holds it (a pane's creation, then its appends), in order."""
    from dashboards.visdom_log import entries

    xs: list[int] = []
    ys: list[float | None] = []
    for endpoint, msg in entries(log):
        if msg.get("win") != win or not isinstance(msg.get("data"), list):
            continue
        if endpoint == "events":
            xs, ys = [], []
        names = [msg["name"]] if msg.get("name") else [t.get("name") for t in msg["data"]]
        for name, trace in zip(names, msg["data"], strict=False):  # one `name` for a one-trace append
            if name == series:
                xs += trace["x"]
                ys += trace["y"]
    return xs, ys


def slow_model(channels: int, image_size: int):
    """A linear classifier that takes ~40 ms a forward call: long enough runs to kill a server under."""
    from torch import nn

    class Slow(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(channels * image_size * image_size, 10)

        def forward(self, x):
            time.sleep(0.04)
            return self.fc(x.flatten(1))

    return Slow()


# Events in the reverse of the layout's order (tests/test_visdom_layout.py has the order the env must show).
SCRAMBLED = [
    Text(tag="status", step=1, text="started"),
    Finding(tag="findings", step=1, kind="input_bound", severity="warning", message="The GPU waits for data.",
            evidence={"data_wait_share": 0.6}, advice="Raise --workers."),
    ImageGrid(tag="images/samples", step=1, image=np.zeros((3, 8, 8), dtype=np.float32)),
    MemorySample(tag="memory", step=1, values={"rss": 200.0 * (1 << 20), "cpu_percent": 50.0}),
    Scalar(tag="time/forward_ms", step=1, value=3.0),
    Scalar(tag="time/backward_ms", step=1, value=5.0),
    Scalar(tag="train/samples_per_s", step=1, value=100.0),
    Scalar(tag="train/psnr", step=1, value=20.0),
    Scalar(tag="train/lr", step=1, value=0.001),
    Scalar(tag="train/loss", step=1, value=1.0),
]


def deliver(sink: VisdomSink) -> None:
    """What the sink has, on the server now (a connection first, then the batch)."""
    for _ in range(2):
        sink.flush()
        assert sink.link.wait_idle(10)
