"""A stand-in for `python` that replays a recorded failure, for rehearsing the acceptance run without a GPU:

    python scripts/gpu_checks/replay.py KIND -m runner train ... --run-dir D --name N

KIND `usage` is a usage error (exit 2, one line, nothing written); `crash` is a run that died before its
Visdom env or TensorBoard events existed (exit 1, a traceback, only config.toml in the run folder).
Every check, fed this, must put the replayed error in its verdict rather than a read-back's exception.
"""

from __future__ import annotations

import sys
from pathlib import Path

USAGE = "runner: error: no such option: --sync-bn (recorded usage error)"
CRASH = "torch.AcceleratorError: CUDA error: no kernel image is available for execution on the device"
MARKERS = {"usage": "no such option: --sync-bn", "crash": "no kernel image is available"}


def _value(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args and args.index(flag) + 1 < len(args) else None


def main(argv: list[str]) -> int:
    kind, args = argv[0], argv[1:]
    if kind == "usage":
        print(USAGE, file=sys.stderr)
        return 2
    run_dir, name = _value(args, "--run-dir"), _value(args, "--name")
    if run_dir and name:
        folder = Path(run_dir) / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.toml").write_text(f'name = "{name}"\n')
    print("Traceback (most recent call last):\n  File \"runner/train/run.py\", line 88, in main\n"
          "    trainer = Trainer(cfg, strategy)\n  File \"runner/train/loop.py\", line 80, in __init__\n"
          f"    self.model = strategy.wrap(model)\n{CRASH}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
