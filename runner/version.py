"""The version, in a module of its own: importing it loads nothing else (runner/__init__.py would resolve
`runner.observe` for the whole package)."""

__version__ = "0.1.0"
