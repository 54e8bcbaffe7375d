"""`runner dashboards`: offline Visdom assets, up/status/down of real servers, safety checks, no torch."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from dashboards import servers, visdom_assets
from dashboards.visdom import Message, VisdomConnection, VisdomSink
from runner.telemetry.events import Scalar
from tests.support.runs import ROOT, run_runner
from tests.support.visdom_server import by_title, free_port, line

WHEEL_FILES = ("index.html", "login.html", "js/main.js", "css/style.css", "css/login.css", "css/network.css")


def _dashboards(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    out = run_runner("dashboards", *args, env=env)
    return out.code, out.stdout, out.stderr


def test_commands_do_not_import_torch() -> None:
    script = ("import sys, dashboards.commands, dashboards.servers, dashboards.visdom, dashboards.visdom_assets, "
              "dashboards.graph_svg; assert 'torch' not in sys.modules and 'visdom' not in sys.modules, "
              "sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'visdom'))")
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT, timeout=60)


def test_install_assets_is_a_no_op_when_installed() -> None:
    assert visdom_assets.missing_assets() == []  # `make setup` installed them
    started = time.monotonic()
    code, out, _ = _dashboards("install-assets")
    assert code == 0 and "already installed" in out
    assert time.monotonic() - started < 60  # no npm round trip (bounded loosely: the CPU is shared)


@pytest.mark.slow
def test_install_assets_from_what_the_wheel_ships(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """From a static/ holding only the wheel's files, install makes visdom's own build.py skip every download."""
    package = tmp_path / "visdom"
    for name in WHEEL_FILES:
        (package / "static" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(visdom_assets.static_dir() / name, package / "static" / name)
    assert len(visdom_assets.missing_assets(package / "static")) > 20
    assert visdom_assets.install(package / "static") is True
    assert visdom_assets.missing_assets(package / "static") == []
    assert visdom_assets.install(package / "static") is False  # idempotent
    assert (package / "static" / "version.built").read_text() == visdom_assets.visdom_version()

    import requests
    from visdom.server import build

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"visdom tried to download {args[1:2]}")

    monkeypatch.setattr(urllib.request.OpenerDirector, "open", no_network)
    monkeypatch.setattr(requests, "get", no_network)
    build.download_scripts(install_dir=str(package))


@pytest.mark.slow
def test_up_status_down(tmp_path: Path) -> None:
    runs, tb, vis = tmp_path / "runs", free_port(), free_port()
    ports = ["--tb-port", str(tb), "--visdom-port", str(vis), "--run-dir", str(runs)]
    code, out, err = _dashboards("up", *ports)
    recorded = servers.recorded(runs)
    try:
        assert code == 0, err
        assert f"http://127.0.0.1:{tb}/" in out and f"http://127.0.0.1:{vis}/" in out
        assert f"ssh -N -L {tb}:127.0.0.1:{tb} -L {vis}:127.0.0.1:{vis} " in out
        assert set(recorded) == {"tensorboard", "visdom"}
        for server in recorded.values():
            proc = psutil.Process(server.pid)
            assert servers.answers(server.local_url)
            assert server.pid not in [p.pid for p in psutil.Process().children(recursive=True)]  # detached
            assert {(c.laddr.ip, c.laddr.port) for c in proc.net_connections("tcp")
                    if c.status == psutil.CONN_LISTEN} == {("127.0.0.1", server.port)}
        again = _dashboards("up", *ports)
        assert again[0] == 0 and again[1].count("already running") == 2
        assert {k: s.pid for k, s in servers.recorded(runs).items()} == {k: s.pid for k, s in recorded.items()}
        assert _dashboards("status", "--run-dir", str(runs))[0] == 0
        with socket.socket() as busy:  # another runs folder, whose Visdom port is taken
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            code, _, err = _dashboards("up", "--run-dir", str(tmp_path / "other"), "--tb-port", str(free_port()),
                                       "--visdom-port", str(busy.getsockname()[1]))
        assert code == 2 and err.strip().count("\n") == 0 and "is busy" in err and "--visdom-port" in err
        assert "tensorboard" not in servers.recorded(tmp_path / "other")  # nothing started on the way
    finally:
        code, out, _ = _dashboards("down", "--run-dir", str(runs))
    assert code == 0 and out.count(" stopped") == 2
    for server in recorded.values():
        assert not psutil.pid_exists(server.pid) or psutil.Process(server.pid).status() == psutil.STATUS_ZOMBIE
    assert _dashboards("status", "--run-dir", str(runs))[0] == 1


@pytest.mark.slow
def test_base_url_for_a_reverse_proxy(tmp_path: Path) -> None:
    runs, tb, vis = tmp_path / "runs", free_port(), free_port()
    code, out, err = _dashboards("up", "--run-dir", str(runs), "--tb-port", str(tb), "--visdom-port", str(vis),
                                 "--base-url", "/dash/")
    try:
        assert code == 0, err
        assert servers.answers(f"http://127.0.0.1:{tb}/dash/tensorboard/")
        assert servers.answers(f"http://127.0.0.1:{vis}/dash/visdom/")
        url = f"http://127.0.0.1:{vis}/dash/visdom"
        sink = VisdomSink(url, "proxied", tmp_path / "visdom.log", send_every=0)
        sink.write(Scalar(tag="train/loss", step=1, value=0.5))
        sink.close()
        conn = VisdomConnection(url)
        conn.connect()
        windows = json.loads(conn.post(Message.of("win_data", {"eid": "proxied", "win": None})))
        conn.close()
        assert line(by_title(windows)["loss"])["loss"] == ([1], [0.5])
    finally:
        _dashboards("down", "--run-dir", str(runs))


def test_down_spares_a_process_that_reused_the_pid(tmp_path: Path) -> None:
    """The recorded pid now belongs to someone else (another start time): down must not touch it."""
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = servers.Server(kind="visdom", pid=victim.pid, started=psutil.Process(victim.pid).create_time() - 100,
                               host="127.0.0.1", port=1, base_url="", owner="dashboards up", output="")
        folder = servers.dashboards_dir(tmp_path)
        folder.mkdir(parents=True)
        (folder / "servers.json").write_text(json.dumps({"visdom": stale.__dict__}))
        code, out, _ = _dashboards("down", "--run-dir", str(tmp_path))
        assert code == 0 and "was not running" in out
        assert victim.poll() is None
        assert servers.recorded(tmp_path) == {}
    finally:
        victim.kill()
        victim.wait()


@pytest.mark.parametrize(("args", "env", "expected"), [
    (["--host", "0.0.0.0"], {}, "pass --public"),
    (["--host", "0.0.0.0", "--public"], {"VISDOM_USERNAME": "", "VISDOM_PASSWORD": ""}, "VISDOM_USERNAME"),
    (["--tb-port", "7000", "--visdom-port", "7000"], {}, "must differ"),
])
def test_unsafe_or_impossible_requests_are_refused(tmp_path: Path, args: list[str], env: dict[str, str],
                                                   expected: str) -> None:
    code, _, err = _dashboards("up", "--run-dir", str(tmp_path), *args, env=env)
    assert code == 2 and expected in err and err.startswith("runner: error:") and err.count("\n") == 1
    assert servers.recorded(tmp_path) == {}


def test_replay_of_a_run_without_a_log_is_a_usage_error(tmp_path: Path) -> None:
    code, _, err = _dashboards("replay", "nothing", "--run-dir", str(tmp_path))
    assert code == 2 and "no visdom.log" in err
