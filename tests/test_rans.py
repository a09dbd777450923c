"""The information buffer: exact push/pop round trips and near-ideal size."""

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st

from revlearn import _rans


@jax.jit
def _run(v, buf, n):
    def fwd(c, nt):
        v, b = c
        v, b, f = _rans.multiply_by_gamma(v, _rans.uniform(nt), b)
        return (v, b), f.overflow | f.underflow

    def bwd(c, nt):
        v, b = c
        v, b, f = _rans.divide_by_gamma(v, _rans.uniform(nt), b)
        return (v, b), f.overflow | f.underflow

    (v1, b1), f1 = jax.lax.scan(fwd, (v, buf), n)
    (v2, b2), f2 = jax.lax.scan(bwd, (v1, b1), n, reverse=True)
    return v1, b1, v2, b2, f1.any() | f2.any()


def _roundtrip(v0, numerators, capacity=None):
    """Multiply by n_t/2^16 for every t, then divide back; return everything."""
    if capacity is None:
        bits = np.sum(np.log2(65536 / numerators.min(axis=1)))
        capacity = int(np.ceil(bits / 32)) + 4
    return _run(v0, _rans.empty(v0.shape[0], capacity), jnp.asarray(numerators, jnp.int64))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), steps=st.sampled_from([1, 2, 17, 60]), lo=st.integers(1, 65535))
def test_multiply_divide_roundtrip_random_numerators(seed, steps, lo):
    rng = np.random.default_rng(seed)
    P = 7
    v0 = jnp.asarray(rng.integers(-2**61, 2**61, P), jnp.int64)
    n = rng.integers(lo, 65536, (steps, P))
    v1, b1, v2, b2, flag = _roundtrip(v0, n, capacity=34)  # 60 steps x 16 bits fit in 30 words
    assert not bool(flag)
    np.testing.assert_array_equal(np.asarray(v2), np.asarray(v0))
    assert bool(_rans.is_empty(b2))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), ops=st.lists(st.booleans(), min_size=1, max_size=80))
def test_push_pop_symbols_lifo(seed, ops):
    """Arbitrary interleavings of 16-bit and U[0, n) pushes pop back in LIFO order."""
    rng = np.random.default_rng(seed)
    P = 5
    buf = _rans.empty(P, len(ops) + 4)
    pushed = []
    for is16 in ops:
        if is16:
            r = jnp.asarray(rng.integers(0, 65536, P), jnp.int64)
            buf, full = _rans.push_bits16(buf, r)
            pushed.append(("16", r, None))
        else:
            n = jnp.asarray(rng.integers(1, 65536, P), jnp.int64)
            s = jnp.asarray(rng.integers(0, 65536, P), jnp.int64) % n
            buf, full = _rans.push_uniform(buf, s, _rans.uniform(n))
            pushed.append(("n", s, n))
        assert not bool(full)
    for kind, sym, n in reversed(pushed):
        if kind == "16":
            buf, got, under = _rans.pop_bits16(buf)
        else:
            buf, got, under = _rans.pop_uniform(buf, _rans.uniform(n))
        assert not bool(under)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(sym))
    assert bool(_rans.is_empty(buf))


def test_negative_velocities_use_floor_semantics():
    v0 = jnp.asarray([-1, -65536, -65537, 0, 1, 2**61, -2**61], jnp.int64)
    n = np.full((3, 7), 58982)
    v1, _, v2, _, flag = _roundtrip(v0, n)
    assert not bool(flag)
    np.testing.assert_array_equal(np.asarray(v2), np.asarray(v0))
    # multiplying by gamma < 1 shrinks magnitudes: exact within one unit of the real product
    expected = np.asarray(v0, np.float64) * (58982 / 65536) ** 3
    assert np.all(np.abs(np.asarray(v1, np.float64) - expected) <= 2 + 1e-9 * np.abs(expected))


def test_buffer_within_two_percent_of_information_limit():
    P, T = 256, 2000
    rng = np.random.default_rng(1)
    v0 = jnp.asarray(rng.integers(-2**60, 2**60, P), jnp.int64)
    n = np.full((T, P), 58982)  # gamma = 0.9
    _, b1, v2, _, flag = _roundtrip(v0, n)
    assert not bool(flag)
    bits = float(jnp.mean(_rans.bits_used(b1))) / T
    ideal = np.log2(65536 / 58982)
    assert ideal <= bits <= 1.02 * ideal, (bits, ideal)


def test_overflow_is_flagged_not_silent():
    buf = _rans.empty(3, 1)
    flagged = False
    for _ in range(8):
        buf, full = _rans.push_bits16(buf, jnp.full(3, 65535, jnp.int64))
        flagged |= bool(full)
    assert flagged
