"""A check's outcome, its one console line, and the report files (report.md, report.json)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

STATUSES = ("PASS", "FAIL", "SKIP")


@dataclass
class Verdict:
    """PASS/FAIL/SKIP, the numbers behind it in one line, and why (every FAIL and SKIP has a reason)."""

    check: str
    status: str
    summary: str  # the numbers, one line
    reason: str = ""
    numbers: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    table: str = ""  # markdown rows that explain the numbers (report.md shows it below the summary)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status {self.status!r} not in {STATUSES}")
        if self.status != "PASS" and not self.reason:
            raise ValueError(f"a {self.status} needs a reason ({self.check})")

    def line(self) -> str:
        why = f" — {self.reason}" if self.reason else ""
        return f"{self.status} {self.check}: {self.summary}{why} [{self.seconds:.0f} s]"


def passed(check: str, summary: str, **numbers: Any) -> Verdict:
    return Verdict(check, "PASS", summary, numbers=numbers)


def failed(check: str, summary: str, reason: str, **numbers: Any) -> Verdict:
    return Verdict(check, "FAIL", summary, reason, numbers=numbers)


def skipped(check: str, reason: str, **numbers: Any) -> Verdict:
    return Verdict(check, "SKIP", "not run", reason, numbers=numbers)


def verdict_of(check: str, summary: str, problems: list[str], **numbers: Any) -> Verdict:
    """PASS when `problems` is empty, else FAIL listing them."""
    if problems:
        return failed(check, summary, "; ".join(problems), **numbers)
    return passed(check, summary, **numbers)


def amend(verdict: Verdict, problems: list[str], first: bool = False) -> Verdict:
    """The verdict with `problems` added to its reason (before the others when `first`): a FAIL unless
    there are none. A SKIP stays a SKIP only without problems."""
    if not problems:
        return verdict
    reasons = [*problems, verdict.reason] if first else [verdict.reason, *problems]
    return replace(verdict, status="FAIL", reason="; ".join(r for r in reasons if r))


def exit_code(verdicts: list[Verdict]) -> int:
    """1 if any check failed, else 0 (skips do not fail the run)."""
    return 1 if any(v.status == "FAIL" for v in verdicts) else 0


def markdown(verdicts: list[Verdict], environment: dict[str, Any]) -> str:
    env = ", ".join(f"{k} {v}" for k, v in environment.items())
    rows = ["| check | result | numbers | reason | s |", "|---|---|---|---|---:|"]
    for v in verdicts:
        cells = (_cell(v.check), v.status, _cell(v.summary), _cell(v.reason), f"{v.seconds:.0f}")
        rows.append("| " + " | ".join(cells) + " |")
    counts = {s: sum(v.status == s for v in verdicts) for s in STATUSES}
    head = f"# GPU acceptance\n\n{env}\n\n" + ", ".join(f"{n} {s}" for s, n in counts.items()) + "\n\n"
    details = "".join(f"\n## {v.check}\n\n{v.table}\n" for v in verdicts if v.table)
    return head + "\n".join(rows) + "\n" + details


def _cell(text: str) -> str:
    """Table-safe: a run's stderr may hold pipes and newlines."""
    return text.replace("\n", " ").replace("|", "\\|")


def write(out: Path, verdicts: list[Verdict], environment: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(markdown(verdicts, environment))
    data = {"environment": environment, "exit_code": exit_code(verdicts), "checks": [asdict(v) for v in verdicts]}
    (out / "report.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
