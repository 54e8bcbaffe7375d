"""The `train` command's flags, shared by `runner train` and the trainer's own entry point `python -m runner.train`.

Every flag defaults to None, so that a flag overrides `--config FILE` only when it is given (or set by its
environment variable); the help shows the value the run gets when neither sets it. Imports nothing heavy.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

import typer

from runner import config as config_io
from runner.cli_errors import run_command
from runner.config import TrainConfig

_DEFAULTS = TrainConfig()
_W = "Workload"
_O = "Optimisation"
_D = "Distribution"
_V = "Observability"
_R = "Run"


def _shown(field: str) -> str:
    value = getattr(_DEFAULTS, field)
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _checker(allowed: Sequence[str]) -> Callable[[str | None], str | None]:
    """A flag's value check: a value outside `allowed` is a usage error that suggests the closest one."""

    def check(value: str | None) -> str | None:
        if value is not None and value not in allowed:
            raise typer.BadParameter(f"unknown {value!r}: {config_io.choice_hint(value, allowed)}")
        return value

    return check


def _completer(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    """Shell completion of a flag's value from `allowed`."""

    def complete(incomplete: str) -> list[str]:
        return [choice for choice in allowed if choice.startswith(incomplete)]

    return complete


def _option(field: str, help: str, panel: str, *decls: str, choices: Sequence[str] = (), strict: bool = True,
            default: str | None = None, envvar: str | None = None, metavar: str | None = None) -> Any:
    """A train flag (default None) whose help shows the field's default, its choices and its env var."""
    extra: dict[str, Any] = {}
    if choices:
        extra["autocompletion"] = _completer(choices)
        metavar = metavar or f"[{'|'.join(choices)}]"
        if strict:
            extra["callback"] = _checker(choices)
    if envvar:
        extra.update(envvar=envvar, show_envvar=True)
    return typer.Option(None, *decls, help=help, rich_help_panel=panel, metavar=metavar,
                        show_default=_shown(field) if default is None else default, **extra)


def make_train_command(action: Callable[[TrainConfig], int], environment: bool = True) -> Callable[..., None]:
    """The typer `train` command: resolve the config (defaults < `--config` < env vars < flags), then run
    `action(cfg)` with its return value as exit code, or with `--print-config` print the resolved TOML.

    `environment=False` reads no RUNNER_* variables: a trainer started with the resolved config.toml of a
    `runner train` must not let the environment override what that command's flags decided.
    """

    def env(name: str) -> str | None:
        return name if environment else None

    def train(
        ctx: typer.Context,
        config: str | None = typer.Option(None, "--config", metavar="FILE", rich_help_panel=_R,
                                             help="TOML file with a train table; flags and env vars override it."),
        print_config: bool = typer.Option(False, "--print-config", rich_help_panel=_R,
                                          help="Print the resolved configuration as TOML and exit (runs nothing)."),
        model: str | None = _option("model", "Built-in model, or package.module:factory.", _W,
                                       choices=config_io.MODELS, strict=False,
                                       metavar=f"[{'|'.join(config_io.MODELS)}|MODULE:FACTORY]"),
        data: str | None = _option("data", "synthetic | imagefolder:PATH | paired:NOISY,CLEAN | mnist:ROOT | "
                                              "cifar10:ROOT | package.module:factory.", _W, metavar="SOURCE"),
        task: str | None = _option("task", "auto: denoise for U-Nets and paired data, else classify; or "
                                              "package.module:factory (see README, Your own task).", _W,
                                      choices=config_io.TASKS, strict=False,
                                      metavar=f"[{'|'.join(config_io.TASKS)}|MODULE:FACTORY]"),
        image_size: int | None = _option("image_size", "Image side in pixels.", _W),
        channels: int | None = _option("channels", "Image channels (synthetic, imagefolder).", _W),
        num_classes: int | None = _option("num_classes", "Classes of the synthetic set.", _W),
        samples: int | None = _option("samples", "Size of the synthetic set.", _W),
        noise_sigma: float | None = _option("noise_sigma", "Denoising noise level.", _W),
        download: bool | None = _option("download", "Allow mnist/cifar10 to download.", _W, "--download"),
        weighted_sampling: bool | None = _option("weighted_sampling", "Inverse class-frequency sampling.", _W,
                                                    "--weighted-sampling"),
        val_data: str | None = _option("val_data", "Validation data, the same forms as --data.", _W,
                                          default="none", metavar="SOURCE"),
        val_split: float | None = _option("val_split", "Hold out this fraction of --data for validation "
                                                         "(by --seed; stratified for classification).", _W,
                                             default="0 (none)", metavar="FRACTION"),
        eval_every: int | None = _option("eval_every", "Evaluate every N steps (and at the end).", _W,
                                            default="every epoch"),
        monitor: str | None = _option("monitor", "The tag best.pt follows.", _W, metavar="TAG"),
        monitor_mode: str | None = _option("monitor_mode", "Whether --monitor is best at its min or max.", _W,
                                              choices=config_io.MONITOR_MODES),
        steps: int | None = _option("steps", "Optimizer steps in all.", _O, default="100, or from --epochs"),
        epochs: int | None = _option("epochs", "Epochs (used when --steps is not given).", _O, default="none"),
        batch_size: str | None = _option("batch_size", "Per-process batch size, or auto (the largest that "
                                                          "fits).", _O, metavar="INTEGER|auto"),
        max_batch_size: int | None = _option("max_batch_size", "Cap for --batch-size auto.", _O),
        memory_budget: str | None = _option("memory_budget", "CPU budget for --batch-size auto, e.g. 2GiB.", _O,
                                               default="a share of the available RAM", metavar="SIZE"),
        lr: float | None = _option("lr", "Learning rate.", _O),
        optimizer: str | None = _option("optimizer", "Optimizer.", _O, choices=config_io.OPTIMIZERS),
        weight_decay: float | None = _option("weight_decay", "Weight decay.", _O),
        amp: bool | None = _option("amp", "Mixed precision (fp16 + GradScaler on CUDA, bf16 on CPU).", _O,
                                      "--amp/--no-amp"),
        amp_dtype: str | None = _option("amp_dtype", "Autocast dtype under --amp (auto: fp16 on CUDA, bf16 on "
                                                        "CPU; fp16 on CUDA adds a GradScaler).", _O,
                                           choices=config_io.AMP_DTYPES),
        lr_schedule: str | None = _option("lr_schedule", "Learning-rate schedule over the run's steps.", _O,
                                             choices=config_io.LR_SCHEDULES),
        warmup_steps: int | None = _option("warmup_steps", "Linear warm-up steps before the schedule.", _O),
        min_lr: float | None = _option("min_lr", "Where cosine ends; step's floor.", _O),
        clip_grad_norm: float | None = _option("clip_grad_norm", "Clip the global gradient norm to X (0: off).",
                                                  _O, metavar="X"),
        accumulate: int | None = _option("accumulate", "Micro-batches per optimizer step.", _O),
        compile: bool | None = _option("compile", "torch.compile the model (compile time: time/compile_s).", _O,
                                          "--compile/--no-compile"),
        channels_last: bool | None = _option("channels_last", "Channels-last memory format (model and inputs).",
                                                _O, "--channels-last/--no-channels-last"),
        seed: int | None = _option("seed", "Seed for data, init and order.", _O),
        workers: int | None = _option("workers", "DataLoader worker processes.", _O,
                                         envvar=env("RUNNER_WORKERS")),
        worker_start_method: str | None = _option("worker_start_method", "How DataLoader workers start.", _O,
                                                     choices=config_io.START_METHODS),
        device: str | None = _option("device", "auto: CUDA when available.", _O, choices=config_io.DEVICES,
                                        envvar=env("RUNNER_DEVICE")),
        strategy: str | None = _option("strategy", "One device, nn.DataParallel, or DDP through torchrun.", _D,
                                          choices=config_io.STRATEGIES),
        gpus: str | None = _option("gpus", "dp: GPU ids, e.g. 0,1.", _D, default="all visible", metavar="IDS"),
        nproc: int | None = _option("nproc", "ddp: processes per node.", _D),
        nnodes: str | None = _option("nnodes", "ddp: torchrun --nnodes.", _D, metavar="N|MIN:MAX"),
        node_rank: int | None = _option("node_rank", "ddp: torchrun --node-rank.", _D),
        rdzv_endpoint: str | None = _option("rdzv_endpoint", "ddp: torchrun --rdzv-endpoint.", _D,
                                               default="none (one node)", metavar="HOST:PORT"),
        rdzv_id: str | None = _option("rdzv_id", "ddp: torchrun --rdzv-id.", _D, default="the run name",
                                         metavar="ID"),
        max_restarts: int | None = _option("max_restarts", "ddp: torchrun --max-restarts.", _D),
        sync_bn: bool | None = _option("sync_bn", "ddp on CUDA: SyncBatchNorm.", _D, "--sync-bn"),
        collective_timeout: float | None = _option(
            "collective_timeout", "ddp: seconds a collective may wait in steady training before the process group "
            "fails (start-up, the first steps, checkpoints and evaluation get 30 min; never below what the stall "
            "watch needs to report first).", _D, metavar="SECONDS"),
        viz: str | None = _option("viz", "Dashboards to stream to.", _V, choices=config_io.VIZ,
                                     envvar=env("RUNNER_VIZ")),
        experiment: str | None = _option("experiment", "Visdom env group and TensorBoard hparams experiment.",
                                            _V, default="<model>-<data kind>", metavar="NAME"),
        log_every: int | None = _option("log_every", "Scalars every N steps.", _V),
        images_every: int | None = _option("images_every", "Image grid every N steps.", _V),
        hist_every: int | None = _option("hist_every", "Histograms every N steps.", _V),
        memory_every: int | None = _option("memory_every", "Memory sample every N steps.", _V),
        system_every: float | None = _option("system_every", "Seconds between NVML/psutil samples.", _V),
        graph: bool | None = _option("graph", "Log the model graph once.", _V, "--graph/--no-graph"),
        visdom_url: str | None = _option("visdom_url", "Visdom server.", _V, envvar=env("RUNNER_VISDOM_URL"),
                                            default="local, started if down", metavar="URL"),
        visdom_port: int | None = _option("visdom_port", "Port of the local Visdom server.", _V,
                                             envvar=env("RUNNER_VISDOM_PORT")),
        progress: bool | None = _option("progress", "Live progress bar on a terminal (else a line per log "
                                                       "point).", _V, "--progress/--no-progress"),
        flush_secs: float | None = _option("flush_secs", "Every dashboard file, summary.json and findings.json "
                                                            "reach the disk within this many seconds of an event.", _V,
                                              metavar="SECONDS"),
        stall_timeout: str | None = _option("stall_timeout", "Seconds a rank may go without progress before the "
                                                                "supervisor captures every stack and reports a stall "
                                                                "(auto: max(60, 10x the median step); start-up, the "
                                                                "first steps, checkpoints and evaluation get 10x; 0: "
                                                                "off).", _V, metavar="auto|SECONDS"),
        on_stall: str | None = _option("on_stall", "After a stall's capture: report (the run stays alive, e.g. for a "
                                                      "debugger) or stop (exit 1).", _V, choices=config_io.ON_STALL),
        run_dir: str | None = _option("run_dir", "Folder of runs.", _R, envvar=env("RUNNER_RUN_DIR"),
                                         metavar="DIR"),
        name: str | None = _option("name", "Run name (folder under --run-dir).", _R,
                                      default="<model>-<data kind>-<time>"),
        resume: str | None = _option("resume", "auto: continue the run's last.pt if any; never; or a PATH.", _R,
                                        metavar="auto|never|PATH"),
        checkpoint_every: int | None = _option("checkpoint_every", "Write last.pt every N steps.", _R),
        on_nan: str | None = _option("on_nan", "On a NaN/inf loss: stop, or skip the step.", _R,
                                        choices=config_io.ON_NAN),
        oom: str | None = _option("oom", "On out-of-memory: stop, or retry with half the batch.", _R,
                                     choices=config_io.ON_OOM),
        memory_snapshot: bool | None = _option("memory_snapshot", "CUDA: record allocator history for the OOM "
                                                                     "post-mortem.", _R, "--memory-snapshot"),
        profile: str | None = _option("profile", "torch.profiler over steps START:STOP (trace in "
                                                    "<run>/profile/).", _R, default="off", metavar="START:STOP"),
        debug: bool | None = _option("debug", "Show tracebacks.", _R, "--debug"),
    ) -> None:
        """Train a model, streaming scalars, images, histograms, the graph and memory to the dashboards."""
        overrides = {key: value for key, value in ctx.params.items() if key not in ("config", "print_config")}

        def body() -> int:
            cfg = config_io.resolve(config, overrides)
            if print_config:
                sys.stdout.write(config_io.dumps(cfg))
                return 0
            log_to_stderr()
            return action(cfg)

        run_command(body, debug=bool(debug))

    return train


class _StderrHandler(logging.Handler):
    """Writes to whatever sys.stderr is at the time (the CLI's, or a test runner's capture)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr, flush=True)


def log_to_stderr() -> None:
    """The runner's INFO messages (`runner: ...`) go to stderr; set up once per process."""
    logger = logging.getLogger("runner")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("runner: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
