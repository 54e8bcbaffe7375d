"""The per-process training entry point: `python -m runner.train [runner train flags]`.

This is what the supervisor starts, and what torchrun runs on every rank:
`torchrun --nproc_per_node=N -m runner.train --model cnn ...` works for users who launch
torchrun themselves (cluster scripts, `srun torchrun ...`).
"""

import os
import sys

os.environ["RUNNER_IN_PROCESS"] = "1"

from runner.cli import main  # noqa: E402

main(["train", *sys.argv[1:]])
