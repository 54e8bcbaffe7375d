"""`runner diff A B`'s content: what differs between two runs, from their files only (no torch).

Read: env.json (config, code version, packages, hardware), else config.toml for the config;
summary.json (final and best metrics, time breakdown) and findings.json. Only what differs is kept,
except the metrics and time parts, which are shown side by side with B - A.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

from runner.diagnosis import provenance
from runner.telemetry import tags

SAME_EVERY_RUN = ("name",)  # config keys that differ between any two runs: not a difference worth showing
METRIC_PREFIXES = (tags.TRAIN, tags.VAL)
BEST_TEXT = re.compile(r"best\.pt: (\S+) (\S+) at step (\d+)")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _config(folder: Path, env: dict[str, Any] | None) -> dict[str, Any]:
    if env is not None and isinstance(env.get("config"), dict):
        return env["config"]
    try:
        raw = tomllib.loads((folder / "config.toml").read_text())
    except (OSError, ValueError):
        return {}
    return raw.get("train", raw)


def _changed(a: dict[str, Any], b: dict[str, Any], skip: tuple[str, ...] = ()) -> dict[str, list[Any]]:
    """Keys whose values differ (a key missing on one side counts, as None)."""
    return {key: [a.get(key), b.get(key)] for key in sorted(set(a) | set(b))
            if key not in skip and a.get(key) != b.get(key)}


def _code(env: dict[str, Any]) -> dict[str, Any]:
    git = env.get("git") or {}
    return {"runner": env.get("runner"), "python": (env.get("python") or {}).get("version"),
            "git_commit": git.get("commit"), "git_dirty": git.get("dirty"), "git_diff_sha256": git.get("diff_sha256")}


def _hardware(env: dict[str, Any]) -> dict[str, Any]:
    host, devices = env.get("host") or {}, env.get("devices") or {}
    return {"host": host.get("name"), "platform": host.get("platform"), "cpus": host.get("cpus"),
            "gpus": [g.get("name") for g in devices.get("gpus") or []] or None, "driver": devices.get("driver"),
            "cuda": devices.get("cuda"), "world_size": env.get("world_size")}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _side_by_side(a: dict[str, Any], b: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """{key: {a, b, diff}} over the keys of either side; diff is B - A where both are numbers."""
    out = {}
    for key in sorted(set(a) | set(b)):
        va, vb = _number(a.get(key)), _number(b.get(key))
        out[key] = {"a": va, "b": vb, "diff": vb - va if va is not None and vb is not None else None}
    return out


def _metrics(summary: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(final, best): the last logged train/val scalars, and the --monitor tag's best value and its step
    (the latest `best` text: "best.pt: <tag> <value> at step <step>"), where the run kept one."""
    scalars = summary.get("scalars") or {}
    final = {k: v for k, v in scalars.items() if k.startswith(METRIC_PREFIXES)}
    found = BEST_TEXT.match(str((summary.get("texts") or {}).get(tags.BEST) or ""))
    best = {found[1]: float(found[2]), f"{found[1]} (step)": int(found[3])} if found else {}
    return final, best


def _finding_keys(findings: Any) -> dict[str, dict[str, Any]]:
    """Findings by kind (and subject, where a finding names one): what 'the same finding' means here."""
    out: dict[str, dict[str, Any]] = {}
    for finding in findings if isinstance(findings, list) else []:
        if not isinstance(finding, dict):
            continue
        subject = (finding.get("evidence") or {}).get("subject")
        key = f"{finding.get('kind')}" + (f" ({subject})" if subject else "")
        out.setdefault(key, {"severity": finding.get("severity"), "step": finding.get("step"),
                             "message": finding.get("message")})
    return out


class RunFiles:
    """One run folder's files as `runner diff` reads them."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.env = provenance.read(folder)
        summary = _read_json(folder / "summary.json")
        self.summary: dict[str, Any] = summary if isinstance(summary, dict) else {}
        self.findings = _finding_keys(_read_json(folder / "findings.json"))
        self.config = _config(folder, self.env)

    def identity(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "name": self.summary.get("name") or self.folder.name,
                "status": self.summary.get("status"), "step": self.summary.get("step"), "env": self.env is not None}


def build_diff(a_folder: Path, b_folder: Path) -> dict[str, Any]:
    """Everything `runner diff` shows, as plain data (what --json prints)."""
    a, b = RunFiles(a_folder), RunFiles(b_folder)
    env_a, env_b = a.env or {}, b.env or {}
    final_a, best_a = _metrics(a.summary)
    final_b, best_b = _metrics(b.summary)
    time_a, time_b = a.summary.get("time") or {}, b.summary.get("time") or {}
    parts_a = dict(time_a.get("parts_ms") or {}, step=time_a.get("step_ms"))
    parts_b = dict(time_b.get("parts_ms") or {}, step=time_b.get("step_ms"))
    return {
        "a": a.identity(), "b": b.identity(),
        "config": _changed(a.config, b.config, skip=SAME_EVERY_RUN),
        "code": _changed(_code(env_a), _code(env_b)) if a.env and b.env else {},
        "packages": _changed(env_a.get("packages") or {}, env_b.get("packages") or {}) if a.env and b.env else {},
        "hardware": _changed(_hardware(env_a), _hardware(env_b)) if a.env and b.env else {},
        "metrics": {"final": _side_by_side(final_a, final_b), "best": _side_by_side(best_a, best_b)},
        "time_ms": _side_by_side({k: v for k, v in parts_a.items() if v is not None},
                                 {k: v for k, v in parts_b.items() if v is not None}),
        "findings": {"only_a": {k: v for k, v in a.findings.items() if k not in b.findings},
                     "only_b": {k: v for k, v in b.findings.items() if k not in a.findings}},
    }


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "-" if value is None else str(value)


def _pairs(title: str, changed: dict[str, list[Any]]) -> list[str]:
    if not changed:
        return [f"{title}: same"]
    return [f"{title}:"] + [f"  {key}: {_value(a)} -> {_value(b)}" for key, (a, b) in changed.items()]


def _table(title: str, rows: dict[str, dict[str, float | None]]) -> list[str]:
    if not rows:
        return []
    width = max(len(key) for key in rows)
    lines = [f"{title}:", f"  {'':<{width}}  {'A':>12}  {'B':>12}  {'B - A':>12}"]
    for key, row in rows.items():
        diff = row["diff"]
        lines.append(f"  {key:<{width}}  {_value(row['a']):>12}  {_value(row['b']):>12}  "
                     f"{(f'{diff:+.4g}' if diff is not None else '-'):>12}")
    return lines


def render(diff: dict[str, Any]) -> str:
    """The differences as text: one section per kind, `same` where nothing differs."""
    a, b = diff["a"], diff["b"]
    lines = [f"A: {a['name']} ({a['folder']}), {a['status'] or '?'} at step {a['step'] or 0}",
             f"B: {b['name']} ({b['folder']}), {b['status'] or '?'} at step {b['step'] or 0}"]
    lines += _pairs("config", diff["config"])
    if a["env"] and b["env"]:
        for section in ("code", "packages", "hardware"):
            lines += _pairs(section, diff[section])
    else:
        missing = " and ".join(side for side in ("A", "B") if not diff[side.lower()]["env"])
        lines.append(f"code, packages, hardware: unknown ({missing} has no env.json)")
    lines += _table("final metrics", diff["metrics"]["final"]) + _table("best metrics", diff["metrics"]["best"])
    lines += _table("time per step (ms)", diff["time_ms"])
    only_a, only_b = diff["findings"]["only_a"], diff["findings"]["only_b"]
    if not only_a and not only_b:
        lines.append("findings: same kinds")
    for side, only in (("A", only_a), ("B", only_b)):
        for key, finding in only.items():
            lines.append(f"findings only in {side}: {key} at step {finding['step']}: {finding['message']}")
    return "\n".join(lines)
