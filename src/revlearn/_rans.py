"""The information buffer: one streaming rANS coder per weight, vectorised.

Multiplying the fixed-point velocity by gamma = n / 2^16 destroys
log2(2^16 / n) bits per weight; the buffer keeps exactly those bits so that
division by gamma can restore them (Maclaurin et al. 2015, Algorithm 3):

    v * gamma:  r = v mod 2^16; push r ~ U[0, 2^16); v = (v div 2^16) * n;
                s = pop ~ U[0, n); v = v + s
    v / gamma:  s = v mod n; v = v div n; push s ~ U[0, n);
                r = pop ~ U[0, 2^16); v = v * 2^16 + r

Coder (per element p, precision M = 2^31): state x_p in [2^31, 2^63) (uint64)
plus a stack of 32-bit words (`stack[:, p]`, `head[p]` words in use). A symbol
with frequency f and start c (sum of frequencies M):

    encode:  if x >= 2^32 f: push the low word of x, x >>= 32
             x = (x div f) * M + (x mod f) + c
    decode:  y = x mod M; find s with c_s <= y < c_s + f_s
             x = f_s * (x div M) + y - c_s
             if x < 2^31: x = (x << 32) | pop a word

U[0, 2^16) has f = 2^15, c = r * 2^15. U[0, n) has f_s = q + [s < rem],
c_s = s q + min(s, rem) with q = M div n, rem = M mod n. Decoding then encoding
the same symbol (and vice versa) restores x and the stack exactly. Each step of
the forward pass pushes 16 bits before it pops log2(n) <= 16, so its stack never
underflows; the capacity is static (declared) and overflow is reported.

Shapes: P elements, `stack` [capacity, P] uint32, `x` [P] uint64, `head` [P] int32.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

PRECISION_BITS = 31
M = 1 << PRECISION_BITS          # total frequency
LOWER = 1 << 31                  # x in [LOWER, LOWER * 2^32)
U64 = jnp.uint64


class Buffer(NamedTuple):
    """Per-element rANS coders: `x` [P] uint64, `stack` [capacity, P] uint32, `head` [P] int32."""

    x: jax.Array
    stack: jax.Array
    head: jax.Array


def empty(num_elements: int, capacity: int) -> Buffer:
    """A buffer holding no information: x = 2^31, no words."""
    return Buffer(x=jnp.full((num_elements,), LOWER, U64),
                  stack=jnp.zeros((capacity, num_elements), jnp.uint32),
                  head=jnp.zeros((num_elements,), jnp.int32))


def is_empty(buf: Buffer) -> jax.Array:
    """True iff every coder is back at its initial state."""
    return jnp.all(buf.x == jnp.uint64(LOWER)) & jnp.all(buf.head == 0)


def bits_used(buf: Buffer) -> jax.Array:
    """Information held per element, in bits [P]: 32 * words + log2(x) - 31."""
    return 32.0 * buf.head + jnp.log2(buf.x.astype(jnp.float64)) - 31.0


def _push_word(buf: Buffer, emit: jax.Array) -> tuple[Buffer, jax.Array]:
    """Move the low 32 bits of x onto the stack where `emit`; flag overflow."""
    capacity, p = buf.stack.shape
    cols = jnp.arange(p)
    full = emit & (buf.head >= capacity)
    rows = jnp.where(emit, buf.head, capacity)  # row `capacity` is out of range: dropped
    word = (buf.x & jnp.uint64(0xFFFFFFFF)).astype(jnp.uint32)
    stack = buf.stack.at[rows, cols].set(word, mode="drop")
    x = jnp.where(emit, buf.x >> U64(32), buf.x)
    return Buffer(x, stack, buf.head + emit.astype(jnp.int32)), jnp.any(full)


def _pop_word(buf: Buffer) -> tuple[Buffer, jax.Array]:
    """Refill x from the stack where x < 2^31; flag underflow."""
    need = buf.x < U64(LOWER)
    empty_stack = need & (buf.head <= 0)
    rows = jnp.maximum(buf.head - 1, 0)
    word = buf.stack[rows, jnp.arange(buf.x.shape[0])].astype(U64)
    x = jnp.where(need, (buf.x << U64(32)) | word, buf.x)
    return Buffer(x, buf.stack, buf.head - need.astype(jnp.int32)), jnp.any(empty_stack)


def push_bits16(buf: Buffer, r: jax.Array) -> tuple[Buffer, jax.Array]:
    """Encode r [P] uniform over [0, 2^16) (f = 2^15, c = r 2^15). Returns (buffer, overflow)."""
    buf, full = _push_word(buf, buf.x >= U64(1 << 47))
    x = ((buf.x >> U64(15)) << U64(PRECISION_BITS)) + (buf.x & U64(0x7FFF)) + (r.astype(U64) << U64(15))
    return buf._replace(x=x), full


def pop_bits16(buf: Buffer) -> tuple[Buffer, jax.Array, jax.Array]:
    """Decode r [P] uniform over [0, 2^16). Returns (buffer, r as int64, underflow)."""
    y = buf.x & U64(M - 1)
    r = y >> U64(15)
    x = ((buf.x >> U64(PRECISION_BITS)) << U64(15)) + (y & U64(0x7FFF))
    buf, under = _pop_word(buf._replace(x=x))
    return buf, r.astype(jnp.int64), under


def _divmod(x: jax.Array, d: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Exact floor division and remainder in [0, d) of int64 x (|x| < 2^63) by 1 <= d < 2^32.

    Avoids 64-bit integer division, which XLA cannot vectorise: a float64
    estimate of the quotient is off by at most about 2^10 / d + 1; the remainder
    it leaves is small enough for a second float estimate, off by at most one
    whatever the rounding (XLA may divide by multiplying with a reciprocal), and
    integer corrections make the result exact. Because the result is then
    unique, every fusion of this computation gives the same bits.
    """
    df = d.astype(jnp.float64)
    q = jnp.floor(x.astype(jnp.float64) / df).astype(jnp.int64)
    r = x - q * d
    q2, r = _divmod_small(r, d)
    return q + q2, r


def _divmod_small(x: jax.Array, d: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`_divmod` for |x| < 2^50: one float estimate (within one of the quotient) and
    two rounds of integer correction."""
    q = jnp.floor(x.astype(jnp.float64) / d.astype(jnp.float64)).astype(jnp.int64)
    r = x - q * d
    for _ in range(2):
        low, high = r < 0, r >= d
        q = q - low.astype(jnp.int64) + high.astype(jnp.int64)
        r = r + jnp.where(low, d, 0) - jnp.where(high, d, 0)
    return q, r


class Uniform(NamedTuple):
    """The coding table of U[0, n): `n`, q = M div n, rem = M mod n (int64, broadcastable).

    Momentum is usually constant per layer, so the table is built once per
    schedule entry (`uniform`) rather than per weight and step.
    """

    n: jax.Array
    q: jax.Array
    rem: jax.Array


def uniform(n: jax.Array) -> Uniform:
    """Table of U[0, n) for integer n in [1, 2^16] (any shape)."""
    n = jnp.asarray(n, jnp.int64)
    q, rem = _divmod_small(jnp.full(n.shape, M, jnp.int64), n)
    return Uniform(n, q, rem)


def push_uniform(buf: Buffer, s: jax.Array, u: Uniform) -> tuple[Buffer, jax.Array]:
    """Encode s [P] uniform over [0, n). Returns (buffer, overflow)."""
    f = u.q + (s < u.rem).astype(jnp.int64)
    c = s * u.q + jnp.minimum(s, u.rem)
    buf, full = _push_word(buf, buf.x >= (f.astype(U64) << U64(32)))
    d, r = _divmod(buf.x.astype(jnp.int64), f)  # x < 2^63: exact as int64
    x = (d.astype(U64) << U64(PRECISION_BITS)) + (r + c).astype(U64)
    return buf._replace(x=x), full


def pop_uniform(buf: Buffer, u: Uniform) -> tuple[Buffer, jax.Array, jax.Array]:
    """Decode s [P] uniform over [0, n). Returns (buffer, s as int64, underflow)."""
    y = (buf.x & U64(M - 1)).astype(jnp.int64)
    split = u.rem * (u.q + 1)           # slots [0, split) have frequency q + 1
    low = y < split
    t, _ = _divmod_small(jnp.where(low, y, y - split), jnp.where(low, u.q + 1, u.q))
    s = jnp.where(low, t, u.rem + t)
    f = u.q + (s < u.rem).astype(jnp.int64)
    c = s * u.q + jnp.minimum(s, u.rem)
    x = f.astype(U64) * (buf.x >> U64(PRECISION_BITS)) + (y - c).astype(U64)
    buf, under = _pop_word(buf._replace(x=x))
    return buf, s, under


class Flags(NamedTuple):
    overflow: jax.Array
    underflow: jax.Array


def multiply_by_gamma(v: jax.Array, u: Uniform, buf: Buffer) -> tuple[jax.Array, Buffer, Flags]:
    """Exact V -> V * n / 2^16 for int64 V [P] with the remainder kept in `buf`."""
    buf, full = push_bits16(buf, v & jnp.int64(0xFFFF))
    buf, s, under = pop_uniform(buf, u)
    return (v >> jnp.int64(16)) * u.n + s, buf, Flags(full, under)


def divide_by_gamma(v: jax.Array, u: Uniform, buf: Buffer) -> tuple[jax.Array, Buffer, Flags]:
    """Exact inverse of `multiply_by_gamma`: V -> V * 2^16 / n, bits restored from `buf`."""
    a, s = _divmod(v, u.n)
    buf, full = push_uniform(buf, s, u)
    buf, r, under = pop_bits16(buf)
    return a * jnp.int64(1 << 16) + r, buf, Flags(full, under)
