"""`runner dashboards up|status|down|replay|install-assets` (no torch import)."""

from __future__ import annotations

import getpass
import socket
import sys
from pathlib import Path

import typer

from runner.cli_errors import run_command
from runner.errors import RunnerError, usage_error

app = typer.Typer(help="Start, check and stop the TensorBoard and Visdom servers.", no_args_is_help=True)

_RUN_DIR = typer.Option("runs", "--run-dir", envvar="RUNNER_RUN_DIR", show_envvar=True,
                        help="Folder of runs (TensorBoard's --logdir; Visdom envs in .dashboards/).")
_VISDOM_PORT = typer.Option(8097, "--visdom-port", envvar="RUNNER_VISDOM_PORT", show_envvar=True,
                            help="Port of the local Visdom server.")


@app.command("install-assets")
def install_assets(
    force: bool = typer.Option(False, "--force", help="Fetch and copy again even if installed."),
) -> None:
    """Install Visdom's JS/CSS/fonts from the npm registry so its server works offline."""
    from dashboards import visdom_assets

    def body() -> None:
        if visdom_assets.install(force=force):
            print(f"Visdom assets installed in {visdom_assets.static_dir()}")
        else:
            print(f"Visdom assets already installed in {visdom_assets.static_dir()}")

    run_command(body)


@app.command()
def up(
    run_dir: str = _RUN_DIR,
    host: str = typer.Option("127.0.0.1", help="Address both servers listen on. Non-loopback needs Visdom "
                                              "login (VISDOM_USERNAME/VISDOM_PASSWORD) and --public."),
    tb_port: int = typer.Option(6006, envvar="RUNNER_TB_PORT", show_envvar=True, help="TensorBoard port."),
    visdom_port: int = _VISDOM_PORT,
    base_url: str = typer.Option("", help="Path prefix behind a reverse proxy, e.g. /dash: TensorBoard is served "
                                         "under /dash/tensorboard, Visdom under /dash/visdom."),
    public: bool = typer.Option(False, "--public",
                                help="Allow TensorBoard (no authentication) on a non-loopback host."),
    timeout: float = typer.Option(60.0, help="Seconds to wait for both servers to answer."),
) -> None:
    """Start TensorBoard and Visdom in the background (if not already running) and print where they are."""
    run_command(lambda: _up(run_dir, host, tb_port, visdom_port, base_url, public, timeout))


def _up(run_dir: str, host: str, tb_port: int, visdom_port: int, base_url: str, public: bool, timeout: float) -> int:
    from dashboards import servers, visdom_assets

    loopback = servers.is_loopback(host)
    login_env: dict[str, str] = {}
    if not loopback:
        if not public:
            raise usage_error(f"TensorBoard has no authentication: pass --public to serve it on {host}")
        login_env = servers.visdom_login_env()
        print(f"runner: warning: serving on {host}: TensorBoard is open to anyone who can reach it; "
              "Visdom asks for the VISDOM_USERNAME login and listens on every interface", file=sys.stderr)
    missing = visdom_assets.missing_assets()
    if missing:
        raise RunnerError(f"Visdom's web assets are not installed ({len(missing)} missing): "
                          "run `runner dashboards install-assets` (or `make setup`)")
    for port in (tb_port, visdom_port):
        if not 0 < port < 65536:
            raise usage_error(f"port must be between 1 and 65535, got {port}")
    if tb_port == visdom_port:
        raise usage_error("--tb-port and --visdom-port must differ")
    prefix = servers.normalize_base_url(base_url)
    tb_base, vis_base = (f"{prefix}/tensorboard", f"{prefix}/visdom") if prefix else ("", "")
    env_path = servers.visdom_env_path(run_dir)
    env_path.mkdir(parents=True, exist_ok=True)
    requests = [
        servers.Request("tensorboard", servers.tensorboard_command(tb_port, host, Path(run_dir), tb_base), host,
                        tb_port, tb_base, "dashboards up", {}),
        servers.Request("visdom", servers.visdom_command(visdom_port, host, env_path, vis_base, not loopback), host,
                        visdom_port, vis_base, "dashboards up", login_env),
    ]
    result = servers.start(run_dir, requests, timeout)
    for kind, (server, new) in result.items():
        note = "started" if new else f"already running, started by {server.owner}"
        print(f"{kind:<12} {server.local_url}   ({note}, pid {server.pid})")
    ports = [server.port for server, _ in result.values()]
    tunnel = " ".join(f"-L {p}:127.0.0.1:{p}" for p in ports)
    print(f"From your laptop: ssh -N {tunnel} {getpass.getuser()}@{_this_host()}")
    print(f"Stop both:        runner dashboards down --run-dir {run_dir}")
    return 0


def _this_host() -> str:
    """A name a laptop can reach this machine by (the FQDN, unless that is only localhost)."""
    name = socket.getfqdn()
    return socket.gethostname() if name.startswith("localhost") else name


@app.command()
def status(run_dir: str = _RUN_DIR) -> None:
    """Show the servers started for this runs folder. Exit 0 when every recorded one answers."""
    from dashboards import servers

    def body() -> int:
        recorded = servers.recorded(run_dir)
        if not recorded:
            print(f"no dashboards recorded for {run_dir} (start them with `runner dashboards up`)")
            return 1
        ok = True
        for kind, server in recorded.items():
            alive = server.alive()
            answering = alive and servers.answers(server.local_url, timeout=2.0)
            state = "up" if answering else "not answering" if alive else "stopped"
            ok &= answering
            print(f"{kind:<12} {state:<14} {server.local_url}   pid {server.pid}, started by {server.owner}")
        return 0 if ok else 1

    run_command(body)


@app.command()
def down(run_dir: str = _RUN_DIR) -> None:
    """Stop the servers recorded for this runs folder (only processes started here, checked by start time)."""
    from dashboards import servers

    def body() -> None:
        stopped = servers.stop_all(run_dir)
        if not stopped:
            print(f"no dashboards recorded for {run_dir}")
        for server, was_running in stopped:
            print(f"{server.kind:<12} {'stopped' if was_running else 'was not running'} (pid {server.pid})")

    run_command(body)


@app.command()
def replay(
    run: str = typer.Argument(..., help="Run name (folder under --run-dir) or path to a run folder or visdom.log."),
    run_dir: str = _RUN_DIR,
    visdom_url: str | None = typer.Option(None, envvar="RUNNER_VISDOM_URL", show_envvar=True,
                                             help="Visdom server (default: the one started here, else "
                                                  "http://127.0.0.1:<visdom-port>)."),
    visdom_port: int = _VISDOM_PORT,
) -> None:
    """Send a run's visdom.log to a Visdom server, so its env is complete (e.g. after the server was down)."""
    from dashboards import servers
    from dashboards.visdom import normalize_url
    from dashboards.visdom import replay as replay_log

    def body() -> None:
        path = Path(run)
        if not path.exists():
            path = Path(run_dir) / run
        if path.is_dir():
            path = path / "visdom.log"
        if not path.is_file():
            raise usage_error(f"no visdom.log for {run!r} (looked in {path})")
        if visdom_url:
            url = normalize_url(visdom_url, visdom_port)
        else:
            running = servers.running_visdom(run_dir)
            url = normalize_url(running.local_url if running else "127.0.0.1", visdom_port)
        env, panes = replay_log(path, url)
        print(f"replayed {path}: env {env!r}, {panes} panes, at {url}")

    run_command(body)
