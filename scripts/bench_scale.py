"""Long-run scale benchmark: a synthetic event stream through the real hub and real sinks.

Each step emits `--tags` scalars and a memory sample; every `--every` steps, weight and gradient
histograms of `--params` tensors and an image grid (the trainer's default cadence). Scenarios, each in a
fresh process so that its RSS is its own:

  bare         a hub without sinks: the cost of making and emitting the events (the baseline)
  tensorboard  the TensorBoard sink
  visdom       the Visdom sink, against a real Visdom server this script starts on 127.0.0.1
  visdom-hung  the Visdom sink, against a socket that accepts and never answers
  all          TensorBoard, Visdom and the hung Visdom in one hub (what a run with a dead dashboard sees)

Prints a markdown table: events/s accepted (emit on the "training" thread), events/s drained per sink,
delivered/offered, drain time after the feed, peak RSS and its growth, on-disk sizes.

As fast as it goes, the feed is a Python loop that only makes events: it and the sinks share one GIL,
so a sink drains what the feed leaves it, and whatever a sink's queue cannot hold is coalesced (the
"delivered" column). A training step spends most of its time in torch, without the GIL: `--step-rate`
paces the feed like one.

    .venv/bin/python scripts/bench_scale.py --steps 20000                   # quick, ~1 min on 2 cores
    .venv/bin/python scripts/bench_scale.py --steps 20000 --step-rate 2000  # paced as a fast training loop
    .venv/bin/python scripts/bench_scale.py                                 # 1,000,000 steps
    .venv/bin/python scripts/bench_scale.py --steps 2000 --params 2000      # a 2,000-tensor model's histograms

The histograms of a step share one stacked copy, as the trainer's do (runner/probes/tensor_stats.py):
the hub counts them as one pending heavy event, so none is dropped whatever `--params`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runner.telemetry.events import Event, Histogram, ImageGrid, MemorySample, Scalar, Sink
from runner.telemetry.hub import Hub
from runner.telemetry.tags import BACKLOG, IMAGES_SAMPLES, MEMORY_SAMPLE, grads, train, weights

SCENARIOS = ("bare", "tensorboard", "visdom", "visdom-hung", "all")
MIB = float(1 << 20)


class Counted(Sink):
    """A sink as it is, plus how many events it wrote and when the last one was written."""

    def __init__(self, name: str, inner: Sink) -> None:
        self.name, self.inner = name, inner
        self.accepts, self.queue_limit = inner.accepts, inner.queue_limit
        self.written, self.last = 0, 0.0

    def write(self, event: Event) -> None:
        self.inner.write(event)
        self.written += 1
        self.last = time.perf_counter()

    def flush(self) -> None:
        self.inner.flush()

    def close(self) -> None:
        self.inner.close()

    def unreachable_for(self) -> float:
        return self.inner.unreachable_for()


class PeakRss:
    """Samples this process's RSS every 50 ms on a thread; `peak` is the largest seen."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.start = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self.process.memory_info().rss)


def build_sinks(scenario: str, out: Path, visdom_url: str, hung_url: str) -> list[Counted]:
    from dashboards.tensorboard import TensorBoardSink
    from dashboards.visdom import VisdomSink

    def visdom(name: str, url: str) -> Counted:
        env = f"bench_{scenario}_{name}".replace("-", "_")
        return Counted(name, VisdomSink(url, env, out / name / "visdom.log"))

    sinks = []
    if scenario in ("tensorboard", "all"):
        sinks.append(Counted("tensorboard", TensorBoardSink(out / "tensorboard")))
    if scenario in ("visdom", "all"):
        sinks.append(visdom("visdom", visdom_url))
    if scenario in ("visdom-hung", "all"):
        sinks.append(visdom("visdom-hung", hung_url))
    return sinks


def feed(hub: Hub, steps: int, tags: int, every: int, params: int, step_rate: float = 0.0) -> int:
    """The synthetic stream, at most `step_rate` steps a second (0: as fast as it goes); returns the number
    of events emitted."""
    names = [train(f"s{i}") for i in range(tags)]
    hist_names = [kind(f"layer{i}.weight") for i in range(params) for kind in (weights, grads)]
    rows = np.concatenate([np.tile([-1.0, 1.0, 4096.0, 0.0, 1365.0], (len(hist_names), 1)),
                           np.full((len(hist_names), 64), 64.0)], axis=1)
    yy, xx = np.mgrid[0:66, 0:130] / 130.0
    picture = np.stack([yy, xx, (yy + xx) / 2]).astype(np.float32)  # a smooth 3×66×130 grid
    emit, emitted, started = hub.emit, 0, time.perf_counter()
    for step in range(1, steps + 1):
        if step_rate and step % 10 == 0:
            time.sleep(max(0.0, started + step / step_rate - time.perf_counter()))
        for name in names:
            emit(Scalar(tag=name, step=step, value=1.0 / step))
        emit(MemorySample(tag=MEMORY_SAMPLE, step=step, values={"rss": 1e9 + step, "workers_rss": 5e8, "workers": 2.0,
                                                             "cpu_percent": 50.0, "host_available": 2e10}))
        emitted += len(names) + 1
        if step % every == 0:
            for row, name in enumerate(hist_names):
                emit(Histogram(tag=name, step=step, data=rows, row=row))
            emit(ImageGrid(tag=IMAGES_SAMPLES, step=step, image=picture, caption="rows: input | output"))
            emitted += len(hist_names) + 1
    return emitted


def disk_sizes(out: Path, env_path: Path) -> dict[str, int]:
    sizes = {f"{d.name}/visdom.log": (d / "visdom.log").stat().st_size
             for d in out.iterdir() if (d / "visdom.log").is_file()}
    tb = out / "tensorboard"
    if tb.is_dir():
        sizes["tensorboard events"] = sum(f.stat().st_size for f in tb.iterdir())
    for env in env_path.glob(f"bench_{out.name.replace('-', '_')}_*.json"):
        sizes[f"saved env {env.stem.split('_', 2)[-1]}"] = env.stat().st_size
    return sizes


def run_scenario(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out) / args.scenario
    out.mkdir(parents=True, exist_ok=True)
    sinks = build_sinks(args.scenario, out, args.visdom_url, args.hung_url)
    rss = PeakRss()
    hub = Hub(list(sinks))
    started = time.perf_counter()
    emitted = feed(hub, args.steps, args.tags, args.every, args.params, args.step_rate)
    fed = time.perf_counter()
    rss_fed = psutil.Process().memory_info().rss
    health = hub.health()
    closed = hub.close(timeout=args.close_timeout)
    ended = time.perf_counter()
    peak = rss.stop()
    return {
        "scenario": args.scenario, "events": emitted, "feed_s": fed - started, "close_s": ended - fed,
        "closed": closed, "backlog_at_feed_end": health[BACKLOG], "dropped": hub.dropped,
        "rss_start": rss.start, "rss_fed": rss_fed, "rss_peak": peak,
        "sinks": [{"name": s.name, "written": s.written, "drained_s": (s.last or ended) - started} for s in sinks],
        "disk": disk_sizes(out, Path(args.env_path)),
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def silent_server() -> tuple[socket.socket, list[socket.socket]]:
    """A TCP server that accepts every connection and never answers (a hung dashboard)."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    return server, held


def start_visdom(env_path: Path) -> tuple[subprocess.Popen, str]:
    from dashboards import servers

    port = free_port()
    cmd = servers.visdom_command(port, "127.0.0.1", env_path, "", False)
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while not servers.answers(url + "/", timeout=1.0):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"the Visdom server did not start ({' '.join(cmd)})")
        time.sleep(0.2)
    return proc, url


def table(results: list[dict[str, Any]]) -> str:
    bare = next((r["feed_s"] for r in results if r["scenario"] == "bare"), None)
    lines = ["| scenario | events | accepted ev/s | feed × bare | sink | drained ev/s | delivered | drain after feed s "
             "| peak RSS MiB | RSS growth MiB | on disk |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in results:
        disk = ", ".join(f"{k} {v / MIB:.1f} MiB" for k, v in sorted(r["disk"].items())) or "-"
        head = (f"| {r['scenario']} | {r['events']:,} | {r['events'] / r['feed_s']:,.0f} | "
                + (f"{r['feed_s'] / bare:.2f}" if bare else "-"))
        tail = (f"{r['rss_peak'] / MIB:.0f} | {(r['rss_peak'] - r['rss_start']) / MIB:.0f} | {disk} |"
                + ("" if r["closed"] else " (close gave up)"))
        sinks = r["sinks"] or [{"name": "-", "written": 0, "drained_s": 0.0}]
        for s in sinks:
            drained = f"{s['written'] / s['drained_s']:,.0f}" if s["written"] else "-"
            delivered = f"{s['written'] / r['events']:.1%}" if s["written"] else "-"
            after = max(0.0, s["drained_s"] - r["feed_s"])
            lines.append(f"{head} | {s['name']} | {drained} | {delivered} | {after:.1f} | {tail}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--tags", type=int, default=20, help="scalar tags per step")
    parser.add_argument("--every", type=int, default=100, help="steps between histograms and image grids")
    parser.add_argument("--params", type=int, default=10, help="parameter tensors (2 histograms each)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, of {', '.join(SCENARIOS)}")
    parser.add_argument("--step-rate", type=float, default=0.0,
                        help="steps a second at most, as a training loop would emit them (0: as fast as it goes)")
    parser.add_argument("--close-timeout", type=float, default=120.0, help="seconds the hub may take to drain at close")
    parser.add_argument("--out", default="", help="folder for the files (default: a temporary one, removed)")
    parser.add_argument("--json", action="store_true", help="also print each scenario's raw numbers")
    parser.add_argument("--scenario", help=argparse.SUPPRESS)  # internal: run one scenario in this process
    parser.add_argument("--visdom-url", default="", help=argparse.SUPPRESS)
    parser.add_argument("--hung-url", default="", help=argparse.SUPPRESS)
    parser.add_argument("--env-path", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.scenario:
        print(json.dumps(run_scenario(args)))
        return
    scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp:
        out = Path(args.out or tmp)
        env_path = out / "visdom_env"
        env_path.mkdir(parents=True, exist_ok=True)
        visdom, url = start_visdom(env_path)
        hung, held = silent_server()
        results = []
        try:
            for scenario in scenarios:
                cmd = [sys.executable, __file__, "--scenario", scenario, "--steps", str(args.steps), "--tags",
                       str(args.tags), "--every", str(args.every), "--params", str(args.params), "--step-rate",
                       str(args.step_rate), "--close-timeout",
                       str(args.close_timeout), "--out", str(out), "--visdom-url", url, "--env-path", str(env_path),
                       "--hung-url", f"http://127.0.0.1:{hung.getsockname()[1]}"]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
                if proc.returncode != 0:
                    raise SystemExit(f"scenario {scenario} failed:\n{proc.stderr[-4000:]}")
                results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(f"{scenario}: done in {results[-1]['feed_s'] + results[-1]['close_s']:.1f} s", file=sys.stderr)
        finally:
            visdom.terminate()
            visdom.wait(10)
            hung.close()
            for conn in held:
                conn.close()
        rate = f"at most {args.step_rate:,.0f} steps/s" if args.step_rate else "as fast as the feed goes"
        print(f"{args.steps:,} steps × ({args.tags} scalars + a memory sample), "
              f"histograms of {args.params} tensors and "
              f"an image grid every {args.every} steps; {rate}\n")
        print(table(results))
        if args.json:
            print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
