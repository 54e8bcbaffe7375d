"""What `runner report` adds about stalls: the stall watch's own findings, a run it ended, and where each
rank of a live run is right now (its heartbeat). No torch.

The stall watch (runner/procs/stall_watch.py) appends its findings to `stall/findings.jsonl`; the
trainer's feed copies them into findings.json while it can. A trainer stuck for good (or killed by
--on-stall stop before its feed ran) leaves them only in the first: the report folds both, once each.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from runner.procs import heartbeat, registry, stall_explain, stall_watch


def stall_findings(folder: Path) -> list[dict[str, Any]]:
    """The stall watch's findings, oldest first."""
    found = []
    try:
        lines = (stall_watch.stall_dir(folder) / stall_watch.FINDINGS).read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            found.append({key: value for key, value in record.items() if key != "time"})
    return found


def merged(findings: list[dict[str, Any]], stalls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """findings.json's findings and the stall watch's that it lacks, in step order."""
    seen = {(f.get("kind"), f.get("message")) for f in findings}
    extra = [s for s in stalls if (s.get("kind"), s.get("message")) not in seen]
    if not extra:
        return findings
    return sorted(findings + extra, key=lambda f: f.get("step") or 0)


def stopped(folder: Path) -> str | None:
    """The stall that --on-stall stop ended the run for (its finding's message), if it did."""
    try:
        data = json.loads((stall_watch.stall_dir(folder) / stall_watch.STOPPED).read_text())
    except (OSError, ValueError):
        return None
    return str(data.get("message", "")) if isinstance(data, dict) else None


def live_ranks(record: registry.RunRecord | None) -> list[dict[str, Any]]:
    """Each live rank's phase now, from its heartbeat: rank, pid, step, phase, seconds in it."""
    if record is None:
        return []
    now = time.time()
    return [{"rank": b.rank, "pid": b.pid, "step": b.step, "phase": b.phase, "seconds": round(now - b.since, 1)}
            for b in heartbeat.read_all(heartbeat.folder_for(record.id)) if b.phase != "ended" and b.alive()]


def ranks_line(ranks: list[dict[str, Any]]) -> str:
    """`now: rank 0 in data loading of step 41 for 74 s; rank 1 ...`."""
    parts = []
    for rank in ranks:
        state = stall_explain.RankState(rank["rank"], rank["pid"], rank["phase"], rank["step"], rank["seconds"])
        who = f"rank {rank['rank']} " if len(ranks) > 1 else ""
        parts.append(f"{who}in {state.doing()} for {rank['seconds']:.0f} s")
    return "now: " + "; ".join(parts)
