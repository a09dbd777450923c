"""The experiments of `revlearn run NAME`: one module each, registered on import.

See `_registry.py` for how to add one.
"""

from .._extras import require

require("revlearn.experiments")

from ._registry import (  # noqa: E402
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
    validate_config,
)
from . import quickstart  # noqa: E402,F401  (registers itself)
from . import canonical_examples  # noqa: E402,F401  (registers itself)
from . import augmentation  # noqa: E402,F401  (registers itself)
from . import init_distribution  # noqa: E402,F401
from . import schedules  # noqa: E402,F401
from . import chaos  # noqa: E402,F401
from . import toy  # noqa: E402,F401
from . import l2_per_weight  # noqa: E402,F401  (registers itself)
from . import learned_structure  # noqa: E402,F401  (registers itself)

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
    "validate_config",
]
