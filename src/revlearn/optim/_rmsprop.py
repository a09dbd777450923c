"""RMSProp with momentum (Tieleman & Hinton 2012; PyTorch's RMSprop(momentum=...) up to where
lr enters).

    s <- d s + (1 - d) g^2
    v <- m v - lr g / (sqrt(s) + eps)
    w <- w + v

The weight update reads v, which was updated from g at the pre-update
weights, so the step reverses exactly (plain RMSProp, whose weight update reads
g itself, does not). The decay d and the momentum m are applied on the grid
n / 2^24 (`exact._grid.FINE`); s is held in 128-bit fixed point (`exact._wide`), as
Adam's.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

from ..exact._grid import FINE
from ._base import DECAY, POSITIVE, REAL, Decay, Moment, Rule, safe_sqrt


class RMSPropMomentumState(NamedTuple):
    """`s` (the mean square) and `v` (the velocity), pytrees like params."""

    s: Any
    v: Any


@dataclasses.dataclass(frozen=True)
class RMSPropMomentum(Rule):
    """`rmsprop_momentum(lr, decay, momentum, eps)`; see the module docstring."""

    lr: Any
    decay: Any = 0.9
    momentum: Any = 0.9
    eps: Any = 1e-8

    name = "rmsprop_momentum"
    hyper_kinds = {"lr": REAL, "decay": DECAY, "momentum": DECAY, "eps": POSITIVE}
    moments = (Moment("s", "decay", nonnegative=True, wide=True), Moment("v", "momentum"))
    step_reads = ("lr", "eps")
    State = RMSPropMomentumState

    def decays(self):
        return (Decay("decay", FINE, ("decay",), lambda h: h["decay"], "decay"),
                Decay("momentum", FINE, ("momentum",), lambda h: h["momentum"], "momentum"))

    def increment(self, name, g, new, h, d, c, k):
        if name == "s":
            return c["decay"] * (g * g)
        return -h["lr"] * g / (safe_sqrt(new["s"]) + h["eps"])

    def update(self, new, h, d, c, k):
        return new["v"]


def rmsprop_momentum(lr, decay=0.9, momentum=0.9, eps=1e-8) -> RMSPropMomentum:
    """RMSProp with momentum (the reversible form: the weight update reads only v).

        s <- decay s + (1 - decay) g^2
        v <- momentum v - lr g / (sqrt(s) + eps)
        w <- w + v

    Args:
      lr: the learning rate: a scalar, a [steps] schedule, or a pytree prefix of params0
        whose leaves are scalars, [steps] schedules, per-weight arrays or [steps, *shape].
      decay: the mean square's decay in (0, 1), same shapes; applied as
        round(decay 2^24) / 2^24.
      momentum: the velocity's decay in (0, 1), same shapes and grid as decay.
      eps: > 0, same shapes.

    Returns:
      An `RMSPropMomentum` rule for `revlearn.train`'s `optimizer=`; its state is
      `RMSPropMomentumState(s, v)`.

    Raises:
      ValueError: (from `train`, before anything runs) a decay outside (0, 1) on its
        grid, eps <= 0, a non-finite value, or a shape that fits neither `steps` nor
        params0.

    Example:
        ```python
        opt = revlearn.optim.rmsprop_momentum(1e-3, decay=0.9, momentum=0.9)
        w_T = revlearn.train(loss_fn, params0, hypers, optimizer=opt, steps=100)
        ```
    """
    return RMSPropMomentum(lr, decay, momentum, eps)
