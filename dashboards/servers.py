"""The TensorBoard and Visdom servers as background processes: start, find, check and stop them.

Servers run in their own session (a Ctrl+C in the terminal does not stop them) and are recorded in
`<run_dir>/.dashboards/servers.json` with their pid and start time, so `down` stops exactly the
processes it started, never a process that reused the pid. `runner dashboards up` starts servers
that stay; a run that finds no Visdom starts one that lives as long as the run (a run's processes
end with it: the supervisor reaps them, and they carry the run's tag for `runner cleanup`). Their output goes to
`<run_dir>/.dashboards/<kind>.out`; Visdom keeps its envs in `<run_dir>/.dashboards/visdom/`.
No torch or visdom import here.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from runner.errors import RunnerError, usage_error

KINDS = ("tensorboard", "visdom")
# The stock entry point downloads assets before parsing flags; main() alone never fetches. Visdom's
# import pulls in torch only for tensor conversion, which the server never needs: skip it (~2 s).
VISDOM_MAIN = ("import sys; sys.modules['torch'] = None; sys.argv[0] = 'visdom'; "
               "from visdom.server.run_server import main; main()")
CREDENTIAL_VARS = ("VISDOM_USERNAME", "VISDOM_PASSWORD")


@dataclass
class Server:
    """A server this tool started: enough to find it again and to tell it from a pid reused since."""

    kind: str
    pid: int
    started: float  # process create time (psutil), seconds since the epoch
    host: str
    port: int
    base_url: str  # path prefix, "" or "/something"
    owner: str  # "dashboards up" or "run <name>"
    output: str  # file with the server's stdout/stderr

    @property
    def local_url(self) -> str:
        """Where this machine reaches it."""
        host = "127.0.0.1" if is_loopback(self.host) or self.host in ("0.0.0.0", "::") else self.host
        return f"http://{_url_host(host)}:{self.port}{self.base_url}/"

    def alive(self) -> bool:
        """True while the recorded process still runs (same pid and same start time)."""
        try:
            proc = psutil.Process(self.pid)
            return round(proc.create_time(), 2) == round(self.started, 2) and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def dashboards_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / ".dashboards"


def visdom_env_path(run_dir: str | Path) -> Path:
    """Visdom's -env_path: envs saved there survive server restarts."""
    return dashboards_dir(run_dir) / "visdom"


def normalize_base_url(base_url: str) -> str:
    """`""`, `"/"`, `"dash"`, `"/dash/"` → `""` or `"/dash"` (the form both servers take)."""
    base = base_url.strip().strip("/")
    return f"/{base}" if base else ""


# --- the state file ----------------------------------------------------------------------------

@contextlib.contextmanager
def _locked(run_dir: str | Path) -> Iterator[Path]:
    """Exclusive access to the state file (a run may start Visdom while `up` runs)."""
    folder = dashboards_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield folder / "servers.json"
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read(path: Path) -> dict[str, Server]:
    try:
        raw = json.loads(path.read_text())
        return {kind: Server(**record) for kind, record in raw.items() if kind in KINDS}
    except (OSError, ValueError, TypeError):
        return {}


def _write(path: Path, servers: dict[str, Server]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({kind: asdict(s) for kind, s in servers.items()}, indent=2) + "\n")
    os.replace(tmp, path)


def recorded(run_dir: str | Path) -> dict[str, Server]:
    """The servers recorded for this runs folder (alive or not)."""
    return _read(dashboards_dir(run_dir) / "servers.json")


def running_visdom(run_dir: str | Path) -> Server | None:
    server = recorded(run_dir).get("visdom")
    return server if server is not None and server.alive() else None


# --- probing -----------------------------------------------------------------------------------

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def answers(url: str, timeout: float = 1.0) -> bool:
    """True when an HTTP server answers at `url` (any status below 500)."""
    try:
        with _NO_PROXY.open(url, timeout=timeout):
            return True
    except urllib.error.HTTPError as exc:
        return exc.code < 500
    except (OSError, ValueError):
        return False


def port_busy(host: str, port: int) -> bool:
    """True when something already listens on host:port (or it cannot be bound)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise usage_error(f"cannot listen on {host}:{port} ({exc.strerror})") from None
    return False


# --- commands for each server ------------------------------------------------------------------

def visdom_command(port: int, host: str, env_path: Path, base_url: str, login: bool) -> list[str]:
    cmd = [sys.executable, "-c", VISDOM_MAIN, "-port", str(port), "-env_path", f"{env_path}{os.sep}",
           "-logging_level", "WARNING", "--hostname", host]
    if is_loopback(host):
        cmd.append("-bind_local")  # 127.0.0.1 only; without it Visdom listens on every interface
    if base_url:
        cmd += ["-base_url", base_url]
    if login:
        cmd.append("-enable_login")
    return cmd


# TensorBoard keeps 1,000 scalars, 10 images and 500 histograms per tag (a random sample) unless told,
# so a spike in a long run vanishes from its charts (tensorboard#6796, #4047). 10,000 holds every grid
# and histogram of a 1M-step run at the default cadence (every 100 steps); 10,000,000 every scalar of a
# 10M-step run logged at every step. Not 0: the loader reads it as "keep all", but the plugins then ask
# for 0 samples (`_downsample(data, 0)`) and show none.
SAMPLES_PER_PLUGIN = "scalars=10000000,images=10000,histograms=10000"


def tensorboard_command(port: int, host: str, logdir: Path, base_url: str) -> list[str]:
    cmd = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--port", str(port), "--host", host,
           f"--samples_per_plugin={SAMPLES_PER_PLUGIN}"]
    if base_url:
        cmd += ["--path_prefix", base_url]
    return cmd


def visdom_login_env() -> dict[str, str]:
    """Credentials reach Visdom through its own env variables, never its command line."""
    missing = [name for name in CREDENTIAL_VARS if not os.environ.get(name)]
    if missing:
        raise usage_error(f"a Visdom server on a non-loopback address needs a login: set {' and '.join(missing)} "
                          "in the environment")
    env = {"VISDOM_USE_ENV_CREDENTIALS": "1"}
    home = Path.home() / ".visdom"  # Visdom keeps its cookie secret there, whatever its -env_path
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "COOKIE_SECRET").is_file() and not os.environ.get("VISDOM_COOKIE"):
        env["VISDOM_COOKIE"] = secrets.token_hex(32)
    return env


# --- start and stop ----------------------------------------------------------------------------

def _spawn(kind: str, cmd: list[str], run_dir: str | Path, extra_env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
    output = dashboards_dir(run_dir) / f"{kind}.out"
    output.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, **extra_env)
    with open(output, "ab") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, close_fds=True)
    return proc, output


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def _wait_until_answers(server: Server, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RunnerError(f"{server.kind} exited with code {proc.returncode} before answering "
                              f"({_tail(Path(server.output)) or 'no output'}; see {server.output})")
        if answers(server.local_url, timeout=1.0):
            return
        time.sleep(0.1)
    raise RunnerError(f"{server.kind} did not answer at {server.local_url} within {timeout:.0f} s "
                      f"(see {server.output})")


@dataclass
class Request:
    """What to start: one server's command, where, and for whom."""

    kind: str
    cmd: list[str]
    host: str
    port: int
    base_url: str
    owner: str
    env: dict[str, str]


def start(run_dir: str | Path, requests: list[Request], timeout: float = 60.0) -> dict[str, tuple[Server, bool]]:
    """Start each requested server unless ours already runs; wait until all answer.

    Returns kind → (server, newly started). A busy port is a usage error (exit 2), checked for every
    server before any starts. If one fails to come up, the ones started here are stopped again.
    """
    with _locked(run_dir) as path:
        servers = _read(path)
        todo = [r for r in requests if not (r.kind in servers and servers[r.kind].alive())]
        for request in todo:
            if port_busy(request.host, request.port):
                flag = "--tb-port" if request.kind == "tensorboard" else "--visdom-port"
                raise usage_error(f"port {request.port} on {request.host} is busy (not a server started here): "
                                  f"choose another with {flag}")
        started: list[tuple[Server, subprocess.Popen]] = []
        try:
            for request in todo:
                proc, output = _spawn(request.kind, request.cmd, run_dir, request.env)
                server = Server(kind=request.kind, pid=proc.pid, started=psutil.Process(proc.pid).create_time(),
                                host=request.host, port=request.port, base_url=request.base_url,
                                owner=request.owner, output=str(output))
                started.append((server, proc))
            for server, proc in started:
                _wait_until_answers(server, proc, timeout)
        except BaseException:
            for server, _ in started:
                stop(server)
            raise
        for server, _ in started:
            servers[server.kind] = server
        _write(path, servers)
    new = {s.kind for s, _ in started}
    return {r.kind: (servers[r.kind], r.kind in new) for r in requests}


def stop(server: Server, timeout: float = 5.0) -> bool:
    """SIGTERM the server's process group (then SIGKILL); only if it is still the process we started."""
    if not server.alive():
        return False
    try:
        os.killpg(server.pid, signal.SIGTERM)
        proc = psutil.Process(server.pid)
        try:
            proc.wait(timeout)
        except psutil.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            proc.wait(timeout)
    except (ProcessLookupError, psutil.NoSuchProcess):
        pass
    return True


def stop_all(run_dir: str | Path) -> list[tuple[Server, bool]]:
    """Stop every recorded server; returns (server, was running) and forgets them all."""
    with _locked(run_dir) as path:
        servers = _read(path)
        result = [(server, stop(server)) for server in servers.values()]
        _write(path, {})
    return result


def start_for_run(run_dir: str | Path, port: int, owner: str, timeout: float = 30.0) -> tuple[Server, bool]:
    """A Visdom server on 127.0.0.1:port for a run that found none: it lives as long as the run (the
    run stops it with `release`; the supervisor reaps it if the run dies), its envs stay on disk."""
    request = Request(kind="visdom", cmd=visdom_command(port, "127.0.0.1", visdom_env_path(run_dir), "", False),
                      host="127.0.0.1", port=port, base_url="", owner=owner, env={})
    visdom_env_path(run_dir).mkdir(parents=True, exist_ok=True)
    return start(run_dir, [request], timeout)["visdom"]


def release(run_dir: str | Path, server: Server) -> None:
    """Stop a server started for a run and forget it (unless the record now names another process)."""
    stop(server)
    with _locked(run_dir) as path:
        servers = _read(path)
        if servers.get(server.kind) == server:
            del servers[server.kind]
            _write(path, servers)
