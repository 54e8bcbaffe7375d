"""DataParallel and DDP: the torchrun command, run names every rank agrees on, DDP == one process
with the ranks' batches together, dp checkpoints, multi-node, elastic restarts, per-rank memory and
time on the dashboards (4 ranks), save-then-load and teardown on every exit path, a failing rank,
and how a rank process ends. Real torchrun, gloo, CPU.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch.utils.data.distributed import DistributedSampler

from runner.config import TrainConfig, default_name, resolve
from runner.data import EpochSampler, ResumableDistributedSampler
from runner.errors import RunnerError
from runner.launch import _check_distribution, torchrun_command
from runner.models import build_model
from runner.train import checkpoint
from tests.support.ddp import DUMP_DIR, KILL_RANK, KILL_STEP, RAISE_STEP
from tests.support.runs import ROOT, TINY, child_pythonpath, run_runner
from tests.support.visdom_server import VisdomServer

FAST = ["--image-size", "8", "--samples", "32", "--no-progress", "--device", "cpu"]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=child_pythonpath(), **extra)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        env.pop(name, None)
    return env


def _torchrun(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The user's own plain `torchrun --nproc_per_node=2 ARGS` (as `python -m torch.distributed.run`)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(**(env or {})), timeout=180, cwd=ROOT)


def _free_port() -> int:
    """A free port below the kernel's ephemeral range (32768+): one found free with port 0 is a port any
    outgoing connection on the machine may take before the rendezvous binds it, seconds later."""
    for port in range(29600, 29700):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port in 29600-29699")


def _params(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, weights_only=True)
    return state.get("model", state)


def _events(run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    return acc


# --- launching -------------------------------------------------------------------------------

def test_torchrun_command_one_node_and_many() -> None:
    one = resolve(None, {"strategy": "ddp", "nproc": 4, "max_restarts": 2, "name": "r"})
    cmd = torchrun_command(one, Path("runs/r/config.toml"))
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    assert {"--nproc-per-node=4", "--nnodes=1", "--max-restarts=2", "--standalone"} <= set(cmd)
    assert cmd[-4:] == ["-m", "runner.train", "--config", "runs/r/config.toml"]

    many = resolve(None, {"strategy": "ddp", "nnodes": "2", "node_rank": 1, "rdzv_endpoint": "10.0.0.1:29400",
                          "name": "r"})
    cmd = torchrun_command(many, Path("c.toml"))
    assert {"--nnodes=2", "--node-rank=1", "--rdzv-backend=c10d", "--rdzv-endpoint=10.0.0.1:29400",
            "--rdzv-id=r"} <= set(cmd)
    assert "--standalone" not in cmd


@pytest.mark.parametrize(("overrides", "message"), [
    ({"nproc": 2}, "--nproc applies to --strategy ddp only"),
    ({"strategy": "dp", "max_restarts": 1, "sync_bn": True}, "--max-restarts, --sync-bn apply"),
    ({"strategy": "ddp", "nnodes": "2", "name": "r"}, "--rdzv-endpoint"),
    ({"strategy": "ddp", "sync_bn": True, "device": "cpu"}, "SyncBatchNorm"),
    ({"strategy": "ddp", "gpus": "0,1"}, "--gpus applies to --strategy dp only"),
])
def test_distribution_flags_that_cannot_work(overrides: dict, message: str) -> None:
    with pytest.raises(RunnerError, match=message) as caught:
        _check_distribution(resolve(None, overrides))
    assert caught.value.code == 2


def test_sync_bn_on_cpu_is_one_line_before_torchrun(tmp_path: Path) -> None:
    out = run_runner("train", "--strategy", "ddp", "--nproc", "2", "--sync-bn", "--model", "cnn", *TINY,
                     "--run-dir", str(tmp_path), "--name", "bn")
    assert out.code == 2
    assert out.stderr.strip() == ("runner: error: --sync-bn needs CUDA: SyncBatchNorm layers only work "
                                  "with GPU modules")


def test_sync_bn_on_cpu_in_a_rank_fails_before_joining(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed as dist

    from runner.train.strategy import make_strategy

    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "TORCHELASTIC_RUN_ID": "x"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(RunnerError, match="SyncBatchNorm layers only work with GPU modules"):
        make_strategy(resolve(None, {"strategy": "ddp", "sync_bn": True, "device": "cpu", "name": "r"}))
    assert not dist.is_initialized()


# --- run names -------------------------------------------------------------------------------

def test_ranks_name_the_run_by_torchruns_run_id(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = TrainConfig(model="mlp")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "3f2a9c1e-5b7d-4e8f-9a0b-1c2d3e4f5a6b")  # --standalone: a uuid
    assert default_name(cfg) == "mlp-synthetic-3f2a9c1e"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-42")  # --rdzv-id job-42
    assert default_name(cfg) == "mlp-synthetic-job-42"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # every launch would share it
    with pytest.raises(RunnerError, match="pass --name"):
        default_name(cfg)


def test_multi_node_name_comes_from_rdzv_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    assert default_name(TrainConfig(model="mlp", nnodes="2", rdzv_id="exp7")) == "mlp-synthetic-exp7"
    with pytest.raises(RunnerError, match="--rdzv-id"):
        default_name(TrainConfig(model="mlp", nnodes="2"))


# --- sampling --------------------------------------------------------------------------------

def test_ranks_batch_k_together_is_the_single_process_batch_k() -> None:
    size, batch, world = 40, 4, 2
    for epoch in (0, 1):
        single = EpochSampler(size, seed=3)
        single.set_epoch(epoch)
        order = list(single)
        ranks = []
        for rank in range(world):
            sampler = DistributedSampler(range(size), num_replicas=world, rank=rank, seed=3, drop_last=True)
            sampler.set_epoch(epoch)
            ranks.append(list(sampler))
        for k in range(size // (batch * world)):
            together = sorted(ranks[0][k * batch:(k + 1) * batch] + ranks[1][k * batch:(k + 1) * batch])
            assert together == sorted(order[k * 2 * batch:(k + 1) * 2 * batch])
    assert order != list(range(size))  # shuffled, and differently per epoch
    single.set_epoch(0)
    assert list(single) != order


def test_distributed_sampler_resumes_mid_epoch() -> None:
    sampler = ResumableDistributedSampler(range(40), num_replicas=2, rank=1, seed=0, drop_last=True)
    sampler.set_epoch(2)
    whole = list(sampler)
    sampler.resume_at(8)
    assert list(sampler) == whole[8:]
    assert list(sampler) == whole  # the skip applies to one pass only


# --- dp --------------------------------------------------------------------------------------

def test_dp_on_cpu_trains_checkpoints_and_resumes_under_single_and_back(tmp_path: Path, cli) -> None:
    common = ["--model", "cnn", "--batch-size", "4", *FAST, "--viz", "none", "--run-dir", str(tmp_path)]
    out = cli("train", *common, "--strategy", "dp", "--name", "dp", "--steps", "4")
    assert out.code == 0, out.stderr
    assert out.stderr.count("DataParallel runs the whole batch on cpu") == 1
    state = checkpoint.load(tmp_path / "dp" / "checkpoints" / "last.pt")
    assert state["step"] == 4
    assert not [k for k in state["model"] if k.startswith("module.")]

    out = cli("train", *common, "--strategy", "single", "--name", "single", "--steps", "6",
              "--resume", str(tmp_path / "dp" / "checkpoints" / "last.pt"))
    assert out.code == 0, out.stderr
    assert "at step 4" in out.stderr
    assert checkpoint.load(tmp_path / "single" / "checkpoints" / "last.pt")["step"] == 6

    out = cli("train", *common, "--strategy", "dp", "--name", "dp2", "--steps", "8",
              "--resume", str(tmp_path / "single" / "checkpoints" / "last.pt"))
    assert out.code == 0, out.stderr
    assert "at step 6" in out.stderr
    assert checkpoint.load(tmp_path / "dp2" / "checkpoints" / "last.pt")["step"] == 8


# --- ddp under real torchrun -----------------------------------------------------------------

@pytest.mark.slow
def test_ddp_equals_one_process_with_the_ranks_batches_together(tmp_path: Path) -> None:
    """2 ranks × batch 4 == 1 process × batch 8 over the same samples (SGD, no BatchNorm), to 1e-5."""
    common = ["train", *FAST, "--optimizer", "sgd", "--lr", "0.5", "--steps", "10", "--viz", "none",
              "--run-dir", str(tmp_path), "--checkpoint-every", "1000"]  # 10 steps: 2.5 epochs of 4 batches
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    ddp = run_runner(*common, "--strategy", "ddp", "--nproc", "2", "--batch-size", "4", "--name", "ddp",
                     "--model", "tests.support.ddp:dumping_mlp", env={DUMP_DIR: str(dumps)})
    assert ddp.code == 0, ddp.stderr
    single = run_runner(*common, "--batch-size", "8", "--name", "single", "--model", "mlp")
    assert single.code == 0, single.stderr

    rank0, rank1 = _params(dumps / "rank0.pt"), _params(dumps / "rank1.pt")
    saved = _params(tmp_path / "ddp" / "checkpoints" / "last.pt")
    reference = _params(tmp_path / "single" / "checkpoints" / "last.pt")
    torch.manual_seed(0)
    initial = build_model("mlp", 3, 8, 10).state_dict()
    for name, value in reference.items():
        assert torch.equal(rank0[name], rank1[name]), name
        assert torch.equal(rank0[name], saved[name]), name
        assert (value - initial[name]).abs().max() > 1e-3, f"{name} did not train"
        torch.testing.assert_close(saved[name], value, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_users_own_torchrun_ranks_agree_on_the_run(tmp_path: Path) -> None:
    out = _torchrun("-m", "runner.train", "--model", "mlp", *TINY, "--steps", "4", "--run-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    runs = list(tmp_path.iterdir())
    assert len(runs) == 1, runs  # no --name: both ranks chose the same folder
    assert runs[0].name.startswith("mlp-synthetic-")
    assert "ddp x2" in out.stderr
    assert checkpoint.load(runs[0] / "checkpoints" / "last.pt")["step"] == 4


@pytest.mark.slow
def test_two_nodes_on_one_machine_form_one_world(tmp_path: Path) -> None:
    endpoint = f"127.0.0.1:{_free_port()}"
    args = [sys.executable, "-m", "runner", "train", "--strategy", "ddp", "--nnodes", "2", "--nproc", "1",
            "--rdzv-endpoint", endpoint, "--model", "mlp", *TINY, "--steps", "4", "--run-dir", str(tmp_path),
            "--name", "two"]
    nodes = [subprocess.Popen([*args, "--node-rank", str(rank)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=_env(), cwd=ROOT) for rank in (0, 1)]
    try:
        deadline = time.monotonic() + 150
        outputs = [node.communicate(timeout=max(1.0, deadline - time.monotonic())) for node in nodes]
    except subprocess.TimeoutExpired:
        for node in nodes:
            node.terminate()  # the supervisor ends its torchrun and ranks
        outputs = [node.communicate(timeout=30) for node in nodes]
        pytest.fail(f"the two nodes did not finish within 150 s: {outputs}")
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.wait()
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert "ddp x2" in outputs[0][1] + outputs[1][1]
    assert checkpoint.load(tmp_path / "two" / "checkpoints" / "last.pt")["step"] == 4


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["runner", "torchrun"])
def test_elastic_restart_resumes_and_logs_each_step_once(tmp_path: Path, launcher: str) -> None:
    """Rank 1 is SIGKILLed in step 13 of the first attempt; torchrun restarts the group, which resumes
    from step 10 (last.pt); the dashboards go on with no step's loss twice and none missing.

    Through `runner train` (torchrun with a fresh rendezvous store per attempt) and through the user's
    own torchrun (the shared store; the ranks keep attempts apart)."""
    args = ["--model", "tests.support.ddp:dying_mlp", "--image-size", "8", "--batch-size", "4", "--samples", "64",
            "--steps", "20", "--log-every", "5", "--checkpoint-every", "5", "--no-progress",
            "--run-dir", str(tmp_path), "--name", "elastic"]
    kill = {KILL_STEP: "13", KILL_RANK: "1"}
    if launcher == "runner":
        out = run_runner("train", "--strategy", "ddp", "--nproc", "2", "--max-restarts", "1", *args, env=kill)
        code, stderr = out.code, out.stderr
    else:
        done = _torchrun("--max-restarts=1", "-m", "runner.train", *args, env=kill)
        code, stderr = done.returncode, done.stderr
    assert code == 0, stderr
    run = tmp_path / "elastic"
    assert "resumed from" in stderr and "at step 10" in stderr
    assert len(list(run.glob("events.out.tfevents.*"))) == 2  # one per attempt, each by its rank 0
    assert [e.step for e in _events(run).Scalars("train/loss")] == [5, 10, 15, 20]
    assert checkpoint.load(run / "checkpoints" / "last.pt")["step"] == 20


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, VisdomServer]]:
    """One run read by two tests: 4 gloo ranks, TensorBoard and Visdom, memory every step, histograms,
    images, the graph. Its Visdom server stays up for the module."""
    tmp = tmp_path_factory.mktemp("four")
    with VisdomServer(tmp / "envs") as server:
        out = run_runner("train", "--strategy", "ddp", "--nproc", "4", "--model", "cnn", "--image-size", "8",
                         "--batch-size", "2", "--samples", "64", "--steps", "6", "--log-every", "3",
                         "--memory-every", "1", "--hist-every", "3", "--images-every", "3", "--graph",
                         "--no-progress", "--device", "cpu", "--viz", "both", "--visdom-url", server.url,
                         "--run-dir", str(tmp), "--name", "four", timeout=300,
                         env={"XDG_STATE_HOME": str(tmp_path_factory.mktemp("state"))})
        assert out.code == 0, out.stderr
        yield tmp / "four", server


@pytest.mark.slow
def test_every_ranks_memory_reaches_rank_0s_event_file(four_ranks: tuple[Path, VisdomServer]) -> None:
    run, _ = four_ranks
    files = list(run.glob("events.out.tfevents.*"))
    assert len(files) == 1, files  # rank 0 alone writes
    events = _events(run)
    for rank in range(4):
        assert [e.step for e in events.Scalars(f"memory/rss/rank{rank}")] == [1, 2, 3, 4, 5, 6]
    low, high = events.Scalars("memory/ranks_rss_min"), events.Scalars("memory/ranks_rss_max")
    assert [e.step for e in low] == [3, 6]
    assert all(0 < lo.value <= hi.value for lo, hi in zip(low, high, strict=True))
    assert [e.step for e in events.Scalars("memory/ranks_rss_skew")] == [3, 6]
    assert [e.step for e in events.Scalars("train/loss")] == [3, 6]


@pytest.mark.slow
def test_four_ranks_with_every_stream_on(four_ranks: tuple[Path, VisdomServer]) -> None:
    """4 gloo ranks, every stream on: it finishes, and rank 0's dashboards show every rank's memory (each
    step) and step time (each log point)."""
    from visdom import Visdom

    run, server = four_ranks
    envs = [env for env in Visdom(server="http://127.0.0.1", port=server.port, raise_exceptions=True).get_env_list()
            if env.endswith("four")]
    assert len(envs) == 1, envs
    assert len(server.windows(envs[0])) > 5  # scalars, memory, images, histograms, text
    events = _events(run)
    tags = set(events.Tags()["scalars"])
    for rank in range(4):
        assert [e.step for e in events.Scalars(f"time/step_ms/rank{rank}")] == [3, 6], sorted(tags)
    assert [e.step for e in events.Scalars("train/loss")] == [3, 6]


@pytest.mark.slow
def test_a_stop_signal_stops_every_rank_after_the_same_step(tmp_path: Path) -> None:
    """Ctrl+C reaches the ranks between different steps; they agree at the next log point, stop
    there together, checkpoint it and exit 130 (no rank left waiting in a collective)."""
    run = tmp_path / "stop"
    cmd = [sys.executable, "-m", "runner", "train", "--strategy", "ddp", "--nproc", "2", "--model", "mlp", *TINY,
           "--steps", "100000", "--log-every", "20", "--checkpoint-every", "20", "--run-dir", str(tmp_path),
           "--name", "stop"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoints" / "last.pt").is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr
    step = checkpoint.load(run / "checkpoints" / "last.pt")["step"]
    assert step % 20 == 0 and f"stopped by SIGINT at step {step}" in stderr


@pytest.mark.slow
def test_every_rank_loads_the_checkpoint_rank_0_just_saved(tmp_path: Path) -> None:
    out = _torchrun("-m", "tests.support.ddp", "save_then_load", str(tmp_path))
    assert out.returncode == 0, out.stderr
    results = [json.loads((tmp_path / f"save_then_load.rank{rank}.json").read_text()) for rank in (0, 1)]
    assert results == [{"loads": 20, "concurrent_reads": None, "torn": []},
                       {"loads": 20, "concurrent_reads": True, "torn": []}]


@pytest.mark.slow
def test_a_failing_ddp_run_destroys_its_process_group(tmp_path: Path) -> None:
    out = _torchrun("-m", "tests.support.ddp", "teardown", str(tmp_path))
    assert out.returncode == 0, out.stderr
    for rank in (0, 1):
        result = json.loads((tmp_path / f"teardown.rank{rank}.json").read_text())
        assert "NaN" in result["error"]
        assert result["initialized_after"] is False


@pytest.mark.slow
def test_a_failing_rank_takes_the_run_down_with_one_line(tmp_path: Path) -> None:
    """Rank 1 raises in step 3 while rank 0 waits for it in that step's collective: the run ends
    promptly (no torchrun report, no rank left waiting) and its last line says which rank failed and why."""
    out = run_runner("train", "--strategy", "ddp", "--nproc", "2", "--model", "tests.support.ddp:raising_mlp", *FAST,
                     "--batch-size", "4", "--steps", "20", "--viz", "none", "--run-dir", str(tmp_path),
                     "--name", "fails", env={RAISE_STEP: "3"}, timeout=120)
    assert out.code == 1, out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        "runner: error: rank 1 failed: RuntimeError: boom in step 3 (the other ranks were ended)")
    assert "ChildFailedError" not in out.stderr and "SIGABRT" not in out.stderr


RANK_EXIT_PROGRAM = """
import atexit, sys
from pathlib import Path
from runner.procs import rank_exit
out = Path(sys.argv[1])
atexit.register(lambda: out.joinpath("before").write_text("ran"))  # registered before arm(): skipped
rank_exit.arm()
atexit.register(lambda: out.joinpath("after").write_text("ran"))  # the user's handler: runs
with rank_exit.exit_code_noted():
    print("flushed at exit", end="")
    {body}
"""


@pytest.mark.parametrize(("body", "code"), [("pass", 0), ("sys.exit(3)", 3), ("sys.exit('bad')", 1),
                                            ("raise ValueError('x')", 1)])
def test_a_rank_ends_after_later_atexit_handlers_without_finalizing(tmp_path: Path, body: str, code: int) -> None:
    """rank_exit: the exit code the entry point would have had, handlers registered after arm() run,
    output is flushed, and interpreter finalization (where gloo's threads abort the process) is skipped."""
    program = RANK_EXIT_PROGRAM.format(body=body)
    done = subprocess.run([sys.executable, "-c", program, str(tmp_path)], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert done.returncode == code, done.stderr
    assert done.stdout == "flushed at exit"
    assert (tmp_path / "after").is_file() and not (tmp_path / "before").exists()


# --- CUDA (skipped without a GPU) ------------------------------------------------------------

@pytest.mark.gpu
def test_sync_bn_on_cuda_converts_batchnorm(tmp_path: Path) -> None:
    out = run_runner("train", "--strategy", "ddp", "--nproc", "1", "--sync-bn", "--device", "cuda", "--model", "cnn",
                     "--image-size", "16", "--batch-size", "4", "--samples", "32", "--steps", "4", "--no-progress",
                     "--viz", "tensorboard", "--run-dir", str(tmp_path), "--name", "bn")
    assert out.code == 0, out.stderr
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "bn"), size_guidance={"tensors": 0})
    events.Reload()
    layer_table = events.Tensors("model/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "SyncBatchNorm" in layer_table


@pytest.mark.gpu
def test_dp_on_cuda_checkpoints_without_module_prefix(tmp_path: Path, cli) -> None:
    out = cli("train", "--strategy", "dp", "--device", "cuda", "--model", "cnn", "--batch-size", "8", *FAST[:4],
              "--no-progress", "--viz", "none", "--steps", "3", "--run-dir", str(tmp_path), "--name", "dp")
    assert out.code == 0, out.stderr
    state = checkpoint.load(tmp_path / "dp" / "checkpoints" / "last.pt")
    assert state["step"] == 3 and not [k for k in state["model"] if k.startswith("module.")]
