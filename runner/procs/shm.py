"""Leaked `/dev/shm/torch_*` segments (torch's `file_system` sharing: `torch_<creator pid>_<random>_<n>`).

A segment is a leak only when all of these hold: it is owned by this user, no live process has it
open or mapped, its creator is dead (no process has that pid, or the one that has it started after
the segment was last written: a reused pid), and it has not been written for a minute.
`torch_shm_manager` is never killed: it exits by itself, and killing it is what leaks segments.
"""

from __future__ import annotations

import os
import re
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from runner.procs import proc_table

SHM_DIR = Path("/dev/shm")
MIN_AGE_S = 60.0
TORCH_SEGMENT = re.compile(r"^torch_(\d+)_")


@dataclass
class ShmLeak:
    path: Path
    size: int
    age_s: float
    creator: int
    reason: str


def boot_time() -> float:
    for line in (proc_table.PROC / "stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    raise OSError("no btime in /proc/stat")


def paths_in_use(folder: Path) -> set[str]:
    """Files under `folder` that a live process has open (fd) or mapped (maps)."""
    prefix = str(folder).rstrip("/") + "/"
    used: set[str] = set()
    for entry in os.scandir(proc_table.PROC):
        if not entry.name.isdigit():
            continue
        base = proc_table.PROC / entry.name
        try:
            for fd in os.scandir(base / "fd"):
                try:
                    target = os.readlink(fd.path)
                except OSError:
                    continue
                if target.startswith(prefix):
                    used.add(target)
            with open(base / "maps", encoding="utf-8", errors="replace") as maps:
                for line in maps:
                    at = line.find(prefix)
                    if at >= 0:
                        used.add(line[at:].rstrip("\n").removesuffix(" (deleted)"))
        except OSError:
            continue  # gone meanwhile, or not ours to read
    return used


def _creator_alive(pid: int, written: float, btime: float) -> bool:
    """Whether the process that created a segment last written at `written` (epoch s) still runs."""
    start = proc_table.start_ticks(pid)
    return start is not None and btime + start / proc_table.CLOCK_TICKS <= written


def find_leaks(folder: Path = SHM_DIR, now: float | None = None) -> list[ShmLeak]:
    """The torch segments in `folder` that meet every leak rule."""
    now = time.time() if now is None else now
    candidates: list[tuple[Path, os.stat_result, int]] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    uid, btime = os.getuid(), boot_time()
    for entry in entries:
        match = TORCH_SEGMENT.match(entry.name)
        if not match:
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode) or st.st_uid != uid or now - st.st_mtime < MIN_AGE_S:
            continue
        creator = int(match.group(1))
        if _creator_alive(creator, st.st_mtime, btime):
            continue
        candidates.append((Path(entry.path), st, creator))
    if not candidates:
        return []
    used = paths_in_use(folder)
    return [ShmLeak(path, st.st_size, now - st.st_mtime, creator,
                    f"creator {creator} gone, unused, last written {int(now - st.st_mtime)} s ago")
            for path, st, creator in candidates if str(path) not in used]


def remove(leaks: list[ShmLeak], folder: Path = SHM_DIR) -> list[ShmLeak]:
    """Unlink the leaks that are still leaks now; returns those that could not be removed."""
    still = {leak.path for leak in find_leaks(folder)}
    left = []
    for leak in leaks:
        if leak.path not in still:
            continue  # in use again, rewritten, or gone: not ours to touch
        try:
            leak.path.unlink()
        except FileNotFoundError:
            pass
        except OSError:
            left.append(leak)
    return left
