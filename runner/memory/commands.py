"""`runner memory`: the estimate before training (torch imported inside the command)."""

from __future__ import annotations

import typer


def memory() -> None:
    """Estimate memory for a model: parameters, gradients, optimizer state, input batch, activations."""
    raise typer.Exit(1)
