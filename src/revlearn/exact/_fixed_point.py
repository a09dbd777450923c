"""Fixed-point numbers: the exactly invertible representation of w and v.

A real value x is held as the int64 integer X = round(x * 2^k), k = `frac_bits`
(the paper: k = 52). Integer addition is exact and invertible, so

    W_{t+1} = W_t + Q(alpha_t * v_{t+1})   is undone by   W_t = W_{t+1} - Q(alpha_t * v_{t+1})

provided the float quantised by Q is bit-identical in both directions.
The range is |x| < 2^(62 - k) (1024 at k = 52): one bit below int64's, so the
sum of two in-range numbers never wraps and overflow is detected, not silent.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

INT_LIMIT = 2 ** 62


def to_float(x: jax.Array, frac_bits: int) -> jax.Array:
    """X [P] int64 -> X * 2^-k as float64 [P] (exact scaling by a power of two)."""
    return x.astype(jnp.float64) * (2.0 ** -frac_bits)


def round_checked(y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """round(y) as int64 for float64 y already in fixed-point units, and elementwise
    whether |y| < 2^62 (False where y is not finite; such entries give 0)."""
    ok = jnp.abs(y) < INT_LIMIT
    return jnp.round(jnp.where(ok, y, 0.0)).astype(jnp.int64), ok


def quantize(x: jax.Array, frac_bits: int) -> tuple[jax.Array, jax.Array]:
    """Q(x) = round(x * 2^k) as int64 [P], and a flag: any |x| out of range or non-finite."""
    q, ok = round_checked(jnp.asarray(x, jnp.float64) * (2.0 ** frac_bits))
    return q, ~jnp.all(ok)


def out_of_range(x: jax.Array) -> jax.Array:
    """True if any fixed-point X has |X| >= 2^62 (the sum of two in-range values cannot wrap)."""
    return jnp.any((x >= INT_LIMIT) | (x <= -INT_LIMIT))


def out_of_range_mask(x: jax.Array) -> jax.Array:
    """Elementwise `out_of_range` (bool, like x)."""
    return (x >= INT_LIMIT) | (x <= -INT_LIMIT)
