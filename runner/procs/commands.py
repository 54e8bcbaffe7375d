"""`runner cleanup` and `runner runs` (no torch import)."""

from __future__ import annotations

import typer


def cleanup() -> None:
    """Find (and with --yes, kill) orphaned DataLoader workers, DDP ranks and leaked /dev/shm segments."""
    raise typer.Exit(1)


def runs() -> None:
    """List runs with their status."""
    raise typer.Exit(1)
