"""Update rules (*what* is trained): `revlearn.optim.momentum`, `adam`, `rmsprop_momentum`.

Every rule runs under every method (`revlearn.Reversible`, `Unrolled`,
`Checkpointed`) through `revlearn.train(..., optimizer=rule)`. `Unrolled` and
`Checkpointed` also take any optax `GradientTransformation`. A new rule is one
module here: a `Rule` subclass (see `_base.py`).
"""

from ..exact._grid import FINE, FINEST, MOMENTUM, Grid, applied
from ._adam import Adam, AdamState, adam
from ._base import Decay, Moment, Rule
from ._momentum import Momentum, MomentumState, momentum
from ._rmsprop import RMSPropMomentum, RMSPropMomentumState, rmsprop_momentum

__all__ = [
    "Adam", "AdamState", "adam",
    "Momentum", "MomentumState", "momentum",
    "RMSPropMomentum", "RMSPropMomentumState", "rmsprop_momentum",
    "Rule", "Moment", "Decay",
    "Grid", "MOMENTUM", "FINE", "FINEST", "applied",
]
