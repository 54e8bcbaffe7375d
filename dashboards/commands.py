"""`runner dashboards up|status|down|install-assets|replay` (no torch import)."""

from __future__ import annotations

import typer

app = typer.Typer(help="Start, check and stop the TensorBoard and Visdom servers.", no_args_is_help=True)


@app.command("install-assets")
def install_assets() -> None:
    """Install Visdom's JS/CSS/fonts so its server works offline."""
