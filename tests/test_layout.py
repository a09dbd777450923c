"""The packed [nblocks, BLOCK] layout of the reversible state."""

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp
import numpy as np
import pytest

from revlearn.exact._layout import BLOCK, Layout

SHAPES = [(784, 50), (50,), (), (3, 0, 2), (7, 3, 5), (64,), (65,)]


def leaves(rng, dtype=np.float64):
    return [jnp.asarray(rng.normal(size=s), dtype) for s in SHAPES]


def test_rows_are_whole_blocks_in_leaf_order():
    lay = Layout.of(SHAPES)
    assert lay.rows == (613, 1, 1, 0, 2, 1, 2)                  # the empty leaf has none
    assert lay.row0 == (0, 613, 614, 615, 615, 617, 618)
    assert lay.shape == (620, BLOCK)
    assert list(lay.row_leaf[[0, 612, 613, 614, 615, 616, 617, 618, 619]]) == [0, 0, 1, 2, 4, 4, 5, 6, 6]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_pack_unpack_round_trip_pads_with_zeros(dtype):
    lay = Layout.of(SHAPES)
    xs = leaves(np.random.default_rng(0), dtype)
    flat = jax.jit(lambda xs: lay.pack(xs))(xs)
    assert flat.shape == lay.shape and flat.dtype == dtype
    for a, b in zip(jax.jit(lay.unpack)(flat), xs):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert bool(jnp.all(a == b))
    # padding: everything beyond the leaves' elements is zero
    assert float(jnp.sum(jnp.abs(flat))) == pytest.approx(sum(float(jnp.sum(jnp.abs(x))) for x in xs))
    assert int(jnp.sum(flat != 0)) == sum(x.size for x in xs)


def test_spread_one_value_per_leaf_is_a_row_table():
    lay = Layout.of(SHAPES)
    vals = [jnp.float64(i + 1) for i in range(len(SHAPES))]
    out = jax.jit(lay.spread)(vals)
    assert out.shape == (lay.nblocks, 1)
    full = jnp.broadcast_to(out, lay.shape)
    for i, leaf in enumerate(lay.unpack(full)):
        assert bool(jnp.all(leaf == i + 1))


def test_spread_per_weight_entries_broadcasts_and_pads_with_the_edge():
    lay = Layout.of(SHAPES)
    rng = np.random.default_rng(1)
    entries = [jnp.asarray(rng.normal(size=(1, 50))), jnp.float64(2.0), jnp.float64(3.0),
               jnp.zeros((3, 0, 2)), jnp.asarray(rng.normal(size=(7, 1, 5))), jnp.float64(5.0),
               jnp.asarray(rng.normal(size=(65,)))]
    out = jax.jit(lay.spread)(entries)
    assert out.shape == lay.shape
    for leaf, e, s in zip(lay.unpack(out), entries, SHAPES):
        assert bool(jnp.all(leaf == jnp.broadcast_to(e, s)))
    last = lay.rows_of(out, 6).reshape(-1)
    assert bool(jnp.all(last[65:] == entries[6][-1]))          # edge padding
    assert lay.rows_of(out, 3).shape == (0, BLOCK)
    # scalar entries, an empty leaf's per-weight one among them, stay a [nblocks, 1] gather
    scalars = [jnp.float64(i) if r else jnp.zeros((3, 0, 2)) for i, r in enumerate(lay.rows)]
    out = lay.spread(scalars)
    assert out.shape == (lay.nblocks, 1)
    assert list(np.asarray(out[:, 0])) == list(lay.row_leaf.astype(np.float64))


def test_sums_are_per_leaf_sums():
    lay = Layout.of(SHAPES)
    xs = leaves(np.random.default_rng(2))
    flat = lay.pack(xs)
    two = jnp.stack([flat, 2 * flat])
    out = jax.jit(lay.sums)(two)
    assert out.shape == (2, len(SHAPES))
    want = np.array([float(jnp.sum(x)) for x in xs])
    np.testing.assert_allclose(np.asarray(out[0]), want, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(np.asarray(out[1]), 2 * want, rtol=1e-12, atol=1e-9)


def test_join_scalars_and_rows():
    lay = Layout.of(SHAPES)
    scal = [jnp.int32(i) for i in range(len(SHAPES))]
    out = lay.join(scal)
    assert out.shape == (lay.nblocks, 1)
    assert list(np.asarray(out[:, 0])) == list(lay.row_leaf)
    parts = [jnp.full((r, BLOCK), i, jnp.int32) if i % 2 else jnp.int32(i)
             for i, r in enumerate(lay.rows)]
    out = lay.join(parts)
    assert out.shape == lay.shape
    assert bool(jnp.all(out == jnp.asarray(lay.row_leaf)[:, None]))
