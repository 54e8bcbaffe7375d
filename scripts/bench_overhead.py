"""What observability costs the training step: runner's event stream against a bare PyTorch loop.

Not a test: run `python scripts/bench_overhead.py` (or `make bench`) and read the markdown table.

Workload, the same for every row: Tiny-UNet denoising synthetic 64×64 images (runner's synthetic
set), batch 8, 200 steps, Adam, CPU, `torch.set_num_threads(2)`, DataLoader in the main process.
Cadence where a row observes: scalars every step, memory every step, weight and gradient
histograms and an image grid every 50 steps (and at step 1), the model graph once. Every runner row
also has the sinks every run gets whatever --viz says: the console and the diagnosis (the rules,
findings.json, summary.json).

Every row runs in this process: imports, process start-up and set-up (building the model and data
set, tracing the model graph) are not measured. Measured: from the first step to the last event on disk
— for runner, `Trainer.fit`
(which includes the final checkpoint) plus closing the hub (draining every sink); for the bare loops,
the loop plus closing the writer. `loop` is `fit` alone. Repetitions alternate between the rows; a
row's ratio is the median over repetitions of its time divided by the bare loop's time in the same
repetition.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from runner.config import resolve
from runner.data import SyntheticDenoise
from runner.models import UNet
from runner.telemetry import tags

STEPS, BATCH, SIZE, SAMPLES, EVERY = 200, 8, 64, 512, 50


@dataclass
class Timing:
    total: float  # first step → everything on disk
    loop: float  # first step → last step (runner: Trainer.fit)
    cpu: float  # CPU seconds of the whole process (every thread) over `total`
    dropped: int = 0


@dataclass
class Row:
    name: str
    run: Callable[[Path], Timing]
    times: list[Timing] = field(default_factory=list)


# --- the bare loops --------------------------------------------------------------------------

def _psnr(output: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    mse = (output.detach().clamp(0, 1) - clean).pow(2).flatten(1).mean(dim=1).clamp_min(1e-10)
    return (-10.0 / math.log(10.0) * torch.log(mse)).mean()


def bare(run_dir: Path | None, steps: int | None = None) -> Timing:
    """The plain loop; with `run_dir`, it also writes the same observations to TensorBoard synchronously."""
    steps = steps or STEPS
    torch.manual_seed(0)
    data = SyntheticDenoise(SAMPLES, 3, SIZE, 0.2, seed=0)
    loader = DataLoader(data, batch_size=BATCH, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(0))
    model = UNet(3, (16, 32, 64, 128))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    writer = None
    if run_dir is not None:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(run_dir))
    process = psutil.Process()
    if writer is not None:  # set-up, as runner traces while building its trainer
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            writer.add_graph(model, torch.rand(2, 3, SIZE, SIZE), use_strict_trace=False)
    start, cpu = time.perf_counter(), time.process_time()
    step = 0
    while step < steps:
        waited = time.perf_counter()
        for noisy, clean in loader:
            began = time.perf_counter()
            output = model(noisy)
            loss = F.mse_loss(output, clean)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if writer is not None:
                from torchvision.utils import make_grid

                took = time.perf_counter() - began
                writer.add_scalar(tags.LOSS, loss.item(), step)
                writer.add_scalar(tags.train("psnr"), _psnr(output, clean).item(), step)
                writer.add_scalar(tags.LR, optimizer.param_groups[0]["lr"], step)
                writer.add_scalar(tags.SAMPLES_PER_S, BATCH / took, step)
                writer.add_scalar(tags.STEP_MS, 1000 * took, step)
                writer.add_scalar(tags.DATA_WAIT_MS, 1000 * (began - waited), step)
                writer.add_scalar(tags.reading("rss"), process.memory_info().rss, step)
                writer.add_scalar(tags.reading("cpu_percent"), process.cpu_percent(None), step)
                if step % EVERY == 0 or step == 1:
                    for name, param in model.named_parameters():
                        writer.add_histogram(tags.weights(name), param, step)
                        writer.add_histogram(tags.grads(name), param.grad, step)
                    rows = [noisy[:8], output[:8].detach().clamp(0, 1), clean[:8]]
                    writer.add_image(tags.IMAGES_SAMPLES, make_grid(torch.cat(rows), nrow=8), step)
            if step >= steps:
                break
            waited = time.perf_counter()
    loop = time.perf_counter() - start
    if writer is not None:
        writer.close()
    return Timing(time.perf_counter() - start, loop, time.process_time() - cpu)


# --- runner, in-process ----------------------------------------------------------------------

def runner_config(run_dir: Path, viz: str, visdom_url: str = "") -> object:
    steps = STEPS
    return resolve(None, dict(
        model="tinyunet", data="synthetic", image_size=SIZE, samples=SAMPLES, batch_size=BATCH, steps=steps,
        optimizer="adam", lr=1e-3, device="cpu", viz=viz, log_every=1, images_every=EVERY, hist_every=EVERY,
        memory_every=1, graph=True, visdom_url=visdom_url, run_dir=str(run_dir.parent), name=run_dir.name,
        resume="never", checkpoint_every=10 * steps, progress=False))


def run_runner(run_dir: Path, viz: str, visdom_url: str = "", close_timeout: float = 60.0,
               beat: bool = True) -> Timing:
    """Build a trainer and its sinks (not timed), then time `fit` and draining the hub. With `beat`, as in
    every `runner train`, the rank's heartbeat is published at each phase boundary (the stall watch's input)."""
    from runner.procs import heartbeat
    from runner.telemetry.hub import Hub
    from runner.train.loop import Trainer
    from runner.train.sinks import build_sinks
    from runner.train.strategy import make_strategy

    cfg = runner_config(run_dir, viz, visdom_url=visdom_url)
    run_dir.mkdir(parents=True, exist_ok=True)
    if beat:
        heartbeat.install(f"bench-{os.getpid()}", 0, 1)
    trainer = Trainer(cfg, make_strategy(cfg))
    hub = Hub(build_sinks(cfg, trainer.total_steps))  # the console sink's lines go to /dev/null (see main)
    try:
        start, cpu = time.perf_counter(), time.process_time()
        trainer.fit(hub)
        loop = time.perf_counter() - start
        hub.close(timeout=close_timeout)
        return Timing(time.perf_counter() - start, loop, time.process_time() - cpu, hub.dropped)
    finally:
        hub.close(timeout=0)
        trainer.close()
        heartbeat.uninstall()


def own_loop(run_dir: Path) -> Timing:
    """The bare loop under runner.observe (scripts/bench_own_loop.py)."""
    from bench_own_loop import observed

    return Timing(*observed(run_dir, STEPS, BATCH, SIZE, SAMPLES, EVERY))


# --- Visdom: a real server, and one that accepts and never answers --------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def visdom_server(workdir: Path):
    """`python -m visdom.server` on a free local port; yields its URL, or None if it did not come up."""
    port = free_port()
    env_path = workdir / "visdom-env"
    env_path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-m", "visdom.server", "-port", str(port), "-bind_local",
                             "-env_path", str(env_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            if proc.poll() is not None:
                break
            try:
                urllib.request.urlopen(url, timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        yield url if proc.poll() is None else None
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def hung_server():
    """A socket that accepts connections and never answers them; yields its URL."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        listener.close()


def with_deadline(run: Callable[[Path], Timing], seconds: float) -> Callable[[Path], Timing]:
    """Run in a daemon thread; a row that is still stuck after `seconds` raises TimeoutError."""
    def guarded(run_dir: Path) -> Timing:
        box: list[Timing | BaseException] = []
        thread = threading.Thread(target=lambda: box.append(_call(run, run_dir)), daemon=True)
        thread.start()
        thread.join(seconds)
        if not box:
            raise TimeoutError(f"still running after {seconds:.0f} s")
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]
    return guarded


def _call(run: Callable[[Path], Timing], run_dir: Path) -> Timing | BaseException:
    try:
        return run(run_dir)
    except BaseException as exc:
        return exc


# --- the peers (only when the `bench` extra is installed) -----------------------------------

def _peer_loader() -> DataLoader:
    data = SyntheticDenoise(SAMPLES, 3, SIZE, 0.2, seed=0)
    return DataLoader(data, batch_size=BATCH, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0))


def lightning(run_dir: Path) -> Timing:
    """TensorBoardLogger(log_graph), DeviceStatsMonitor, scalars every step, histograms and images every 50."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import DeviceStatsMonitor
    from pytorch_lightning.loggers import TensorBoardLogger
    from torchvision.utils import make_grid

    class Denoiser(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = UNet(3, (16, 32, 64, 128))
            self.example_input_array = torch.rand(2, 3, SIZE, SIZE)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x)

        def training_step(self, batch: list[torch.Tensor], _index: int) -> torch.Tensor:
            noisy, clean = batch
            output = self(noisy)
            loss = F.mse_loss(output, clean)
            self.log(tags.LOSS, loss, on_step=True)
            self.log(tags.train("psnr"), _psnr(output, clean), on_step=True)
            step = self.global_step + 1
            if step % EVERY == 0 or step == 1:
                rows = [noisy[:8], output[:8].detach().clamp(0, 1), clean[:8]]
                self.logger.experiment.add_image(tags.IMAGES_SAMPLES, make_grid(torch.cat(rows), nrow=8), step)
            return loss

        def on_before_optimizer_step(self, _optimizer: torch.optim.Optimizer) -> None:
            step = self.global_step + 1
            if step % EVERY == 0 or step == 1:
                for name, param in self.named_parameters():
                    self.logger.experiment.add_histogram(tags.weights(name), param, step)
                    self.logger.experiment.add_histogram(tags.grads(name), param.grad, step)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    torch.manual_seed(0)
    module, loader = Denoiser(), _peer_loader()
    trainer = pl.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, log_every_n_steps=1,
                         logger=TensorBoardLogger(str(run_dir), name="lightning", log_graph=True),
                         callbacks=[DeviceStatsMonitor()], enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    start, cpu = time.perf_counter(), time.process_time()
    trainer.fit(module, loader)
    loop = time.perf_counter() - start
    trainer.logger.experiment.close()
    return Timing(time.perf_counter() - start, loop, time.process_time() - cpu)


def ignite(run_dir: Path) -> Timing:
    """TensorboardLogger: OutputHandler every step, WeightsHistHandler and GradsHistHandler every 50 steps."""
    from ignite.engine import Engine, Events

    try:
        from ignite.handlers.tensorboard_logger import (
            GradsHistHandler,
            OutputHandler,
            TensorboardLogger,
            WeightsHistHandler,
        )
    except ImportError:  # ignite < 0.5
        from ignite.contrib.handlers.tensorboard_logger import (
            GradsHistHandler,
            OutputHandler,
            TensorboardLogger,
            WeightsHistHandler,
        )

    torch.manual_seed(0)
    model, loader = UNet(3, (16, 32, 64, 128)), _peer_loader()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def update(_engine: Engine, batch: list[torch.Tensor]) -> dict[str, float]:
        noisy, clean = batch
        output = model(noisy)
        loss = F.mse_loss(output, clean)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"loss": loss.item(), "psnr": _psnr(output, clean).item()}

    engine = Engine(update)
    logger = TensorboardLogger(log_dir=str(run_dir))
    logger.attach(engine, log_handler=OutputHandler(tag=tags.TRAIN.removesuffix("/"), output_transform=lambda out: out),
                  event_name=Events.ITERATION_COMPLETED)
    every = Events.ITERATION_COMPLETED(every=EVERY) | Events.ITERATION_COMPLETED(once=1)
    logger.attach(engine, log_handler=WeightsHistHandler(model), event_name=every)
    logger.attach(engine, log_handler=GradsHistHandler(model), event_name=every)
    engine.add_event_handler(Events.ITERATION_COMPLETED(once=STEPS), lambda e: e.terminate())
    start, cpu = time.perf_counter(), time.process_time()
    engine.run(loader, max_epochs=math.ceil(STEPS / len(loader)))
    loop = time.perf_counter() - start
    logger.close()
    return Timing(time.perf_counter() - start, loop, time.process_time() - cpu)


# --- the table -------------------------------------------------------------------------------

def importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def main() -> None:
    global STEPS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="alternating repetitions (default 5)")
    parser.add_argument("--steps", type=int, default=STEPS,
                        help=f"steps per run (default {STEPS}; fewer: a smoke test)")
    args = parser.parse_args()
    STEPS = args.steps
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore", message=".*dp: .*")
    notes: list[str] = []
    workdir = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    os.environ["XDG_STATE_HOME"] = str(workdir / "state")  # the heartbeats' run registry: gone with the workdir
    with contextlib.ExitStack() as stack:
        stack.enter_context(contextlib.redirect_stderr(stack.enter_context(open(os.devnull, "w"))))
        rows = [Row("bare PyTorch loop", lambda d: bare(None)),
                Row("runner --viz none", lambda d: run_runner(d, "none")),
                Row("runner --viz none, no heartbeat", lambda d: run_runner(d, "none", beat=False)),
                Row("runner --viz tensorboard", lambda d: run_runner(d, "tensorboard")),
                Row("own loop + runner.observe (tensorboard)", own_loop),
                Row("bare loop + TensorBoard, synchronous", bare)]
        if importable("dashboards.visdom"):
            url = stack.enter_context(visdom_server(workdir))
            hung = stack.enter_context(hung_server())
            if url is None:
                notes.append("Visdom rows skipped: `python -m visdom.server` did not come up "
                             "(static assets missing? run `runner dashboards install-assets`).")
            else:
                rows += [Row("runner --viz visdom", lambda d: run_runner(d, "visdom", url)),
                         Row("runner --viz both", lambda d: run_runner(d, "both", url))]
            rows.append(Row("runner --viz visdom, hung server", with_deadline(
                lambda d: run_runner(d, "visdom", hung, close_timeout=5.0), 600)))
        else:
            notes.append("Visdom rows skipped: dashboards.visdom (VisdomSink) is not importable yet.")
        if importable("pytorch_lightning"):
            rows.append(Row("PyTorch Lightning (TensorBoardLogger, DeviceStatsMonitor)", lightning))
        else:
            notes.append("Lightning row skipped: pytorch-lightning is not installed (`pip install .[bench]`).")
        if importable("ignite"):
            rows.append(Row("PyTorch-Ignite (TensorboardLogger)", ignite))
        else:
            notes.append("Ignite row skipped: pytorch-ignite is not installed (`pip install .[bench]`).")

        bare(None, steps=10)  # warm-up: allocator, thread pool, first-call costs
        failed: dict[str, str] = {}
        for rep in range(args.repeats):
            turn = rows[rep % len(rows):] + rows[:rep % len(rows)]
            for row in turn:
                if row.name in failed:
                    continue
                run_dir = workdir / f"{row.name.split()[0]}-{rep}-{len(row.times)}-{os.getpid()}"
                try:
                    row.times.append(row.run(run_dir))
                except Exception as exc:
                    failed[row.name] = f"{type(exc).__name__}: {exc}"
                shutil.rmtree(run_dir, ignore_errors=True)
            print(f"repetition {rep + 1}/{args.repeats} done", file=sys.__stderr__, flush=True)
    shutil.rmtree(workdir, ignore_errors=True)
    print_table(rows, failed, notes, args.repeats)


def print_table(rows: list[Row], failed: dict[str, str], notes: list[str], repeats: int) -> None:
    base = rows[0].times
    print(f"\nTiny-UNet, synthetic {SIZE}×{SIZE}, batch {BATCH}, {STEPS} steps, Adam, CPU, "
          f"{torch.get_num_threads()} threads; median of {repeats} alternating repetitions; in-process "
          "(start-up, imports and set-up — model, data, graph trace — not measured).\n")
    print("| way | median time (s) | ratio | best time (s) | ratio (best) | ratio (loop only) | ratio (CPU) | "
          "dropped events |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    best_base = min(t.total for t in base)
    for row in rows:
        if row.name in failed or len(row.times) != len(base):
            print(f"| {row.name} | failed: {failed.get(row.name, 'incomplete')} | | | | | | |")
            continue
        ratio = statistics.median(t.total / b.total for t, b in zip(row.times, base, strict=True))
        loop_ratio = statistics.median(t.loop / b.loop for t, b in zip(row.times, base, strict=True))
        cpu_ratio = statistics.median(t.cpu / b.cpu for t, b in zip(row.times, base, strict=True))
        best = min(t.total for t in row.times)
        print(f"| {row.name} | {statistics.median(t.total for t in row.times):.2f} | {ratio:.3f}× | {best:.2f} | "
              f"{best / best_base:.3f}× | {loop_ratio:.3f}× | {cpu_ratio:.3f}× | {max(t.dropped for t in row.times)} |")
    print("\ntime: first step → everything on disk (runner: Trainer.fit incl. its final checkpoint, then "
          "Hub.close draining the sinks; bare: the loop, then SummaryWriter.close). ratio: median over repetitions "
          "of the row's time / the bare loop's time in the same repetition. best: the fastest repetition (other "
          "processes only ever slow a run down, so on a shared machine this is the steadier figure). loop only: "
          "without the drain/close. CPU: process CPU time, all threads.")
    for note in notes:
        print(f"\n{note}")


if __name__ == "__main__":
    main()
