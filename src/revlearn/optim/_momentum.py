"""Heavy-ball SGD with momentum (Maclaurin et al. 2015, the paper's rule).

    v <- gamma_t v - (1 - gamma_t) g_t
    w <- w + alpha_t v

gamma (`momentum`) is applied on the grid n / 2^16 (`exact._grid.MOMENTUM`):
0.9 is applied as 58982/65536 = 0.8999939; the derivative is taken w.r.t.
gamma itself. Reversal stores log2(1 / gamma) bits per weight per step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

from ..exact._grid import MOMENTUM
from ._base import DECAY, REAL, Decay, Moment, Rule


class MomentumState(NamedTuple):
    """The velocity v, a pytree like params."""

    v: Any


@dataclasses.dataclass(frozen=True)
class Momentum(Rule):
    """`momentum(lr, momentum)`: v <- m v - (1 - m) g; w <- w + lr v."""

    lr: Any
    momentum: Any

    name = "momentum"
    hyper_kinds = {"lr": REAL, "momentum": DECAY}
    moments = (Moment("v", "momentum"),)
    step_reads = ("lr",)
    State = MomentumState
    affine_in_gradient = True

    def decays(self):
        return (Decay("momentum", MOMENTUM, ("momentum",), lambda h: h["momentum"], "momentum"),)

    def increment(self, name, g, new, h, d, c, k):
        return -c["momentum"] * g

    def update(self, new, h, d, c, k):
        return h["lr"] * new["v"]


def momentum(lr, momentum) -> Momentum:
    """Heavy-ball SGD: v <- momentum v - (1 - momentum) g; w <- w + lr v.

    Args:
      lr: alpha_t, the learning rate: a scalar, a [steps] schedule, or a pytree prefix of
        params0 whose leaves are scalars, [steps] schedules, per-weight arrays or
        [steps, *shape] arrays.
      momentum: gamma_t in (0, 1), same shapes; applied as round(gamma 2^16) / 2^16.

    The state is `MomentumState(v)`, zeros unless `train(state0=...)` gives one.
    """
    return Momentum(lr, momentum)
