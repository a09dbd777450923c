"""The information buffer: exact multiplication of fixed-point state by a decay.

Multiplying X by gamma = n / 2^d (a decay on the grid `g`, see `_grid`)
destroys log2(2^d / n) bits per element; the buffer keeps exactly those bits,
so that dividing by gamma restores X (Maclaurin et al. 2015, Algorithm 3).
Write X = a 2^d + r (0 <= r < 2^d). One step encodes r into the buffer and
decodes s in [0, n) from it, and sets X' = a n + s. Both are steps of an rANS
coder with state x >= 0 and total frequency M = 2^p (Duda 2013), p = the
grid's precision, f_r = 2^(p - d) = 2^slot_bits:

    encode r ~ U[0, 2^d) (f = f_r, slot start r f_r):
        x1 = (x >> slot_bits) 2^p + y,   y = r f_r + (x mod f_r)
    decode s ~ U[0, n) (f_s = q + [s < rem], c_s = s q + min(s, rem),
                        q = M div n, rem = M mod n):
        s: c_s <= y < c_s + f_s,   x' = f_s (x1 >> p) + y - c_s

and X / gamma runs the same two maps backwards. Each is a bijection for every
x >= 0, so the pair of passes is exact. Because s is decoded from the slot
that r was encoded into, s = r n / 2^d to within about one unit: X' is X gamma
rounded to within a unit or two of the fixed-point step, as exact arithmetic
would round it.

x grows by at most the factor f_s / f_r <= (q + 1) / f_r per step (about
1 / gamma); before a step would take x past 2^HIGH (HIGH = 63 - d, so that
x1 < 2^63), its low word (word_bits bits) is *spilled* to a stack of words.
When to spill is decided not from x (the backward pass could not tell
whether it did) but from a bound that depends on the decay schedule alone:
an integer m, in units of 2^-32 bits, with x < 2^(m / 2^32). Per step

    m += inc(n),   inc(n) >= 2^32 (log2((q + 1) / f_r) + log2(1 + f_r / 2^LOW)),

which keeps the bound valid (x' < (q + 1) / f_r (x + f_r), and for x < 2^LOW
the bound holds anyway), and a spill (x >>= word_bits, m -= word_bits 2^32)
happens iff m would pass HIGH 2^32. The invariant m in (LOW 2^32, HIGH 2^32]
(LOW = HIGH - word_bits) makes the spill decision invertible: step t spilled
iff m_{t+1} <= LOW 2^32 + inc(n_t). inc < word_bits 2^32 needs n >= the
grid's min_numerator.

So the buffer's size is set by the schedule, not by the data: sum_t inc(n_t)
/ 2^32 bits per element, within the grid's overheads (`_grid`) of the
information-theoretic minimum sum_t log2(1 / gamma_t), plus the 64-bit x.
Elements that share one decay entry (a whole layer, usually) share m and the
stack head, so a spill writes one dense row of the stack; per-element decays
give per-element heads (a scatter, still exact).

Shapes (`Buffer`, one leaf of shape S; B = shape of its decay entry,
broadcastable to S): x [*S] int64, m and head [*B], stack [capacity + 1, *S]
of words (the last row is scratch for steps that do not spill). `multiply`
and `divide` act on one `Buffer`; the reversible method calls their parts
(`advance` / `retreat` on m, `encode` / `decode` elementwise on x, `push` /
`pop` on the stack) on its packed layout. Every function takes the grid;
its default, `_grid.MOMENTUM`, is heavy-ball momentum's.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._grid import MOMENTUM, Grid

UNIT = 1 << 32                      # m counts bits in units of 2^-32
INC_MARGIN = 8                      # units; covers the rounding of the log2 in inc(n)
# heavy-ball momentum's grid, by name (revlearn 0.1's constants)
WORD_BITS = MOMENTUM.word_bits
LOW = MOMENTUM.low                  # invariant: m in (LOW, HIGH] bits
HIGH = MOMENTUM.high                # x < 2^47, so x 2^16 + r < 2^63
MIN_NUMERATOR = MOMENTUM.min_numerator


def x0(grid: Grid = MOMENTUM) -> int:
    """The empty buffer's x = 2^(LOW - 1) < 2^(m0 / UNIT)."""
    return 1 << (grid.low - 1)


def m0(grid: Grid = MOMENTUM) -> int:
    return grid.low * UNIT + 1


X0 = x0()
M0 = m0()


class Buffer(NamedTuple):
    """One leaf's buffer: `x` [*S] int64, `m`, `head` [*B] int64 / int32, `stack` [cap + 1, *S] words."""

    x: jax.Array
    m: jax.Array
    head: jax.Array
    stack: jax.Array


def empty(shape: tuple, entry_shape: tuple, capacity: int, grid: Grid = MOMENTUM) -> Buffer:
    """A buffer holding no information for a leaf of `shape` whose decay entry has `entry_shape`."""
    return Buffer(x=jnp.full(shape, x0(grid), jnp.int64),
                  m=jnp.full(entry_shape, m0(grid), jnp.int64),
                  head=jnp.zeros(entry_shape, jnp.int32),
                  stack=jnp.zeros((capacity + 1,) + tuple(shape), grid.word_dtype))


def is_empty(buf: Buffer, grid: Grid = MOMENTUM) -> jax.Array:
    """True iff the buffer is back at its initial state (every word popped, x and m restored)."""
    return at_start(buf.x, (buf.m,), (buf.head,), grid)


def at_start(x: jax.Array, ms, heads, grid: Grid = MOMENTUM) -> jax.Array:
    """`is_empty` for an x shared by several bounds and heads (the packed layout's leaves)."""
    out = jnp.all(x == x0(grid))
    for m, head in zip(ms, heads):
        out &= jnp.all(m == m0(grid)) & jnp.all(head == 0)
    return out


def bits_reserved(head: jax.Array, m: jax.Array, grid: Grid = MOMENTUM) -> jax.Array:
    """Bits per element the buffer has taken since it was empty [*B]: words + (m - m0) / 2^32."""
    return (grid.word_bits * head.astype(jnp.float64)
            + (m - m0(grid)).astype(jnp.float64) / UNIT)


class Coding(NamedTuple):
    """The coder's table for U[0, n), per decay entry (any shape B): n, q = M div n,
    rem = M mod n, the spill bound's increment inc(n) (int64), and the float64
    reciprocals of n, q and q + 1 that seed the exact divisions."""

    n: jax.Array
    q: jax.Array
    rem: jax.Array
    inc: jax.Array
    inv_n: jax.Array
    inv_q: jax.Array
    inv_q1: jax.Array


def coding(n: jax.Array, grid: Grid = MOMENTUM) -> Coding:
    """The table for integer numerators n (clipped into [min_numerator, 2^d]; n = 2^d, the
    decay 1, is the identity and loses nothing).

    Built once per call; the backward pass reuses the forward pass's table, so
    the floating-point rounding of inc cannot differ between the passes.
    """
    n = jnp.clip(jnp.asarray(n, jnp.int64), grid.min_numerator, grid.denominator)
    inv_n = 1.0 / n.astype(jnp.float64)
    q, rem = _divmod(jnp.full(n.shape, 1 << grid.precision, jnp.int64), n, inv_n)
    bits = jnp.log2((q + 1).astype(jnp.float64)) - grid.slot_bits + grid.slack_bits
    inc = jnp.ceil(bits * UNIT).astype(jnp.int64) + INC_MARGIN
    return Coding(n, q, rem, inc, inv_n, 1.0 / q.astype(jnp.float64),
                  1.0 / (q + 1).astype(jnp.float64))


def increments_np(n: np.ndarray, grid: Grid = MOMENTUM) -> np.ndarray:
    """`coding(n).inc` in numpy, for sizing the stack on the host (one unit more margin)."""
    n = np.clip(np.asarray(n, np.float64), grid.min_numerator, grid.denominator).astype(np.int64)
    q = (1 << grid.precision) // n
    bits = np.log2((q + 1).astype(np.float64)) - grid.slot_bits + grid.slack_bits
    return np.ceil(bits * UNIT).astype(np.int64) + INC_MARGIN + 1


def capacity_words(total_increment_units: float, grid: Grid = MOMENTUM) -> int:
    """Stack rows needed when the increments of all steps sum to at most the given units."""
    return int(math.ceil((m0(grid) - grid.low * UNIT + total_increment_units)
                         / (grid.word_bits * UNIT)))


def _divmod(x: jax.Array, d: jax.Array, inv_d: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Exact floor division and remainder in [0, d) of int64 |x| < 2^63 by 2 <= d < 2^32.

    No 64-bit integer division (XLA cannot vectorise it): the float estimate
    q = floor(x * (1 / d)) is off by at most about 2^11, so the remainder it
    leaves is below 2^43 in magnitude and exact in float64; a second estimate
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


def advance(m: jax.Array, inc: jax.Array, grid: Grid = MOMENTUM) -> tuple[jax.Array, jax.Array]:
    """The forward bound update of one step [*B]: (spill before it, m after it)."""
    m = m + inc
    spill = m > grid.high * UNIT
    return spill, m - jnp.where(spill, grid.word_bits * UNIT, 0)


def retreat(m: jax.Array, inc: jax.Array, grid: Grid = MOMENTUM) -> tuple[jax.Array, jax.Array]:
    """Inverse of `advance`: (whether the step spilled, m before it)."""
    spill = m <= grid.low * UNIT + inc
    return spill, m - inc + jnp.where(spill, grid.word_bits * UNIT, 0)


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


def encode(v: jax.Array, x: jax.Array, spill: jax.Array, c: Coding, one=None,
           grid: Grid = MOMENTUM):
    """Elementwise core of `multiply` (any broadcastable shapes): X -> X n / 2^d.

    Returns (X', x', word): `word` is the low word of x before the step,
    which the caller must push where `spill`. `one`: see `_kept` (symbol and slot kept
    together where they fit in 53 bits, else each).
    """
    s, x, word = code(v & ((1 << grid.bits) - 1), x, spill, c, one, grid)
    return (v >> grid.bits) * c.n + s, x, word


def code(r: jax.Array, x: jax.Array, spill: jax.Array, c: Coding, one=None,
         grid: Grid = MOMENTUM):
    """The coder's half of `encode`: take r in [0, 2^d) into x, give s in [0, n) out of it
    (s = r n / 2^d to within about one). Returns (s, x', word)."""
    sb, p = grid.slot_bits, grid.precision
    word = (x & ((1 << grid.word_bits) - 1)).astype(grid.word_dtype)
    x = jnp.where(spill, x >> grid.word_bits, x)
    # encode r into slot y of [0, 2^p), then decode s from that slot
    y = (r << sb) | (x & ((1 << sb) - 1))
    if grid.proportional:
        # the largest s with floor(s M / n) <= y: floor(((y + 1) n - 1) / M), with (y + 1) n
        # (up to 2^75) split at bit 21 so that no product passes 2^54
        z = y + 1
        s = ((z >> 21) * c.n + (((z & ((1 << 21) - 1)) * c.n - 1) >> 21)) >> (p - 21)
    else:
        split = c.rem * (c.q + 1)        # slots [0, split) belong to symbols of frequency q + 1
        low = y < split
        t, _ = _divmod_small(jnp.where(low, y, y - split), jnp.where(low, c.q + 1, c.q),
                             jnp.where(low, c.inv_q1, c.inv_q))
        s = jnp.where(low, t, c.rem + t)
    if one is not None and grid.packs:
        z = _kept((s << p) | y, one)     # s < 2^d, y < 2^p, d + p <= 53
        s, y = z >> p, z & ((1 << p) - 1)
    elif one is not None:
        s = _kept(s, one)                # s < 2^32
    f, start = _frequency(s, c, grid)
    x = f * (x >> sb) + (y - start)
    return s, x, word


def decode(v: jax.Array, x: jax.Array, spill: jax.Array, word: jax.Array, c: Coding, one=None,
           grid: Grid = MOMENTUM):
    """Exact inverse of `encode`: (X', x', spill, the word pushed) -> (X, x). `one`: see `_kept`."""
    # v = a n + s with |a| < 2^(62 - d) (a = X >> d of the forward step), so one float
    # estimate of a is off by at most one, as in `_divmod_small`
    _, s = _divmod_small(v, c.n, c.inv_n)
    r, x, s = uncode(s, x, spill, word, c, one, grid)
    # v - s = a n exactly, a below 2^47: a rounded float estimate is exact
    a = jnp.round((v - s).astype(jnp.float64) * c.inv_n).astype(jnp.int64)
    return (a << grid.bits) | r, x


def uncode(s: jax.Array, x: jax.Array, spill: jax.Array, word: jax.Array, c: Coding, one=None,
           grid: Grid = MOMENTUM):
    """Exact inverse of `code`: (s, x', spill, the word pushed) -> (r, x, s), s as computed
    once (`_kept`) for the caller to reuse."""
    sb, p = grid.slot_bits, grid.precision
    if one is not None and grid.packs:
        f, _ = _frequency(s, c, grid)
        _, lo = _divmod_small(x, f, jnp.where(f > c.q, c.inv_q1, c.inv_q))
        z = _kept((s << p) | lo, one)                   # s < 2^d, lo < f <= 2^p
        s, lo = z >> p, z & ((1 << p) - 1)
        f, start = _frequency(s, c, grid)
    else:
        # s and its slots once, each (f <= 2^(p - d + 8), start < 2^p < 2^53)
        f, start = _frequency(_kept(s, one), c, grid)
        f, start = _kept(f, one), _kept(start, one)
        _, lo = _divmod_small(x, f, jnp.where(f > c.q, c.inv_q1, c.inv_q))
        lo = _kept(lo, one)
    # x - lo = hi f exactly, hi below 2^47: a rounded float estimate is exact
    hi = jnp.round((x - lo).astype(jnp.float64)
                   * jnp.where(f > c.q, c.inv_q1, c.inv_q)).astype(jnp.int64)
    y = lo + start                                      # encode s: x1 = hi 2^p + y
    x = (hi << sb) | (y & ((1 << sb) - 1))              # decode r = y >> slot_bits
    x = jnp.where(spill, (x << grid.word_bits) | word.astype(jnp.int64), x)
    return y >> sb, x, s


def push(stack: jax.Array, head: jax.Array, spill: jax.Array, word: jax.Array):
    """Write `word` [*S] at row `head` where `spill` (stack [cap + 1, *S]; head and spill
    of one value, or per element [*S]). Returns (stack, head, whether it was full)."""
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


def _frequency(s: jax.Array, c: Coding, grid: Grid = MOMENTUM) -> tuple[jax.Array, jax.Array]:
    """(f_s, c_s) of symbol s under U[0, n): on a proportional grid c_s = floor(s M / n) =
    s q + floor(s rem / n) and f_s = c_{s+1} - c_s, else the q + 1 symbols first."""
    if not grid.proportional:
        return c.q + (s < c.rem).astype(jnp.int64), s * c.q + jnp.minimum(s, c.rem)
    # s rem < n^2 may pass 2^63: split s at bit 16, (s_hi rem) = a n + b, so that
    # s rem = a 2^16 n + (b 2^16 + s_lo rem), every term below 2^49
    a, b = _divmod_small((s >> 16) * c.rem, c.n, c.inv_n)
    a2, b2 = _divmod_small((b << 16) + (s & 0xFFFF) * c.rem, c.n, c.inv_n)
    return c.q + (b2 + c.rem >= c.n).astype(jnp.int64), s * c.q + (a << 16) + a2


def multiply(v: jax.Array, c: Coding, buf: Buffer, grid: Grid = MOMENTUM):
    """X -> X n / 2^d exactly (int64 X [*S]; table [*B]). Returns (X', buffer, stack full)."""
    spill, m = advance(buf.m, c.inc, grid)
    v, x, word = encode(v, buf.x, spill, c, grid=grid)
    stack, head, full = push(buf.stack, buf.head, spill, word)
    return v, Buffer(x, m, head, stack), full


def divide(v: jax.Array, c: Coding, buf: Buffer, grid: Grid = MOMENTUM):
    """Exact inverse of `multiply`: X' -> X' 2^d / n. Returns (X, buffer, stack ran empty)."""
    spill, m = retreat(buf.m, c.inc, grid)
    word, head, empty_ = pop(buf.stack, buf.head, spill)
    v, x = decode(v, buf.x, spill, word, c, grid=grid)
    return v, Buffer(x, m, head, buf.stack), empty_
