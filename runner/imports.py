"""Loading user code by `package.module:attribute` import path."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from runner.errors import usage_error


def load_object(path: str, what: str) -> Any:
    """Import `package.module:attribute`; a clear usage error when it cannot be found."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise usage_error(f"cannot import {what} module {module_name!r} ({type(exc).__name__}: {exc}); "
                          "is it on PYTHONPATH?") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise usage_error(f"{what} {path!r}: module {module_name!r} has no attribute {attr!r}") from None


def call_with_known_kwargs(factory: Callable[..., Any], what: str, **available: Any) -> Any:
    """Call a user factory with the keyword arguments its signature names (all of them if **kwargs)."""
    if not callable(factory):
        raise usage_error(f"{what} is not callable")
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        kwargs = available
    else:
        kwargs = {k: v for k, v in available.items() if k in params}
    try:
        return factory(**kwargs)
    except TypeError as exc:
        raise usage_error(f"{what} could not be called: {exc}") from None
