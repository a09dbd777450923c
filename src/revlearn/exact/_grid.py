"""Decay grids: the values a decay (momentum, Adam's b1 and b2, a weight-decay factor) can take.

Exact reversal multiplies fixed-point state X by a decay gamma and later divides
it back, so gamma must be a ratio of integers: gamma = n / 2^d, n an integer
numerator, d the grid's bits. The bits that the multiplication destroys,
log2(2^d / n) per element, go to the information buffer (`_buffer`), whose
coder is parameterised by the grid too:

    bits d      decay = n / 2^d; a decay is applied as round(gamma 2^d) / 2^d
    word_bits   the buffer spills words of this many bits
    precision   the coder's total frequency M = 2^precision

With HIGH = 63 - d the coder keeps its state x < 2^HIGH before a step (so that
x 2^d < 2^63), LOW = HIGH - word_bits after a spill, and reserves per step at most

    log2(2^d / n) + log2(1 + 2^(d - precision))  + log2(1 + 2^(precision - d - LOW))
    (information)   (frequency rounding: q = M div n)   (slot rounding at x >= 2^LOW)

bits. Three grids cover the rules:

    MOMENTUM  d = 16, words 16, M = 2^31   heavy-ball momentum (revlearn 0.1's grid):
              0.9 -> 0.899994; overheads 4.4e-5 + 2.2e-5 bits per step
    FINE      d = 24, words 8,  M = 2^40   Adam's b1, b2, RMSProp's decay and momentum:
              0.999 -> 0.99900001; overheads 2.2e-5 + 4.4e-5 bits per step
    FINEST    d = 32, words 8,  M = 2^43   weight-decay factors 1 - lr wd (lr wd ~ 1e-7):
              resolution 2.3e-10; overheads 7.0e-4 + 3.5e-4 bits per step

Where symbol s in [0, n) sits among the coder's slots decides how closely
X' = a n + s follows X gamma: on MOMENTUM the symbols of frequency q + 1 come
first (revlearn 0.1's layout; within about one unit of X gamma), on the finer
grids s starts at slot floor(s M / n), so s = r n / 2^d within one unit there
too (the first layout would be off by up to 2^(d - slot_bits) / 4 units).

A decay must satisfy min_numerator <= n <= 2^d - 1, so that one step reserves
fewer bits than a word: gamma in [2/65536, 65535/65536] on MOMENTUM and
[2^-7, 1 - 2^-d] on the finer grids.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Grid(NamedTuple):
    """A decay grid n / 2^bits and the parameters of its buffer coder (see module docstring)."""

    bits: int
    word_bits: int
    precision: int
    slack_bits: float       # >= log2(1 + 2^(slot_bits - low)), the slot rounding per step
    proportional: bool = True   # symbol s starts at slot floor(s M / n) (else `_buffer._frequency`)

    @property
    def denominator(self) -> int:
        return 1 << self.bits

    @property
    def high(self) -> int:
        """x < 2^high before a step."""
        return 63 - self.bits

    @property
    def low(self) -> int:
        """The spill bound stays in (low, high] bits."""
        return self.high - self.word_bits

    @property
    def slot_bits(self) -> int:
        """log2 of the frequency 2^(precision - bits) of each symbol r in [0, 2^bits)."""
        return self.precision - self.bits

    @property
    def min_numerator(self) -> int:
        return max(2, self.denominator >> (self.word_bits - 1))

    @property
    def max_numerator(self) -> int:
        return self.denominator - 1

    @property
    def word_dtype(self):
        return {8: jnp.uint8, 16: jnp.uint16}[self.word_bits]

    @property
    def packs(self) -> bool:
        """Whether a symbol and a slot fit in 53 bits together (`_buffer._kept`)."""
        return self.bits + self.precision <= 53

    def smallest(self) -> float:
        return self.min_numerator / self.denominator

    def largest(self) -> float:
        return self.max_numerator / self.denominator


def _grid(bits: int, word_bits: int, precision: int) -> Grid:
    slot, low = precision - bits, 63 - bits - word_bits
    return Grid(bits, word_bits, precision, round(math.log2(1.0 + 2.0 ** (slot - low)) * 1.0001, 12))


MOMENTUM = Grid(bits=16, word_bits=16, precision=31, slack_bits=2.2013711e-05, proportional=False)
"""Heavy-ball momentum's grid, n / 2^16 (0.9 is applied as 0.8999939)."""
FINE = _grid(bits=24, word_bits=8, precision=40)
"""Adam's b1 and b2 and RMSProp's decay and momentum: n / 2^24 (0.999 -> 0.99900001)."""
FINEST = _grid(bits=32, word_bits=8, precision=43)
"""AdamW's weight-decay factor 1 - lr * weight_decay: n / 2^32 (resolution 2.3e-10)."""


def numerators(value, grid: Grid) -> jax.Array:
    """n = round(gamma 2^d) as int64 (float64 arithmetic, exact for gamma on the grid)."""
    return jnp.round(jnp.asarray(value, jnp.float64) * grid.denominator).astype(jnp.int64)


def numerators_np(value, grid: Grid) -> np.ndarray:
    return np.round(np.asarray(value, np.float64) * grid.denominator)


def on_grid(value: jax.Array, grid: Grid) -> jax.Array:
    """round(gamma 2^d) / 2^d in float64, with the derivative of the identity (straight-through):
    the value every method applies, differentiated as if it were gamma itself."""
    value = jnp.asarray(value, jnp.float64)
    q = jnp.round(value * grid.denominator) / grid.denominator
    return value + jax.lax.stop_gradient(q - value)


def applied(value, grid: Grid) -> np.ndarray:
    """The value a decay is applied as on `grid`: round(value 2^d) / 2^d.

    Args:
      value: a decay (a number or an array).
      grid: `revlearn.optim.MOMENTUM` (momentum, d = 16), `FINE` (Adam's b1, b2, RMSProp's
        decays, d = 24) or `FINEST` (AdamW's 1 - lr * weight_decay, d = 32).

    Returns:
      A float64 numpy array of value's shape: what every method multiplies by.

    Example:
        ```python
        revlearn.optim.applied(0.9, revlearn.optim.MOMENTUM)   # 0.89999390 (58982 / 65536)
        revlearn.optim.applied(0.999, revlearn.optim.FINE)     # 0.99900001
        ```
    """
    return numerators_np(value, grid) / grid.denominator


def top(grid: Grid, allow_one: bool) -> int:
    """The largest numerator: 2^d - 1, or 2^d (the decay 1, which loses nothing) when allowed."""
    return grid.denominator if allow_one else grid.max_numerator


def off_grid(value, grid: Grid, allow_one: bool = False) -> np.ndarray:
    """Elementwise: the decay's numerator is outside [min_numerator, max_numerator] (or not
    finite); `allow_one`: the decay may be exactly 1 (a weight-decay factor with wd = 0)."""
    n = numerators_np(value, grid)
    with np.errstate(invalid="ignore"):
        return ~((n >= grid.min_numerator) & (n <= top(grid, allow_one)))


def off_grid_traced(value, grid: Grid, allow_one: bool = False) -> jax.Array:
    n = jnp.round(jnp.asarray(value, jnp.float64) * grid.denominator)
    return ~((n >= grid.min_numerator) & (n <= top(grid, allow_one)))
