"""The experiments of `revlearn run NAME`: one public module each, found and
registered on import (each defines `EXPERIMENT`).

See `_registry.py` for how to add one.
"""

from .._extras import require

require("revlearn.experiments")

from . import _registry  # noqa: E402
from ._registry import *  # noqa: E402,F403  (the public names, as _registry.__all__)


def _discover() -> None:
    """Register the `EXPERIMENT` of every public module of this package."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            register(importlib.import_module(f"{__name__}.{info.name}").EXPERIMENT)


_discover()

__all__ = list(_registry.__all__)  # noqa: F405
