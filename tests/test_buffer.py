"""The information buffer: exact multiply/divide round trips, accuracy, and near-ideal size."""

import math

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from revlearn.exact import _buffer


def _capacity(numerators: np.ndarray) -> int:
    """Rows for a [steps, *B] array of numerators (the per-step maximum, as `Reversible` sizes it)."""
    inc = _buffer.increments_np(numerators).reshape(numerators.shape[0], -1).max(axis=1)
    return _buffer.capacity_words(int(inc.sum()))


@jax.jit
def _run(v, buf, n):
    """Multiply by n_t / 2^16 for t = 0 .. T-1, then divide back in reverse order."""
    def fwd(c, nt):
        v, b = c
        v, b, full = _buffer.multiply(v, _buffer.coding(nt), b)
        return (v, b), full

    def bwd(c, nt):
        v, b = c
        v, b, empty = _buffer.divide(v, _buffer.coding(nt), b)
        return (v, b), empty

    (v1, b1), full = jax.lax.scan(fwd, (v, buf), n)
    (v2, b2), empty = jax.lax.scan(bwd, (v1, b1), n, reverse=True)
    return v1, b1, v2, b2, full.any(), empty.any()


def _roundtrip(v0, numerators, entry_shape):
    buf = _buffer.empty(v0.shape, entry_shape, _capacity(numerators))
    return _run(v0, buf, jnp.asarray(numerators, jnp.int64))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), steps=st.sampled_from([1, 2, 17, 60, 150]),
       lo=st.integers(2, 65535), shared=st.booleans())
def test_multiply_divide_roundtrip_random_numerators(seed, steps, lo, shared):
    """Exact for any velocities and numerators, with one head per leaf (dense rows) or per weight."""
    rng = np.random.default_rng(seed)
    shape = (3, 4)
    v0 = jnp.asarray(rng.integers(-2**61, 2**61, shape), jnp.int64)
    entry = () if shared else shape
    n = rng.integers(lo, 65536, (steps,) + entry)
    v1, b1, v2, b2, full, empty = _roundtrip(v0, n, entry)
    assert not bool(full) and not bool(empty)
    np.testing.assert_array_equal(np.asarray(v2), np.asarray(v0))
    assert bool(_buffer.is_empty(b2))


def test_extreme_numerators_and_velocities():
    """n = 2 (about 15 bits per step, a spill almost every step) and n = 65535, with
    velocities at the edges of the fixed-point range."""
    v0 = jnp.asarray([-(2**62) + 1, -1, 0, 1, 2**62 - 1, 12345], jnp.int64)
    for n in (2, 3, 65535):
        v1, b1, v2, b2, full, empty = _roundtrip(v0, np.full((200,), n), ())
        assert not bool(full) and not bool(empty)
        np.testing.assert_array_equal(np.asarray(v2), np.asarray(v0))
        assert bool(_buffer.is_empty(b2))


def test_multiply_is_accurate_to_one_unit():
    """s is decoded from the slot r was encoded into, so V n / 2^16 is off by at most one unit."""
    rng = np.random.default_rng(0)
    v = rng.integers(-2**60, 2**60, 5000)
    for n in (2, 1000, 58982, 65535):
        out, _, _ = _buffer.multiply(jnp.asarray(v, jnp.int64), _buffer.coding(jnp.int64(n)),
                                     _buffer.empty(v.shape, (), 2))
        exact = np.asarray(v, dtype=object) * n // 65536
        err = np.asarray(out, dtype=object) - exact
        assert err.min() >= -1 and err.max() <= 1, (n, err.min(), err.max())


@pytest.mark.parametrize("gamma", [0.5, 0.9, 0.99])
def test_size_is_within_a_thousandth_of_the_minimum(gamma):
    """The bits reserved per weight per step are set by the schedule: log2(1/gamma) + < 7e-5."""
    steps, n = 400, round(gamma * 65536)
    v0 = jnp.asarray(np.random.default_rng(1).integers(-2**50, 2**50, (64,)), jnp.int64)
    v1, b1, *_ = _roundtrip(v0, np.full((steps,), n), ())
    bits = float(_buffer.bits_reserved(b1.head, b1.m)) / steps
    ideal = math.log2(65536 / n)
    assert ideal <= bits <= ideal + 7e-5, (bits, ideal)
    assert int(b1.head) == math.floor((_buffer.M0 - _buffer.LOW * _buffer.UNIT
                                       + steps * int(_buffer.coding(jnp.int64(n)).inc))
                                      / (_buffer.WORD_BITS * _buffer.UNIT))


def test_full_stack_is_flagged():
    v0 = jnp.zeros((4,), jnp.int64)
    buf = _buffer.empty((4,), (), 1)              # one row; 100 steps at n = 2 need ~94
    _, _, _, _, full, _ = _run(v0, buf, jnp.full((100,), 2, jnp.int64))
    assert bool(full)


def test_divmod_exact_on_edges():
    x = jnp.asarray([-(2**63) + 1, -(2**62), -1, 0, 1, 2**62, 2**63 - 1], jnp.int64)
    for d in (2, 3, 65535, 2**30 + 1, 2**31 - 1):
        dd = jnp.int64(d)
        q, r = _buffer._divmod(x, dd, 1.0 / dd.astype(jnp.float64))
        xs = [int(a) for a in np.asarray(x)]
        assert [int(a) for a in np.asarray(q)] == [a // d for a in xs]
        assert [int(a) for a in np.asarray(r)] == [a % d for a in xs]
