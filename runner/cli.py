"""The `runner` command line: parsing only. Heavy imports (torch) happen inside the commands.

Flow: CLI → config (resolve + validate) → launch (supervisor → trainer or torchrun).
"""

from __future__ import annotations

import logging
import sys
import traceback
from typing import Any, Optional

import typer

from dashboards.commands import app as dashboards_app
from runner.errors import RunnerError
from runner.memory.commands import memory as memory_command
from runner.procs.commands import cleanup as cleanup_command
from runner.procs.commands import runs as runs_command

app = typer.Typer(
    name="runner",
    help="Observability-first PyTorch training: TensorBoard + Visdom, DDP via torchrun, clean processes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(dashboards_app, name="dashboards")
app.command("memory")(memory_command)
app.command("cleanup")(cleanup_command)
app.command("runs")(runs_command)

_W = "Workload"
_O = "Optimisation"
_D = "Distribution"
_V = "Observability"
_R = "Run"


@app.command()
def train(
    ctx: typer.Context,
    config: Optional[str] = typer.Option(None, "--config", help="TOML file; flags override it.", rich_help_panel=_R),
    model: Optional[str] = typer.Option(None, help="mlp|cnn|resnet18|tinyunet|unet or package.module:factory. [default: tinyunet]", rich_help_panel=_W),
    data: Optional[str] = typer.Option(None, help="synthetic | imagefolder:PATH | paired:NOISY,CLEAN | mnist:ROOT | cifar10:ROOT | package.module:factory. [default: synthetic]", rich_help_panel=_W),
    task: Optional[str] = typer.Option(None, help="auto|classify|denoise. [default: auto]", rich_help_panel=_W),
    image_size: Optional[int] = typer.Option(None, help="Image side in pixels. [default: 64]", rich_help_panel=_W),
    channels: Optional[int] = typer.Option(None, help="Image channels (synthetic, imagefolder). [default: 3]", rich_help_panel=_W),
    num_classes: Optional[int] = typer.Option(None, help="Classes of the synthetic set. [default: 10]", rich_help_panel=_W),
    samples: Optional[int] = typer.Option(None, help="Size of the synthetic set. [default: 512]", rich_help_panel=_W),
    noise_sigma: Optional[float] = typer.Option(None, help="Denoising noise level. [default: 0.2]", rich_help_panel=_W),
    download: Optional[bool] = typer.Option(None, "--download", help="Allow mnist/cifar10 to download.", rich_help_panel=_W),
    weighted_sampling: Optional[bool] = typer.Option(None, "--weighted-sampling", help="Inverse class-frequency sampling.", rich_help_panel=_W),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps in all. [default: 100, or from --epochs]", rich_help_panel=_O),
    epochs: Optional[int] = typer.Option(None, help="Epochs (used when --steps is not given).", rich_help_panel=_O),
    batch_size: Optional[str] = typer.Option(None, help="Per-process batch size, or auto. [default: 16]", rich_help_panel=_O),
    max_batch_size: Optional[int] = typer.Option(None, help="Cap for --batch-size auto. [default: 4096]", rich_help_panel=_O),
    memory_budget: Optional[str] = typer.Option(None, help="CPU budget for --batch-size auto, e.g. 2GiB.", rich_help_panel=_O),
    lr: Optional[float] = typer.Option(None, help="Learning rate. [default: 0.001]", rich_help_panel=_O),
    optimizer: Optional[str] = typer.Option(None, help="sgd|momentum|adam|adamw. [default: adam]", rich_help_panel=_O),
    weight_decay: Optional[float] = typer.Option(None, help="Weight decay. [default: 0]", rich_help_panel=_O),
    amp: Optional[bool] = typer.Option(None, "--amp/--no-amp", help="Mixed precision (fp16+GradScaler on CUDA, bf16 on CPU).", rich_help_panel=_O),
    seed: Optional[int] = typer.Option(None, help="Seed for data, init and order. [default: 0]", rich_help_panel=_O),
    workers: Optional[int] = typer.Option(None, help="DataLoader worker processes. [default: 0]", rich_help_panel=_O),
    worker_start_method: Optional[str] = typer.Option(None, help="default|fork|spawn|forkserver.", rich_help_panel=_O),
    device: Optional[str] = typer.Option(None, help="auto|cpu|cuda. [default: auto]", rich_help_panel=_O),
    strategy: Optional[str] = typer.Option(None, help="single|dp|ddp. [default: single]", rich_help_panel=_D),
    gpus: Optional[str] = typer.Option(None, help="dp: GPU ids, e.g. 0,1 (default all).", rich_help_panel=_D),
    nproc: Optional[int] = typer.Option(None, help="ddp: processes per node. [default: 1]", rich_help_panel=_D),
    nnodes: Optional[str] = typer.Option(None, help="ddp: torchrun --nnodes.", rich_help_panel=_D),
    node_rank: Optional[int] = typer.Option(None, help="ddp: torchrun --node-rank.", rich_help_panel=_D),
    rdzv_endpoint: Optional[str] = typer.Option(None, help="ddp: torchrun --rdzv-endpoint HOST:PORT.", rich_help_panel=_D),
    rdzv_id: Optional[str] = typer.Option(None, help="ddp: torchrun --rdzv-id.", rich_help_panel=_D),
    max_restarts: Optional[int] = typer.Option(None, help="ddp: torchrun --max-restarts.", rich_help_panel=_D),
    sync_bn: Optional[bool] = typer.Option(None, "--sync-bn", help="ddp on CUDA: SyncBatchNorm.", rich_help_panel=_D),
    viz: Optional[str] = typer.Option(None, help="none|tensorboard|visdom|both. [default: tensorboard]", rich_help_panel=_V),
    log_every: Optional[int] = typer.Option(None, help="Scalars every N steps. [default: 10]", rich_help_panel=_V),
    images_every: Optional[int] = typer.Option(None, help="Image grid every N steps. [default: 100]", rich_help_panel=_V),
    hist_every: Optional[int] = typer.Option(None, help="Histograms every N steps. [default: 100]", rich_help_panel=_V),
    memory_every: Optional[int] = typer.Option(None, help="Memory sample every N steps. [default: 1]", rich_help_panel=_V),
    system_every: Optional[float] = typer.Option(None, help="Seconds between NVML/psutil samples. [default: 1]", rich_help_panel=_V),
    graph: Optional[bool] = typer.Option(None, "--graph/--no-graph", help="Log the model graph once. [default: on]", rich_help_panel=_V),
    visdom_url: Optional[str] = typer.Option(None, help="Visdom server (default: local, started if down).", rich_help_panel=_V),
    visdom_port: Optional[int] = typer.Option(None, help="Port of the local Visdom server. [default: 8097]", rich_help_panel=_V),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help="Live progress bar on a terminal (else a line per log point). [default: on]", rich_help_panel=_V),
    run_dir: Optional[str] = typer.Option(None, help="Folder of runs. [default: runs]", rich_help_panel=_R),
    name: Optional[str] = typer.Option(None, help="Run name (folder under --run-dir).", rich_help_panel=_R),
    resume: Optional[str] = typer.Option(None, help="auto (continue the run's last.pt if any) | never | PATH.", rich_help_panel=_R),
    checkpoint_every: Optional[int] = typer.Option(None, help="Write last.pt every N steps. [default: 50]", rich_help_panel=_R),
    on_nan: Optional[str] = typer.Option(None, help="stop|skip on a NaN/inf loss. [default: stop]", rich_help_panel=_R),
    oom: Optional[str] = typer.Option(None, help="stop|retry (halve the batch) on out-of-memory. [default: stop]", rich_help_panel=_R),
    memory_snapshot: Optional[bool] = typer.Option(None, "--memory-snapshot", help="CUDA: record allocator history for the OOM post-mortem.", rich_help_panel=_R),
    debug: Optional[bool] = typer.Option(None, "--debug", help="Show tracebacks.", rich_help_panel=_R),
) -> None:
    """Train a model, streaming scalars, images, histograms, the graph and memory to the dashboards."""
    overrides: dict[str, Any] = {k: v for k, v in ctx.params.items() if k != "config"}
    _run(lambda: _train(config, overrides), debug=bool(debug))


def _train(config_file: str | None, overrides: dict[str, Any]) -> int:
    from runner import config as config_module
    from runner.launch import launch

    _log_to_stderr()

    cfg = config_module.resolve(config_file, overrides)
    return launch(cfg)


class _StderrHandler(logging.Handler):
    """Writes to whatever sys.stderr is at the time (the CLI's, or a test runner's capture)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr, flush=True)


def _log_to_stderr() -> None:
    """The runner's INFO messages (`runner: ...`) go to stderr; set up once per process."""
    logger = logging.getLogger("runner")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("runner: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _run(body: Any, debug: bool) -> None:
    """Run a command body; RunnerError becomes one line on stderr and its exit code."""
    try:
        code = body()
    except RunnerError as exc:
        if debug:
            traceback.print_exc()
        print(f"runner: error: {exc}", file=sys.stderr)
        raise typer.Exit(exc.code) from None
    raise typer.Exit(code or 0)


def main(args: list[str] | None = None) -> None:
    """Console-script entry point: usage errors are one line on stderr, exit code 2."""
    from typer._click.exceptions import UsageError

    command = typer.main.get_command(app)
    try:
        code = command.main(args=args, prog_name="runner", standalone_mode=False)
    except UsageError as exc:
        if not exc.format_message():  # no arguments: the help was shown
            sys.exit(0)
        where = f" (see: {exc.ctx.command_path} --help)" if exc.ctx is not None else ""
        print(f"runner: error: {exc.format_message()}{where}", file=sys.stderr)
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
