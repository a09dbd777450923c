"""Differentiation methods (*how* the derivative is taken), each written once against the
update-rule interface of `revlearn.optim`: `Reversible` (exact reversal), `Unrolled`
(store every step), `Checkpointed` (store every k-th step)."""

from ._reversible import Reversible
from ._unrolled import Checkpointed, Unrolled

__all__ = ["Checkpointed", "Reversible", "Unrolled"]
