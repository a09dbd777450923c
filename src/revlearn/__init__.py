"""revlearn: hypergradients through exactly reversible SGD with momentum, in JAX."""

from ._faults import ReversibleError
from ._reversible import Reversible
from ._sgd import sgd
from ._unrolled import Checkpointed, Unrolled

__version__ = "0.1.0"

__all__ = [
    "Checkpointed",
    "Reversible",
    "ReversibleError",
    "Unrolled",
    "sgd",
]
