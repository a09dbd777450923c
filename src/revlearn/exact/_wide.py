"""Wide (128-bit) non-negative fixed point: for moments with a wide dynamic range.

Adam's second moment s holds a running mean of g^2, which spans 1e-20 to 1e2
across weights and steps, and its update reads it relatively (g / sqrt(s)):
a 64-bit fixed point with steps of 2^-54 rounds s = 1e-13 to 5e-4 of itself,
and the trajectory drifts away from floating-point Adam. Here a value v >= 0 is
held as the 128-bit integer X = round(v 2^(k + 64)) in two uint64 words,
X = hi 2^64 + lo: hi has the weights' steps 2^-k and range (hi < 2^62, so
v < 2^(62 - k), 1024 at k = 52) and lo 64 more bits (steps 2^-116 at k = 52,
relative precision 1e-15 down to v = 1e-20).

Integer addition is exact and invertible as before (with a carry from lo to
hi). The multiplication by a decay n / 2^d (`multiply`) is the one of
`_buffer` on X: r = X mod 2^d goes into the coder, s comes out, and
X' = (X >> d) n + s; its inverse (`divide`) finds s = X' mod n and
X >> d = (X' - s) / n by a long division in 32-bit limbs. Decay grids with
d <= 24 only (n < 2^24 keeps each limb's partial remainder below 2^56).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from . import _buffer
from ._grid import Grid

U = jnp.uint64
M32 = (1 << 32) - 1
HI_LIMIT = 1 << 62


class Wide(NamedTuple):
    """X = hi 2^64 + lo >= 0: two uint64 arrays of one shape."""

    hi: jax.Array
    lo: jax.Array


def _u(x):
    return jnp.asarray(x).astype(U)


def quantize(v: jax.Array, k: int) -> tuple[Wide, jax.Array]:
    """round(v 2^(k + 64)) for float64 v >= 0, and elementwise whether v was in range
    (0 <= v < 2^(62 - k), finite); out-of-range entries give 0.

    Every float <-> integer conversion here is of a value below 2^62 through int64: XLA CPU
    converts float64 to and from uint64 above 2^63 by sequences that need not give the same
    bits in every fusion, and the two passes must agree to the bit."""
    y = jnp.asarray(v, jnp.float64) * (2.0 ** k)
    ok = (y >= 0) & (y < HI_LIMIT)                     # False for nan
    y = jnp.where(ok, y, 0.0)
    hi = jnp.floor(y)
    f = (y - hi) * 2.0 ** 32                           # y - hi is exact; the fraction in [0, 2^32)
    f1 = jnp.floor(f)
    f0 = jnp.round((f - f1) * 2.0 ** 32)               # <= 2^32
    lo = (_u(f1.astype(jnp.int64)) << 32) + _u(f0.astype(jnp.int64))
    return Wide(_u(hi.astype(jnp.int64)), lo), ok


def to_float(x: Wide, k: int) -> jax.Array:
    """X 2^-(k + 64) as float64 (conversions of values below 2^62 only, see `quantize`)."""
    f = lambda a: a.astype(jnp.int64).astype(jnp.float64)
    lo = f(x.lo >> 32) * 2.0 ** 32 + f(x.lo & M32)     # the product is exact: one rounding
    return f(x.hi) * (2.0 ** -k) + lo * (2.0 ** -(k + 64))


def add(a: Wide, b: Wide) -> Wide:
    lo = a.lo + b.lo
    return Wide(a.hi + b.hi + (lo < a.lo).astype(U), lo)


def sub(a: Wide, b: Wide) -> Wide:
    return Wide(a.hi - b.hi - (a.lo < b.lo).astype(U), a.lo - b.lo)


def out_of_range_mask(x: Wide) -> jax.Array:
    """Elementwise: X >= 2^126 (v >= 2^(62 - k))."""
    return x.hi >= HI_LIMIT


def equal(a: Wide, b: Wide) -> jax.Array:
    return jnp.all(a.hi == b.hi) & jnp.all(a.lo == b.lo)


def _mul_add(a: Wide, n: jax.Array, s: jax.Array) -> Wide:
    """a n + s for n < 2^32, s < n (no overflow while a n < 2^128)."""
    n, s = _u(n), _u(s)
    p0 = (a.lo & M32) * n                                # < 2^64
    p1 = (a.lo >> 32) * n                                # < 2^64
    lo = p0 + (p1 << 32)
    hi = a.hi * n + (p1 >> 32) + (lo < p0).astype(U)
    lo2 = lo + s
    return Wide(hi + (lo2 < lo).astype(U), lo2)


def _divmod(x: Wide, n: jax.Array, inv_n: jax.Array, one=None) -> tuple[Wide, jax.Array]:
    """(X div n, X mod n) for 2 <= n < 2^24, by long division in four 32-bit limbs; each
    partial remainder r 2^32 + limb < 2^56 is divided exactly by `_buffer._divmod_small`.
    `one` (see `_buffer._kept`): each quotient limb and remainder is computed once, not once
    per array that reads it."""
    n = jnp.asarray(n, jnp.int64)
    rem = jnp.zeros(jnp.broadcast_shapes(x.hi.shape, jnp.shape(n)), jnp.int64)
    qs = []
    for limb in (x.hi >> 32, x.hi & M32, x.lo >> 32, x.lo & M32):
        q, rem = _buffer._divmod_small((rem << 32) | limb.astype(jnp.int64), n, inv_n)
        rem = _buffer._kept(rem, one)
        qs.append(_u(_buffer._kept(q, one)))
    return Wide((qs[0] << 32) | qs[1], (qs[2] << 32) | qs[3]), rem


def encode(v: Wide, x: jax.Array, spill: jax.Array, c: _buffer.Coding, grid: Grid, one=None):
    """`_buffer.encode` on a wide X: X -> X n / 2^d exactly. Returns (X', x', word).
    `one`: see `_buffer._kept`."""
    d = grid.bits
    s, x, word = _buffer.code((v.lo & _u((1 << d) - 1)).astype(jnp.int64), x, spill, c, one, grid)
    a = Wide(v.hi >> d, (v.lo >> d) | (v.hi << (64 - d)))
    return _mul_add(a, c.n, s), x, word


def decode(v: Wide, x: jax.Array, spill: jax.Array, word: jax.Array, c: _buffer.Coding,
           grid: Grid, one=None):
    """Exact inverse of `encode`: (X', x', spill, the word pushed) -> (X, x)."""
    d = grid.bits
    a, s = _divmod(v, c.n, c.inv_n, one)
    r, x, _ = _buffer.uncode(s, x, spill, word, c, one, grid)
    return Wide((a.hi << d) | (a.lo >> (64 - d)), (a.lo << d) | _u(r)), x
