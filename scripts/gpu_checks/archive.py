"""The evidence archive: everything needed to judge a failure, in one size-capped file beside report.md and
report.json (the GPU machine gives back at most 8 files).

Files go in by how much they explain, a tier at a time: every child's command line, stdout and stderr
and the Visdom server's log; then each run's summary.json, findings.json, config.toml, sync counts
and helper outputs; then the OOM post-mortems; then TensorBoard event files, allocator snapshots and
profiler traces. A file is added only while the archive, counted at the file's full uncompressed
size, stays under the cap, so the cap holds without a second pass; a log over TEXT_TAIL keeps its end
(other files go in whole or not at all: half a JSON trace explains nothing).
MANIFEST.txt, last, lists every file of the work folder with its size and whether it went in.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

ARCHIVE = "evidence.tar.gz"
CAP = 12 << 20  # bytes: under the 16 MiB a returned file may have, with room to spare
TEXT_TAIL = 1 << 20  # a longer log keeps its last MiB
MANIFEST_ROOM = 256 << 10
SKIPPED = (".pt",)  # checkpoints: weights explain no failure
TEXT = (".cmd", ".stdout", ".stderr", ".log", ".json", ".toml", ".txt", ".md")
TAILED = (".stdout", ".stderr", ".log", ".txt")  # logs: their end says how they ended


def tier(rel: Path, size: int) -> int:
    """0 logs, 1 run summaries and small outputs, 2 post-mortems and other text, 3 bulky binaries; 9 never.
    `rel` is relative to the work folder."""
    name, parts = rel.name, rel.parts
    if rel.suffix in SKIPPED:
        return 9
    if parts[0] == "logs" or name.endswith(".log"):
        return 0
    if name in ("summary.json", "findings.json", "config.toml") or (rel.suffix == ".json" and len(parts) == 1):
        return 1
    if rel.suffix in TEXT and ("oom" in parts or size < TEXT_TAIL):
        return 2
    return 3


def write(work: Path, target: Path, cap: int = CAP) -> tuple[int, list[str]]:
    """Archive `work` into `target` (replaced atomically); its size and the files left out."""
    sizes = {p.relative_to(work): p.stat().st_size for p in work.rglob("*") if p.is_file() and not p.is_symlink()}
    files = sorted(sizes, key=lambda rel: (tier(rel, sizes[rel]), sizes[rel], str(rel)))
    budget, left_out, manifest = cap - MANIFEST_ROOM, [], []
    partial = target.with_name(f".{target.name}.partial")
    with tarfile.open(partial, "w:gz") as tar:
        used = 0
        for rel in files:
            path, size = work / rel, sizes[rel]
            level = tier(rel, size)
            cut = path.suffix in TAILED and size > TEXT_TAIL
            if level > 3 or used + (TEXT_TAIL if cut else size) > budget:
                left_out.append(str(rel))
                manifest.append(f"left out  {size:>12}  {rel}")
                continue
            try:
                data = _tail(path) if cut else path.read_bytes()
            except OSError as exc:  # gone or unreadable since it was listed
                manifest.append(f"unread    {size:>12}  {rel} ({exc.strerror})")
                continue
            used += len(data)
            _add(tar, str(rel), data)
            manifest.append(f"{'tail' if cut else 'in':<9} {size:>12}  {rel}")
        _add(tar, "MANIFEST.txt", ("\n".join(manifest) + "\n").encode())
    partial.replace(target)
    return target.stat().st_size, left_out


def _tail(path: Path) -> bytes:
    with path.open("rb") as fh:
        fh.seek(-TEXT_TAIL, 2)
        return b"(earlier output cut)\n" + fh.read(TEXT_TAIL)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))
