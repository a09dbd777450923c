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
    """Heavy-ball SGD, the paper's rule: v <- momentum v - (1 - momentum) g; w <- w + lr v.

    Args:
      lr: alpha_t, the learning rate: a scalar, a [steps] schedule, or a pytree prefix of
        params0 whose leaves are scalars, [steps] schedules, per-weight arrays or
        [steps, *shape] arrays.
      momentum: gamma_t in (0, 1), same shapes; applied as round(gamma 2^16) / 2^16
        (0.9 -> 0.8999939), the derivative taken w.r.t. the value passed.

    Returns:
      A `Momentum` rule (a pytree of its two hyperparameters) for `revlearn.train`'s
      `optimizer=`. Its state is `MomentumState(v)`, zeros unless `train(state0=...)`
      gives one.

    Raises:
      ValueError: (from `train`, before anything runs) a momentum outside (0, 1) on its
        grid, a non-finite value, or a shape that fits neither `steps` nor params0.

    Example:
        ```python
        opt = revlearn.optim.momentum(lr=jnp.full(100, 0.1), momentum=0.9)
        w_T = revlearn.train(loss_fn, params0, hypers, optimizer=opt, steps=100)
        d_opt = jax.grad(lambda o: meta_fn(revlearn.train(
            loss_fn, params0, hypers, optimizer=o, steps=100,
            method=revlearn.Reversible(min_momentum=0.5))))(opt)
        d_opt.lr, d_opt.momentum        # a rule of hypergradients
        ```
    """
    return Momentum(lr, momentum)
