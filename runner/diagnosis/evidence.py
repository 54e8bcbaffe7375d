"""Building findings: the event with its evidence, numbers rounded to what a reader needs."""

from __future__ import annotations

import math
from typing import Any

from runner.telemetry import tags
from runner.telemetry.events import Finding


def finding(kind: str, severity: str, step: int, message: str, evidence: dict[str, Any], advice: str,
            subject: str = "") -> Finding:
    """A Finding for the "findings" tag; `subject` (a rank, a cause) lets one kind fire once per subject."""
    event = Finding(tag=tags.FINDINGS, step=step, kind=kind, severity=severity, message=message,
                    evidence=evidence, advice=advice)
    if subject:
        event.evidence.setdefault("subject", subject)
    return event


def rounded(value: float, digits: int = 2) -> float:
    return round(value, digits)


def significant(value: float) -> float | str:
    """Four significant digits (norms span many orders of magnitude); NaN/inf as text, for JSON."""
    return float(f"{value:.4g}") if math.isfinite(value) else str(value)
