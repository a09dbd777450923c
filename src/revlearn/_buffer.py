"""The information buffer: exact multiplication of fixed-point velocities by gamma.

Multiplying V by gamma = n / 2^16 destroys log2(2^16 / n) bits per weight; the
buffer keeps exactly those bits, so that dividing by gamma restores V
(Maclaurin et al. 2015, Algorithm 3). Write V = a 2^16 + r (0 <= r < 2^16).
One step encodes r into the buffer and decodes s in [0, n) from it, and sets
V' = a n + s. Both are steps of an rANS coder with state x >= 0 and total
frequency M = 2^31 (Duda 2013):

    encode r ~ U[0, 2^16) (f = 2^15, slot start r 2^15):
        x1 = (x >> 15) 2^31 + y,   y = r 2^15 + (x mod 2^15)
    decode s ~ U[0, n) (f_s = q + [s < rem], c_s = s q + min(s, rem),
                        q = M div n, rem = M mod n):
        s: c_s <= y < c_s + f_s,   x' = f_s (x1 >> 31) + y - c_s

and V / gamma runs the same two maps backwards. Each is a bijection for every
x >= 0, so the pair of passes is exact. Because s is decoded from the slot
that r was encoded into, s = r n / 2^16 to within about one unit: V' is V gamma
rounded to within a unit or two of 2^-k, as exact arithmetic would round it.

x grows by at most the factor f_s / 2^15 <= (q + 1) / 2^15 per step (about
1 / gamma); before a step would take x past 2^47 (so that x1 < 2^63), its low
16 bits are *spilled* to a stack of 16-bit words. When to spill is decided not
from x (the backward pass could not tell whether it did) but from a bound that
depends on the momentum schedule alone: an integer m, in units of 2^-32 bits,
with x < 2^(m / 2^32). Per step

    m += inc(n),   inc(n) >= 2^32 (log2((q + 1) / 2^15) + log2(1 + 2^-16)),

which keeps the bound valid while m >= 31 2^32 (x' < (q + 1) / 2^15 (x + 2^15)),
and a spill (x >>= 16, m -= 16 2^32) happens iff m would pass 47 2^32. The
invariant m in (31 2^32, 47 2^32] makes the spill decision invertible: step t
spilled iff m_{t+1} <= 31 2^32 + inc(n_t). inc < 16 2^32 needs n >= 2.

So the buffer's size is set by the schedule, not by the data: sum_t inc(n_t)
/ 2^32 bits per weight, within 7e-5 bits per step of the information-theoretic
minimum sum_t log2(1 / gamma_t), plus the 64-bit x. Weights that share one
momentum entry (a whole layer, usually) share m and the stack head, so a spill
writes one dense row of the stack; per-weight momentum gives per-weight heads
(a scatter, still exact).

Shapes (`Buffer`, one leaf of shape S; B = shape of its momentum entry,
broadcastable to S): x [*S] int64, m and head [*B], stack [capacity + 1, *S]
uint16 (the last row is scratch for steps that do not spill). `multiply` and
`divide` act on one `Buffer`; the reversible core calls their parts (`advance`
/ `retreat` on m, `encode` / `decode` elementwise on x, `push` / `pop` on the
stack) on its packed layout.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

WORD_BITS = 16
UNIT = 1 << 32                      # m counts bits in units of 2^-32
LOW = 31                            # invariant: m in (LOW, HIGH] bits
HIGH = 47                           # x < 2^47, so x 2^16 + r < 2^63
X0 = 1 << 30                        # the empty buffer: x = 2^30 < 2^(M0 / UNIT)
M0 = LOW * UNIT + 1
PRECISION = 1 << 31                 # total frequency M of the coder
INC_MARGIN = 8                      # units; covers the rounding of the log2 below
SLACK_BITS = 2.2013711e-05          # > log2(1 + 2^-16), from x + 2^15 <= x (1 + 2^-16) for x >= 2^31
MIN_NUMERATOR = 2                   # inc(n) < 16 bits needs n >= 2


class Buffer(NamedTuple):
    """One leaf's buffer: `x` [*S] int64, `m`, `head` [*B] int64 / int32, `stack` [cap + 1, *S] uint16."""

    x: jax.Array
    m: jax.Array
    head: jax.Array
    stack: jax.Array


def empty(shape: tuple, entry_shape: tuple, capacity: int) -> Buffer:
    """A buffer holding no information for a leaf of `shape` whose momentum entry has `entry_shape`."""
    return Buffer(x=jnp.full(shape, X0, jnp.int64),
                  m=jnp.full(entry_shape, M0, jnp.int64),
                  head=jnp.zeros(entry_shape, jnp.int32),
                  stack=jnp.zeros((capacity + 1,) + tuple(shape), jnp.uint16))


def is_empty(buf: Buffer) -> jax.Array:
    """True iff the buffer is back at its initial state (every word popped, x and m restored)."""
    return at_start(buf.x, (buf.m,), (buf.head,))


def at_start(x: jax.Array, ms, heads) -> jax.Array:
    """`is_empty` for an x shared by several bounds and heads (the packed layout's leaves)."""
    out = jnp.all(x == X0)
    for m, head in zip(ms, heads):
        out &= jnp.all(m == M0) & jnp.all(head == 0)
    return out


def bits_reserved(head: jax.Array, m: jax.Array) -> jax.Array:
    """Bits per weight the buffer has taken since it was empty [*B]: 16 head + (m - M0) / 2^32."""
    return WORD_BITS * head.astype(jnp.float64) + (m - M0).astype(jnp.float64) / UNIT


class Coding(NamedTuple):
    """The coder's table for U[0, n), per momentum entry (any shape B): n, q = M div n,
    rem = M mod n, the spill bound's increment inc(n) (int64), and the float64
    reciprocals of n, q and q + 1 that seed the exact divisions."""

    n: jax.Array
    q: jax.Array
    rem: jax.Array
    inc: jax.Array
    inv_n: jax.Array
    inv_q: jax.Array
    inv_q1: jax.Array


def coding(n: jax.Array) -> Coding:
    """The table for integer numerators n in [2, 65535] (clipped into that range).

    Built once per call; the backward pass reuses the forward pass's table, so
    the floating-point rounding of inc cannot differ between the passes.
    """
    n = jnp.clip(jnp.asarray(n, jnp.int64), MIN_NUMERATOR, 65535)
    inv_n = 1.0 / n.astype(jnp.float64)
    q, rem = _divmod(jnp.full(n.shape, PRECISION, jnp.int64), n, inv_n)
    bits = jnp.log2((q + 1).astype(jnp.float64)) - 15.0 + SLACK_BITS
    inc = jnp.ceil(bits * UNIT).astype(jnp.int64) + INC_MARGIN
    return Coding(n, q, rem, inc, inv_n, 1.0 / q.astype(jnp.float64),
                  1.0 / (q + 1).astype(jnp.float64))


def increments_np(n: np.ndarray) -> np.ndarray:
    """`coding(n).inc` in numpy, for sizing the stack on the host (one unit more margin)."""
    n = np.clip(np.asarray(n, np.float64), MIN_NUMERATOR, 65535).astype(np.int64)
    q = PRECISION // n
    bits = np.log2((q + 1).astype(np.float64)) - 15.0 + SLACK_BITS
    return np.ceil(bits * UNIT).astype(np.int64) + INC_MARGIN + 1


def capacity_words(total_increment_units: float) -> int:
    """Stack rows needed when the increments of all steps sum to at most the given units."""
    return int(math.ceil((M0 - LOW * UNIT + total_increment_units) / (WORD_BITS * UNIT)))


def _divmod(x: jax.Array, d: jax.Array, inv_d: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Exact floor division and remainder in [0, d) of int64 |x| < 2^63 by 2 <= d < 2^31.

    No 64-bit integer division (XLA cannot vectorise it): the float estimate
    q = floor(x * (1 / d)) is off by at most about 2^11, so the remainder it
    leaves is below 2^42 in magnitude and exact in float64; a second estimate
    from it is then off by at most one, and one integer correction makes the
    result exact. It is unique, so any fusion or rounding of the estimates
    gives the same bits.
    """
    q = jnp.floor(x.astype(jnp.float64) * inv_d).astype(jnp.int64)
    r = x - q * d
    q2 = jnp.floor(r.astype(jnp.float64) * inv_d).astype(jnp.int64)
    return _correct(q + q2, r - q2 * d, d)


def _divmod_small(x: jax.Array, d: jax.Array, inv_d: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`_divmod` where the quotient is below 2^46 in magnitude (e.g. 0 <= x < 2^48): the
    float estimate x * (1 / d) then has a relative error below 2^-51, an absolute one
    below 2^-5, so its floor is off by at most one."""
    q = jnp.floor(x.astype(jnp.float64) * inv_d).astype(jnp.int64)
    return _correct(q, x - q * d, d)


def _correct(q, r, d):
    """Quotient and remainder from an estimate whose remainder r lies in [-d, 2d)."""
    low, high = r < 0, r >= d
    q = q - low.astype(jnp.int64) + high.astype(jnp.int64)
    r = r + jnp.where(low, d, 0) - jnp.where(high, d, 0)
    return q, r


def advance(m: jax.Array, inc: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The forward bound update of one step [*B]: (spill before it, m after it)."""
    m = m + inc
    spill = m > HIGH * UNIT
    return spill, m - jnp.where(spill, WORD_BITS * UNIT, 0)


def retreat(m: jax.Array, inc: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Inverse of `advance`: (whether the step spilled, m before it)."""
    spill = m <= LOW * UNIT + inc
    return spill, m - inc + jnp.where(spill, WORD_BITS * UNIT, 0)


def _kept(z: jax.Array, one) -> jax.Array:
    """z (int64, 0 <= z < 2^53) unchanged, computed once.

    XLA CPU has no multi-output fusion: each array a step writes is its own
    kernel, and integer work shared by two of them is recomputed in both.
    Dividing by `one` (a float64 1.0 that the compiler cannot prove constant)
    is exact for such z but counts as expensive, so XLA materialises z once
    instead. `one=None` leaves the choice to XLA.
    """
    if one is None:
        return z
    return (z.astype(jnp.float64) / one).astype(jnp.int64)


def encode(v: jax.Array, x: jax.Array, spill: jax.Array, c: Coding, one=None):
    """Elementwise core of `multiply` (any broadcastable shapes): V -> V n / 2^16.

    Returns (V', x', word): `word` is the low 16 bits of x before the step,
    which the caller must push where `spill`. `one`: see `_kept`.
    """
    word = (x & 0xFFFF).astype(jnp.uint16)
    x = jnp.where(spill, x >> WORD_BITS, x)
    # encode r = V mod 2^16 into slot y of [0, 2^31), then decode s from that slot
    y = ((v & 0xFFFF) << 15) | (x & 0x7FFF)
    split = c.rem * (c.q + 1)            # slots [0, split) belong to symbols of frequency q + 1
    low = y < split
    t, _ = _divmod_small(jnp.where(low, y, y - split), jnp.where(low, c.q + 1, c.q),
                         jnp.where(low, c.inv_q1, c.inv_q))
    z = _kept((jnp.where(low, t, c.rem + t) << 31) | y, one)    # s < 2^16, y < 2^31
    s, y = z >> 31, z & 0x7FFFFFFF
    f, start = _frequency(s, c)
    x = f * (x >> 15) + (y - start)
    return (v >> 16) * c.n + s, x, word


def decode(v: jax.Array, x: jax.Array, spill: jax.Array, word: jax.Array, c: Coding, one=None):
    """Exact inverse of `encode`: (V', x', spill, the word pushed) -> (V, x). `one`: see `_kept`."""
    # v = a n + s with |a| < 2^46 (a = V >> 16 of the forward step), so one float
    # estimate of a is off by at most one, as in `_divmod_small`
    _, s = _divmod_small(v, c.n, c.inv_n)
    f, _ = _frequency(s, c)
    _, lo = _divmod_small(x, f, jnp.where(s < c.rem, c.inv_q1, c.inv_q))
    z = _kept((s << 31) | lo, one)                      # s < 2^16, lo < f <= 2^30
    s, lo = z >> 31, z & 0x7FFFFFFF
    f, start = _frequency(s, c)
    # the quotients are exact divisions now (v - s = a n, x - lo = hi f) of results below
    # 2^47, so a rounded float estimate is exact
    a = jnp.round((v - s).astype(jnp.float64) * c.inv_n).astype(jnp.int64)
    hi = jnp.round((x - lo).astype(jnp.float64)
                   * jnp.where(s < c.rem, c.inv_q1, c.inv_q)).astype(jnp.int64)
    y = lo + start                                      # encode s: x1 = hi 2^31 + y
    x = (hi << 15) | (y & 0x7FFF)                       # decode r = y >> 15
    x = jnp.where(spill, (x << WORD_BITS) | word.astype(jnp.int64), x)
    return (a << 16) | (y >> 15), x


def push(stack: jax.Array, head: jax.Array, spill: jax.Array, word: jax.Array):
    """Write `word` [*S] at row `head` where `spill` (stack [cap + 1, *S]; head and spill
    of one value, or per weight [*S]). Returns (stack, head, whether it was full)."""
    cap = stack.shape[0] - 1
    fits = head < cap
    full = jnp.any(spill & ~fits)
    if head.size == 1:
        row = jnp.where(spill & fits, head, cap).reshape(())
        stack = jax.lax.dynamic_update_index_in_dim(stack, word, row, axis=0)
    else:
        rows = jnp.broadcast_to(jnp.where(spill & fits, head, cap), word.shape).ravel()
        flat = stack.reshape(cap + 1, -1)
        flat = flat.at[rows, jnp.arange(flat.shape[1])].set(word.ravel(), mode="promise_in_bounds")
        stack = flat.reshape(stack.shape)
    return stack, head + spill.astype(jnp.int32), full


def pop(stack: jax.Array, head: jax.Array, spill: jax.Array):
    """Inverse of `push`: (the word at row head - 1 [*S], head, whether it ran empty)."""
    empty_ = jnp.any(spill & (head <= 0))
    rows = jnp.maximum(head - 1, 0)
    if head.size == 1:
        word = jax.lax.dynamic_index_in_dim(stack, rows.reshape(()), axis=0, keepdims=False)
    else:
        shape = stack.shape[1:]
        flat = stack.reshape(stack.shape[0], -1)
        rows = jnp.broadcast_to(rows, shape).ravel()
        word = flat[rows, jnp.arange(flat.shape[1])].reshape(shape)
    return word, head - spill.astype(jnp.int32), empty_


def _frequency(s: jax.Array, c: Coding) -> tuple[jax.Array, jax.Array]:
    """(f_s, c_s) of symbol s under U[0, n)."""
    return c.q + (s < c.rem).astype(jnp.int64), s * c.q + jnp.minimum(s, c.rem)


def multiply(v: jax.Array, c: Coding, buf: Buffer) -> tuple[jax.Array, Buffer, jax.Array]:
    """V -> V n / 2^16 exactly (int64 V [*S]; table [*B]). Returns (V', buffer, stack full)."""
    spill, m = advance(buf.m, c.inc)
    v, x, word = encode(v, buf.x, spill, c)
    stack, head, full = push(buf.stack, buf.head, spill, word)
    return v, Buffer(x, m, head, stack), full


def divide(v: jax.Array, c: Coding, buf: Buffer) -> tuple[jax.Array, Buffer, jax.Array]:
    """Exact inverse of `multiply`: V' -> V' 2^16 / n. Returns (V, buffer, stack ran empty)."""
    spill, m = retreat(buf.m, c.inc)
    word, head, empty_ = pop(buf.stack, buf.head, spill)
    v, x = decode(v, buf.x, spill, word, c)
    return v, Buffer(x, m, head, buf.stack), empty_
