"""The `runner` command line: parsing only. Heavy imports (torch) happen inside the commands.

Flow: CLI → config (resolve + validate) → launch (supervisor → trainer or torchrun).
"""

from __future__ import annotations

from collections.abc import Callable

import typer

from dashboards.commands import app as dashboards_app
from runner.cli_errors import run_app
from runner.config import TrainConfig
from runner.diagnosis.diff_command import diff as diff_command
from runner.diagnosis.export_command import export as export_command
from runner.diagnosis.report_command import report as report_command
from runner.memory.commands import memory as memory_command
from runner.procs.commands import cleanup as cleanup_command
from runner.procs.commands import runs as runs_command
from runner.procs.commands import stacks as stacks_command
from runner.train_command import make_train_command
from runner.version import __version__


def _version(value: bool) -> None:
    if value:
        print(f"runner {__version__}")
        raise typer.Exit()


def _main_options(
    version: bool | None = typer.Option(None, "--version", callback=_version, is_eager=True,
                                           help="Show the version and exit."),
) -> None:
    """Observability-first PyTorch training: TensorBoard + Visdom, DDP via torchrun, clean processes."""


def _launch(cfg: TrainConfig) -> int:
    """`runner train`: the trainer in a supervised child process, or torchrun for ddp."""
    from runner.launch import launch

    return launch(cfg)


def build_app(train: Callable[[TrainConfig], int]) -> typer.Typer:
    """The command tree, with `train` running `train` on the resolved config: `_launch` for users, the
    in-process `runner.train.run.train_here` for the tests (as `python -m runner.train` does)."""
    app = typer.Typer(
        name="runner",
        help="Observability-first PyTorch training: TensorBoard + Visdom, DDP via torchrun, clean processes.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
    )
    app.callback()(_main_options)
    app.command("train")(make_train_command(train))
    app.command("memory")(memory_command)
    app.add_typer(dashboards_app, name="dashboards")
    app.command("cleanup")(cleanup_command)
    app.command("runs")(runs_command)
    app.command("report")(report_command)
    app.command("stacks")(stacks_command)
    app.command("diff")(diff_command)
    app.command("export")(export_command)
    return app


app = build_app(_launch)


def main(args: list[str] | None = None) -> None:
    """Console-script entry point: usage errors are one line on stderr, exit code 2."""
    run_app(app, args, prog_name="runner")


if __name__ == "__main__":
    main()
