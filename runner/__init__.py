"""runner: an observability-first PyTorch training runner."""

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """`runner.observe` on first use: `import runner` (and `runner --help`) stays torch-free."""
    if name == "observe":
        from runner.own_loop import observe

        return observe
    raise AttributeError(f"module 'runner' has no attribute {name!r}")
