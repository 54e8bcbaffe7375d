"""The per-process training entry point: `python -m runner.train [--config FILE] [train flags]`.

It trains in this process, with the same flags as `runner train` (runner/train_command.py) but no RUNNER_*
environment variables (the config it is given is already resolved). This is what the supervisor starts,
and what torchrun runs on every rank, so that
`torchrun --nproc_per_node=N -m runner.train --model cnn ...` works for users who launch torchrun
themselves (cluster scripts, `srun torchrun ...`).
"""

from __future__ import annotations

import sys

import typer

from runner.cli_errors import run_app
from runner.procs.rank_exit import exit_code_noted
from runner.train.run import train_here
from runner.train_command import make_train_command

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
app.command()(make_train_command(train_here, environment=False))

if __name__ == "__main__":
    with exit_code_noted():  # a rank ends without interpreter finalization (see runner/procs/rank_exit.py)
        run_app(app, sys.argv[1:], prog_name="python -m runner.train")
