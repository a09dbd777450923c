"""Adam and AdamW (Kingma & Ba 2015; Loshchilov & Hutter 2019), as optax.adam / optax.adamw.

    m <- b1 m + (1 - b1) g
    s <- b2 s + (1 - b2) g^2
    w <- (1 - lr wd) w - lr m_hat / (sqrt(s_hat) + eps),
         m_hat = m / (1 - b1^k), s_hat = s / (1 - b2^k), k = step count (1 at the first step)

b1 and b2 are applied on the grid n / 2^24 (`exact._grid.FINE`: 0.9 ->
0.89999998, 0.999 -> 0.99900001) and the weight-decay factor 1 - lr wd on
n / 2^32 (`FINEST`, resolution 2.3e-10); derivatives are taken w.r.t. the
unrounded values. Exact reversal stores log2(1 / b1) + log2(1 / b2) (+
log2(1 / (1 - lr wd))) bits per weight per step. s holds g^2, whose values span
many decades and are read relatively (g / sqrt(s)): it is held in 128-bit fixed
point (`exact._wide`; `Reversible(frac_bits=52)`: steps of 2^-116, s < 1024,
i.e. sustained |g| < 32), m in the weights' 64-bit fixed point.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple


from ..exact._grid import FINE, FINEST
from ._base import DECAY, NONNEGATIVE, POSITIVE, REAL, Decay, Moment, Rule, safe_sqrt


class AdamState(NamedTuple):
    """`count` (int32 scalar: steps taken), `m` and `s` (pytrees like params)."""

    count: Any
    m: Any
    s: Any


@dataclasses.dataclass(frozen=True)
class Adam(Rule):
    """`adam(lr, b1, b2, eps, weight_decay)`; see the module docstring."""

    lr: Any
    b1: Any = 0.9
    b2: Any = 0.999
    eps: Any = 1e-8
    weight_decay: Any = 0.0

    name = "adam"
    hyper_kinds = {"lr": REAL, "b1": DECAY, "b2": DECAY, "eps": POSITIVE,
                   "weight_decay": NONNEGATIVE}
    step_reads = ("lr", "eps")
    moments = (Moment("m", "b1"), Moment("s", "b2", nonnegative=True, wide=True))
    counted = True
    isolate_update = True
    State = AdamState

    def _decoupled(self) -> bool:
        """Weight decay is a decay of the weights unless it is the Python number 0."""
        return not (isinstance(self.weight_decay, (int, float)) and self.weight_decay == 0)

    def decays(self):
        out = (Decay("b1", FINE, ("b1",), lambda h: h["b1"], "b1"),
               Decay("b2", FINE, ("b2",), lambda h: h["b2"], "b2"))
        if self._decoupled():
            out += (Decay("decoupled_decay", FINEST, ("lr", "weight_decay"),
                          lambda h: 1.0 - h["lr"] * h["weight_decay"],
                          "the weight-decay factor 1 - lr * weight_decay", allow_one=True),)
        return out

    @property
    def weight_decay_name(self):
        return "decoupled_decay" if self._decoupled() else None

    def increment(self, name, g, new, h, d, c, k):
        if name == "m":
            return c["b1"] * g
        return c["b2"] * (g * g)

    def update(self, new, h, d, c, k):
        m_hat = new["m"] / (1 - d["b1"] ** k)
        s_hat = new["s"] / (1 - d["b2"] ** k)
        return -h["lr"] * (m_hat / (safe_sqrt(s_hat) + h["eps"]))


def adam(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0) -> Adam:
    """Adam (weight_decay = 0) or AdamW (decoupled weight decay), as optax.adam/optax.adamw.

        m <- b1 m + (1 - b1) g;  s <- b2 s + (1 - b2) g^2
        w <- (1 - lr wd) w - lr m_hat / (sqrt(s_hat) + eps)   (bias-corrected m_hat, s_hat)

    Args:
      lr: the learning rate: a scalar, a [steps] schedule, or a pytree prefix of params0
        whose leaves are scalars, [steps] schedules, per-weight arrays or [steps, *shape].
      b1: the first moment's decay in (0, 1), same shapes; applied as
        round(b1 2^24) / 2^24.
      b2: the second moment's decay in (0, 1), same shapes and grid as b1.
      eps: > 0, added to sqrt(s_hat), same shapes.
      weight_decay: >= 0, same shapes; w is multiplied by 1 - lr wd each step, applied as
        round((1 - lr wd) 2^32) / 2^32. The Python number 0 (the default) turns it off
        and is not differentiated.

    Returns:
      An `Adam` rule (a pytree of its hyperparameters) for `revlearn.train`'s
      `optimizer=`. Its state is `AdamState(count, m, s)`; `count` continues the bias
      corrections when a run starts from the state another returned.

    Raises:
      ValueError: (from `train`, before anything runs) b1 or b2 outside (0, 1) on their
        grid, eps <= 0, a negative weight decay, a non-finite value, or a shape that fits
        neither `steps` nor params0.

    Example:
        ```python
        opt = revlearn.optim.adam(1e-3, b1=0.9, weight_decay=1e-4)      # AdamW
        w_T, state = revlearn.train(loss_fn, params0, optimizer=opt, steps=100,
                                    return_state=True)
        # differentiate w.r.t. b1: Reversible needs a lower bound to size its buffer
        d_b1 = jax.grad(lambda b1: meta_fn(revlearn.train(
            loss_fn, params0, optimizer=revlearn.optim.adam(1e-3, b1=b1), steps=100,
            method=revlearn.Reversible(min_decay={"b1": 0.5}))))(0.9)
        ```
    """
    return Adam(lr, b1, b2, eps, weight_decay)
