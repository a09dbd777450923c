"""revlearn: hypergradients through exactly reversible SGD with momentum, in JAX."""

from ._check import (BufferUsage, GradCheck, ReversalCheck, SelfCheck, buffer_usage,
                     check_hypergradients, check_reversal, self_check)
from ._faults import ReversibleError
from ._reversible import Reversible
from ._sgd import sgd
from ._unrolled import Checkpointed, Unrolled

__version__ = "0.1.0"

__all__ = [
    "BufferUsage",
    "GradCheck",
    "ReversalCheck",
    "SelfCheck",
    "buffer_usage",
    "check_hypergradients",
    "check_reversal",
    "self_check",
    "Checkpointed",
    "Reversible",
    "ReversibleError",
    "Unrolled",
    "sgd",
]
