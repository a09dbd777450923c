"""The experiments of `revlearn run NAME`: one module each, registered on import.

See `_registry.py` for how to add one.
"""

from ._registry import (
    ConfigError,
    Experiment,
    UnknownExperimentError,
    all_experiments,
    apply_overrides,
    config_to_dict,
    get,
    names,
    parse_value,
    register,
)
from . import quickstart  # noqa: E402,F401  (registers itself)

__all__ = [
    "ConfigError",
    "Experiment",
    "UnknownExperimentError",
    "all_experiments",
    "apply_overrides",
    "config_to_dict",
    "get",
    "names",
    "parse_value",
    "register",
]
