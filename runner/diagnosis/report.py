"""`runner report`'s content: a run's state from its own files (summary.json, findings.json, the run
folder) and the process registry, as a dict and as one screen of text. No torch.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

from runner.diagnosis import provenance, stall_report
from runner.errors import usage_error
from runner.procs import proc_table, registry
from runner.telemetry import tags

MIB = 1024.0**2
PARTS = ("data_wait", "h2d", "forward", "backward", "optimizer", "telemetry", "other")


def find_run(run: str, run_dir: str) -> Path:
    """A run folder given as a path, or as a name under `run_dir`."""
    for candidate in (Path(run), Path(run_dir) / run):
        if candidate.is_dir() and any((candidate / f).exists() for f in ("summary.json", "config.toml")):
            return candidate
    raise usage_error(f"no run {run!r}: neither a run folder nor a run under {run_dir} "
                      "(pass --run-dir, or the folder itself)")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _exit_text(code: int) -> str:
    if code == 0:
        return "exit 0"
    if code > 128:
        try:
            return f"exit {code}, {signal.Signals(code - 128).name}"
        except ValueError:
            pass
    return f"exit {code}"


def _registry_record(folder: Path) -> registry.RunRecord | None:
    """The newest registry entry for this run folder (the registry keys runs by id, not by folder)."""
    path = str(folder.resolve())
    matches = [r for r in registry.load_runs() if r.run_path == path]
    return matches[-1] if matches else None


def _status(summary: dict[str, Any] | None, record: registry.RunRecord | None,
            stalled: str | None = None) -> tuple[str, str]:
    """(live | finished | stopped | failed | killed | ended | unknown, the reason in words); `stalled`: the
    stall --on-stall stop ended the run for."""
    boot = proc_table.boot_id()
    code = record.exit_code if record is not None else None
    coded = f" ({_exit_text(code)})" if code is not None else ""
    if summary is not None and summary.get("status") not in (None, "running"):
        return summary["status"], (summary.get("status_text") or summary["status"]) + coded
    if stalled is not None and not (record is not None and record.root_alive(boot)):
        return "failed", f"stalled: {stalled}; ended by --on-stall stop{coded}"
    process = (summary or {}).get("process") or {}
    writer_alive = (process.get("boot") == boot and process.get("start") is not None
                    and proc_table.is_running(int(process["pid"]), int(process["start"])))
    root_alive = record is not None and record.root_alive(boot)
    if summary is not None:
        if writer_alive:
            return "live", f"training, step {summary.get('step', 0)} of {summary.get('total_steps') or '?'}"
        last = f"last heard at step {summary.get('step', 0)}"
        if code is not None and code > 128:
            return "killed", f"the trainer (pid {process.get('pid')}) was killed ({_exit_text(code)}); {last}"
        if root_alive:
            return "killed", f"the trainer (pid {process.get('pid')}) is gone without a final status; {last}"
        return "killed", (f"the trainer (pid {process.get('pid')}) ended without a final status (killed or "
                          f"crashed){coded}; {last}")
    if root_alive:
        return "live", "starting (no summary yet)"
    if code is not None:
        return ("finished" if code == 0 else "failed"), f"no summary.json; the run ended ({_exit_text(code)})"
    return "unknown", "no summary.json and no registry entry for this folder"


def _dashboards(folder: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    events = sorted(p.name for p in folder.glob("events.out.tfevents.*"))
    if events:
        out["tensorboard"] = {"logdir": str(folder), "event_files": events,
                              "open": f"tensorboard --logdir {folder}"}
    log = folder / "visdom.log"
    if log.is_file():
        env = None
        try:
            with log.open() as fh:
                first = fh.readline()
            env = json.loads(first)[1].get("eid") if first else None
        except (OSError, ValueError, IndexError, AttributeError, TypeError):
            pass
        out["visdom"] = {"log": str(log), "env": env, "replay": f"runner dashboards replay {folder}"}
    return out


def build_report(folder: Path) -> dict[str, Any]:
    """Everything `runner report` shows, as plain data (what --json prints)."""
    summary = _read_json(folder / "summary.json")
    summary = summary if isinstance(summary, dict) else None
    findings = _read_json(folder / "findings.json")
    record = _registry_record(folder)
    status, reason = _status(summary, record, stall_report.stopped(folder))
    summary = summary or {}
    profile = folder / "profile"
    checkpoint = folder / "checkpoints" / "last.pt"
    oom = folder / "oom"
    return {
        "name": summary.get("name") or folder.name, "folder": str(folder), "status": status, "reason": reason,
        "exit_code": record.exit_code if record is not None else None,
        "step": summary.get("step", 0), "total_steps": summary.get("total_steps", 0),
        "elapsed_s": summary.get("elapsed_s"), "updated": summary.get("updated"),
        "throughput": summary.get("throughput", {}), "time": summary.get("time", {}),
        "memory": summary.get("memory", {}),
        "memory_estimate_table": summary.get("texts", {}).get(tags.MEMORY_ESTIMATE),
        "findings": stall_report.merged(findings if isinstance(findings, list) else [],
                                        stall_report.stall_findings(folder)),
        "ranks": stall_report.live_ranks(record) if status == "live" else [],  # heartbeats: each rank's phase now
        "dashboards": _dashboards(folder),
        "profile": sorted(str(p) for p in profile.rglob("*") if p.is_file()) if profile.is_dir() else [],
        "checkpoint": str(checkpoint) if checkpoint.is_file() else None,
        "best": summary.get("texts", {}).get(tags.BEST),  # "best.pt: <monitor> <value> at step <step>"
        "oom": sorted(str(p) for p in oom.rglob("*") if p.is_file()) if oom.is_dir() else [],
        "env": provenance.short(env) if (env := provenance.read(folder)) is not None else None,
    }


def _mib(value: Any) -> str:
    """Bytes in the unit that reads best."""
    if not isinstance(value, (int, float)):
        return str(value)
    for unit, size in (("GiB", 1024.0**3), ("MiB", MIB), ("KiB", 1024.0)):
        if abs(value) >= size:
            return f"{value / size:,.1f} {unit}"
    return f"{value:,.0f} B"


def _time_line(time: dict[str, Any]) -> str:
    step = time.get("step_ms")
    parts = time.get("parts_ms") or {}
    if not isinstance(step, (int, float)):
        return "time per step: (not logged yet)"
    shown = [f"{p.replace('_', ' ')} {parts[p]:.1f} ({100 * parts[p] / step:.0f} %)" for p in PARTS
             if isinstance(parts.get(p), (int, float)) and step]
    line = f"time per step: {step:.1f} ms" + (f" = {', '.join(shown)}" if shown else "")
    if time.get("step_ms_by_rank"):
        ranks = ", ".join(f"{r} {v:.1f}" for r, v in time["step_ms_by_rank"].items())
        slowest, skew = time.get("slowest_rank"), time.get("skew")
        line += f"\n  per rank (ms): {ranks}" + (f"; slowest rank {slowest:.0f}, skew {100 * skew:.1f} %"
                                                 if isinstance(slowest, (int, float)) and isinstance(skew, (int, float))
                                                 else "")
    return line


def _findings_lines(findings: list[dict[str, Any]]) -> list[str]:
    lines = [f"findings: {len(findings)}" if findings else "findings: none"]
    for f in findings:
        severity = str(f.get("severity", "")).upper()
        lines.append(f"  {severity} {f.get('kind')} at step {f.get('step')}: {f.get('message')}")
        evidence = {k: v for k, v in (f.get("evidence") or {}).items() if k != "subject"}
        if evidence:
            text = json.dumps(evidence, default=str)
            lines.append(f"    evidence: {text if len(text) <= 300 else text[:297] + '...'}")
        if f.get("advice"):
            lines.append(f"    advice: {f['advice']}")
    return lines


def _where_lines(report: dict[str, Any]) -> list[str]:
    """Where the run's data lies: dashboards, profile trace, checkpoint, OOM post-mortem."""
    lines = []
    boards = report["dashboards"]
    if "tensorboard" in boards:
        tb = boards["tensorboard"]
        lines.append(f"TensorBoard: {len(tb['event_files'])} event file(s); {tb['open']}")
    if "visdom" in boards:
        vd = boards["visdom"]
        lines.append(f"Visdom: env {vd['env']}, every call in {vd['log']} ({vd['replay']})")
    if not boards:
        lines.append("dashboards: none (--viz none)")
    if report["profile"]:
        lines.append(f"profile: {', '.join(report['profile'][:3])} (open in https://ui.perfetto.dev)")
    if report["checkpoint"]:
        lines.append(f"checkpoint: {report['checkpoint']}")
    if report["oom"]:
        lines.append(f"out-of-memory post-mortem: {', '.join(report['oom'][:3])}")
    return lines


def render(report: dict[str, Any]) -> str:
    """One screen of text."""
    lines = [f"run {report['name']}  ({report['folder']})",
             f"status: {report['status']} ({report['reason']})"]
    if report.get("ranks"):
        lines.append(stall_report.ranks_line(report["ranks"]))
    total = report["total_steps"] or "?"
    speed = report["throughput"].get("samples_per_s")
    mean = report["throughput"].get("mean_samples_per_s")
    speed_text = f"{speed:,.1f} samples/s (mean {mean:,.1f})" if isinstance(speed, (int, float)) else "-"
    elapsed = report.get("elapsed_s")
    lines.append(f"steps: {report['step']}/{total}   throughput: {speed_text}"
                 + (f"   elapsed: {elapsed:,.0f} s" if isinstance(elapsed, (int, float)) else ""))
    lines.append(_time_line(report["time"]))
    if report.get("best"):
        lines.append(f"best: {report['best'].removeprefix('best.pt: ')} (checkpoints/best.pt)")
    if report.get("env"):
        lines.append(f"env: {report['env']} (env.json; compare runs with runner diff)")
    peaks = report["memory"].get("peak_bytes") or {}
    shown = ("allocated", "reserved", "peak", "rss", "workers_rss", "gpu_used")
    main = sorted((k for k in peaks if k.split("/")[1] in shown and peaks[k]),
                  key=lambda k: (shown.index(k.split("/")[1]), k))
    if main:
        lines.append("peak memory: " + ", ".join(f"{k.split('/', 1)[1]} {_mib(peaks[k])}" for k in main))
    estimate = report["memory"].get("estimate_bytes") or {}
    if estimate:
        parts = ", ".join(f"{k} {_mib(v)}" for k, v in estimate.items() if k != "total")
        lines.append(f"memory estimate: {_mib(estimate.get('total', 0))} ({parts})")
    return "\n".join(lines + _findings_lines(report["findings"]) + _where_lines(report))
