"""runner: an observability-first PyTorch training runner."""

from typing import Any

from runner.version import __version__

__all__ = ["__version__", "observe"]


def __getattr__(name: str) -> Any:
    """`runner.observe` on first use: `import runner` (and `runner --help`) stays torch-free."""
    if name == "observe":
        from runner.own_loop import observe

        return observe
    raise AttributeError(f"module 'runner' has no attribute {name!r}")
