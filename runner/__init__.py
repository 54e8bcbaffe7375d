"""runner: an observability-first PyTorch training runner."""

__version__ = "0.1.0"
