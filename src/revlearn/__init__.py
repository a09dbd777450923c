"""revlearn: hypergradients through exactly reversible training, in JAX.

`train(loss_fn, params0, hypers, optimizer=..., steps=..., method=...)` trains with an
update rule from `revlearn.optim` (momentum, Adam, RMSProp with momentum) and is
differentiable w.r.t. everything it reads; `method` chooses how: `Reversible()`
(exact reversal, O(P) memory), `Unrolled()` or `Checkpointed()`.
"""

from . import optim
from ._checks import (BufferUsage, GradCheck, ReversalCheck, SelfCheck, buffer_usage,
                      check_hypergradients, check_reversal, self_check)
from ._faults import ReversibleError
from ._train import sgd, train
from .methods import Checkpointed, Reversible, Unrolled

__version__ = "0.2.0"

__all__ = [
    "BufferUsage",
    "Checkpointed",
    "GradCheck",
    "ReversalCheck",
    "Reversible",
    "ReversibleError",
    "SelfCheck",
    "Unrolled",
    "buffer_usage",
    "check_hypergradients",
    "check_reversal",
    "optim",
    "self_check",
    "sgd",
    "train",
]
