"""Python stacks of a live run's processes, every thread, taken from outside (no torch).

Two ways, the first that works per process:
- `py-spy dump` (a PyPI wheel; it attaches with ptrace, which the supervisor may do to its
  descendants, and root to anything): thread names, full file names, JSON out;
- a signal (`DUMP_SIGNAL`, SIGUSR2) that makes the process write its `faulthandler` traceback of every
  thread to a file it registered at start-up (`register`, called by the trainer and by each DataLoader
  worker: `<run's registry folder>/stacks/<pid>-<start>.txt`). faulthandler writes from the signal
  handler itself, without the GIL, so a process stuck in C code answers too. The signal goes only to
  processes whose file exists: to anyone else SIGUSR2 would be fatal.
`RUNNER_STACK_METHOD=faulthandler` (or `py-spy`) forces one way. (A program that installs its own
SIGUSR2 handler later takes the signal back: its stacks then come from py-spy only.)

`capture(...)` returns `Stacks` per process (threads, frames innermost first), `render` prints them
grouped by rank, and `key_frame` picks what a finding names: the innermost frame in the user's code,
else in runner's.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from runner.procs import proc_table, registry
from runner.procs.termination import open_pidfd

DUMP_SIGNAL = signal.SIGUSR2
METHOD_ENV = "RUNNER_STACK_METHOD"
PY_SPY_TIMEOUT = 15.0  # seconds for one `py-spy dump` (it pauses the process while it reads it)
DUMP_WAIT = 3.0  # seconds for faulthandler files to be written after the signal
SETTLE = 0.2  # a dump file that has not grown for this long is complete


def folder_for(run_id: str) -> Path:
    return registry.runs_dir() / run_id / "stacks"


# --- in the process whose stacks are wanted -----------------------------------------------------------

_registered: IO[bytes] | None = None


def register(run_id: str | None, role: str, rank: int | None = None) -> Path | None:
    """Make DUMP_SIGNAL write this process's stacks (all threads) to its own file; None when there is no
    run id or the folder is not writable. A forked DataLoader worker calls it again: it must not write
    into its parent's file."""
    global _registered
    if run_id is None:
        return None
    pid = os.getpid()
    path = folder_for(run_id) / f"{pid}-{proc_table.start_ticks(pid) or 0}.txt"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _forget_the_dead(path.parent)  # each epoch's new workers would otherwise leave one file each
        handle = open(path, "ab", buffering=0)  # noqa: SIM115 (kept open: faulthandler writes to its fd)
        handle.write(f"# runner stacks: pid {pid} role {role} rank {rank if rank is not None else '-'} "
                      f"main 0x{threading.main_thread().ident or 0:016x}\n".encode())
    except OSError:
        return None
    faulthandler.register(DUMP_SIGNAL, file=handle, all_threads=True, chain=False)
    if _registered is not None:
        _registered.close()
    _registered = handle
    return path


def _forget_the_dead(folder: Path) -> None:
    """Remove the dump files of processes that are gone."""
    for path in folder.glob("*-*.txt"):
        pid, _, start = path.stem.partition("-")
        if pid.isdigit() and start.isdigit() and not proc_table.is_running(int(pid), int(start)):
            with contextlib.suppress(OSError):
                path.unlink()


def unregister() -> None:
    """Back to SIGUSR2's default (training inside a longer-lived process ended)."""
    global _registered
    if _registered is not None:
        faulthandler.unregister(DUMP_SIGNAL)
        _registered.close()
        _registered = None


# --- what a capture finds -----------------------------------------------------------------------------

@dataclass
class Frame:
    function: str
    file: str
    line: int

    def short(self) -> str:
        """`file:line` with the file relative to the working directory when below it."""
        try:
            name = os.path.relpath(self.file) if self.file.startswith(os.getcwd() + os.sep) else self.file
        except ValueError:
            name = self.file
        return f"{name}:{self.line}"


@dataclass
class Thread:
    name: str
    ident: str
    main: bool
    frames: list[Frame]  # innermost first


@dataclass
class Stacks:
    """One process's threads, as one capture found them."""

    pid: int
    role: str  # trainer | rank | worker
    rank: int | None
    worker_id: int | None = None
    method: str = ""  # py-spy | faulthandler | "" (none worked)
    threads: list[Thread] = field(default_factory=list)
    error: str = ""

    @property
    def main(self) -> Thread | None:
        return next((t for t in self.threads if t.main), self.threads[0] if self.threads else None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def title(self) -> str:
        who = f"worker {self.worker_id}" if self.role == "worker" else self.role
        return f"{who} (pid {self.pid})" + (f" [{self.method}]" if self.method else "")


@dataclass(frozen=True)
class Target:
    """A process to capture: (pid, start) and what it is in the run."""

    pid: int
    start: int
    role: str
    rank: int | None
    worker_id: int | None = None


def targets_of(run: registry.RunRecord) -> list[Target]:
    """The run's trainers/ranks and DataLoader workers that are still running, by rank."""
    boot = proc_table.boot_id()
    found = [Target(r.pid, r.start, r.role, r.rank, r.worker_id) for r in run.procs
             if r.role in ("trainer", "rank", "worker") and r.alive(boot)]
    return sorted(found, key=lambda t: (t.rank or 0, t.role == "worker", t.worker_id or 0, t.pid))


# --- py-spy -------------------------------------------------------------------------------------------

def py_spy() -> str | None:
    """The py-spy executable: beside this Python (a venv's bin is often not on PATH), else on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("py-spy")


def _parse_py_spy(text: str) -> list[Thread]:
    threads = []
    for entry in json.loads(text):
        frames = [Frame(str(f.get("name", "?")), str(f.get("filename", "?")), int(f.get("line") or 0))
                  for f in entry.get("frames", [])]
        name = str(entry.get("thread_name") or "")
        threads.append(Thread(name, str(entry.get("os_thread_id") or entry.get("thread_id")),
                              name == "MainThread" or entry.get("os_thread_id") == entry.get("pid"), frames))
    threads.sort(key=lambda t: not t.main)
    return threads


def _by_py_spy(targets: list[Target], exe: str) -> dict[Target, Stacks]:
    """`py-spy dump` of every target at once (each pauses only its own process)."""
    running = {}
    for target in targets:
        with contextlib.suppress(OSError):
            running[target] = subprocess.Popen([exe, "dump", "--pid", str(target.pid), "--json", "--full-filenames"],
                                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out: dict[Target, Stacks] = {}
    deadline = time.monotonic() + PY_SPY_TIMEOUT
    for target, proc in running.items():
        stacks = Stacks(target.pid, target.role, target.rank, target.worker_id)
        try:
            stdout, stderr = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            stacks.error = f"py-spy timed out after {PY_SPY_TIMEOUT:g} s"
        else:
            try:
                stacks.threads = _parse_py_spy(stdout) if proc.returncode == 0 else []
                stacks.method = "py-spy" if stacks.threads else ""
                if not stacks.threads:
                    stacks.error = f"py-spy: {(stderr.strip().splitlines() or ['no output'])[-1]}"
            except (ValueError, TypeError, AttributeError) as exc:
                stacks.error = f"py-spy output unreadable ({exc})"
        out[target] = stacks
    return out


# --- faulthandler -------------------------------------------------------------------------------------

_THREAD = re.compile(r"^(Current thread|Thread) (0x[0-9a-f]+)")
_FRAME = re.compile(r'^\s+File "(.*)", line (\d+) in (.*)$')
_MAIN = re.compile(r"main (0x[0-9a-f]+)")


def parse_faulthandler(text: str, main_ident: str | None) -> list[Thread]:
    """faulthandler's `all_threads` output (one dump) as threads, the main one first."""
    threads: list[Thread] = []
    for line in text.splitlines():
        if found := _THREAD.match(line):
            ident = found[2]
            threads.append(Thread("MainThread" if ident == main_ident else "", ident, ident == main_ident, []))
        elif (found := _FRAME.match(line)) and threads:
            threads[-1].frames.append(Frame(found[3], found[1], int(found[2])))
    threads.sort(key=lambda t: not t.main)
    return threads


def _dump_file(folder: Path, target: Target) -> Path:
    return folder / f"{target.pid}-{target.start}.txt"


def _by_signal(targets: list[Target], folder: Path) -> dict[Target, Stacks]:
    """Signal every target that registered a dump file, wait for the files to settle, read what was added."""
    sizes: dict[Target, int] = {}
    out: dict[Target, Stacks] = {}
    for target in targets:
        stacks = out[target] = Stacks(target.pid, target.role, target.rank, target.worker_id)
        path = _dump_file(folder, target)
        if not path.is_file():
            stacks.error = "no faulthandler file registered (a process started before runner's, or not Python)"
            continue
        fd = open_pidfd(target.pid, target.start)
        if fd is None:
            stacks.error = "gone"
            continue
        try:
            sizes[target] = path.stat().st_size
            signal.pidfd_send_signal(fd, DUMP_SIGNAL)
        except OSError as exc:
            sizes.pop(target, None)
            stacks.error = f"signal failed ({exc})"
        finally:
            os.close(fd)
    _settle({_dump_file(folder, t): size for t, size in sizes.items()})
    for target, size in sizes.items():
        path, stacks = _dump_file(folder, target), out[target]
        try:
            with open(path, "rb") as fh:
                header = fh.readline().decode(errors="replace")
                fh.seek(size)
                text = fh.read().decode(errors="replace")
        except OSError as exc:
            stacks.error = f"unreadable dump ({exc})"
            continue
        main = _MAIN.search(header)
        stacks.threads = parse_faulthandler(text, main[1] if main else None)
        stacks.method = "faulthandler" if stacks.threads else ""
        if not stacks.threads:
            stacks.error = f"no dump within {DUMP_WAIT:g} s (the process may not run Python code at all)"
    return out


def _settle(sizes: dict[Path, int]) -> None:
    """Wait until every file grew and then stopped growing for SETTLE seconds (at most DUMP_WAIT)."""
    deadline = time.monotonic() + DUMP_WAIT
    last: dict[Path, tuple[int, float]] = {}
    while sizes and time.monotonic() < deadline:
        time.sleep(0.05)
        now = time.monotonic()
        waiting = False
        for path, before in sizes.items():
            try:
                size = path.stat().st_size
            except OSError:
                continue
            seen = last.get(path)
            if seen is None or seen[0] != size:
                last[path] = (size, now)
            if size == before or now - last[path][1] < SETTLE:
                waiting = True
        if not waiting:
            return


# --- both ---------------------------------------------------------------------------------------------

def capture(targets: list[Target], dump_folder: Path | None, method: str | None = None) -> list[Stacks]:
    """Every target's stacks: py-spy where it works, the faulthandler signal for the rest."""
    method = method or os.environ.get(METHOD_ENV, "auto")
    found: dict[Target, Stacks] = {}
    exe = py_spy() if method in ("auto", "py-spy") else None
    if exe is not None:
        found = _by_py_spy(targets, exe)
    rest = [t for t in targets if t not in found or not found[t].threads]
    if rest and dump_folder is not None and method != "py-spy":
        for target, stacks in _by_signal(rest, dump_folder).items():
            if stacks.threads or target not in found:
                found[target] = stacks
            else:
                found[target].error += f"; {stacks.error}"
    for target in targets:
        found.setdefault(target, Stacks(target.pid, target.role, target.rank, target.worker_id,
                                        error="py-spy is not installed and no dump file is registered"))
    return [found[t] for t in targets]


# --- reading them -------------------------------------------------------------------------------------

_HERE = Path(__file__).resolve()  # runner/procs/stacks.py: runner's packages are runner/ and dashboards/ beside it
_RUNNER_DIRS = (str(_HERE.parents[1]) + os.sep, str(_HERE.parents[2] / "dashboards") + os.sep)
_LIBRARY_DIRS = tuple({str(Path(p).resolve()) + os.sep for key in ("stdlib", "platstdlib", "purelib", "platlib")
                       if (p := sysconfig.get_paths().get(key))})


def origin(file: str) -> str:
    """Whose code a frame's file is: `runner`, `library` (stdlib, site-packages: torch and co) or `user`."""
    if file.startswith("<"):
        return "library"
    with contextlib.suppress(OSError, ValueError):
        file = os.path.realpath(file)
    if file.startswith(_RUNNER_DIRS):
        return "runner"
    if file.startswith(_LIBRARY_DIRS) or "/site-packages/" in file or "/dist-packages/" in file:
        return "library"
    return "user"


def key_frame(frames: list[Frame]) -> Frame | None:
    """The innermost frame in the user's code, else in runner's (what a finding names), else None."""
    for wanted in ("user", "runner"):
        for frame in frames:
            if origin(frame.file) == wanted:
                return frame
    return None


def render(captured: list[Stacks], notes: dict[int, str] | None = None) -> str:
    """Every process's threads, grouped by rank; `notes` adds a line under a rank's heading."""
    lines: list[str] = []
    ranks = sorted({s.rank or 0 for s in captured})
    for rank in ranks:
        lines.append(f"=== rank {rank}" + (f": {notes[rank]}" if notes and rank in notes else ""))
        for stacks in (s for s in captured if (s.rank or 0) == rank):
            lines.append(f"--- {stacks.title}")
            if stacks.error and not stacks.threads:
                lines.append(f"    (no stacks: {stacks.error})")
            for thread in stacks.threads:
                name = f' "{thread.name}"' if thread.name else ""
                lines.append(f"  Thread {thread.ident}{name}{' (main)' if thread.main else ''}")
                lines.extend(f"    {f.function} ({f.file}:{f.line})" for f in thread.frames)
        lines.append("")
    return "\n".join(lines)
