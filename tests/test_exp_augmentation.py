"""augmentation: the sparse generator and its matrix-exponential action (against
dense matrices and jax.scipy.linalg.expm on 6x6 images), the hand-written VJP,
the antisymmetric parameterisation, the symmetry trap at A = 0, and the
hypergradient of the meta-objective three ways."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from revlearn import data as rdata
from revlearn.experiments import _expm_action as ea
from revlearn.experiments import augmentation as aug


def _random(shape, seed, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale)


def _taylor_reference(edges, t, x, m, k):
    """The same truncated series, written plainly (autodiff reference)."""
    s = (t / m)[:, None, None]
    for _ in range(m):
        acc = v = x
        for j in range(1, k + 1):
            v = s * ea.apply_generator(edges, v) / j
            acc = acc + v
        x = acc
    return x


def test_generator_is_the_sparse_matrix_and_its_transpose():
    edges = _random((4, 6, 5), 0)
    a = ea.dense_generator(edges)
    assert np.count_nonzero(a) == 2 * (6 * 4 + 5 * 5)  # one entry per directed grid edge
    x = _random((3, 6, 5), 1)
    np.testing.assert_allclose(np.asarray(ea.apply_generator(edges, x)).reshape(3, -1),
                               np.asarray(x).reshape(3, -1) @ a.T, atol=1e-13)
    np.testing.assert_array_equal(ea.dense_generator(ea.transpose_edges(edges)), a.T)
    np.testing.assert_allclose(float(ea.one_norm(edges)), np.abs(a).sum(0).max(), rtol=1e-13)


@pytest.mark.parametrize("substeps,terms", [(4, 8), (2, 12)])
def test_expm_action_matches_scipy_expm_on_6x6(substeps, terms):
    edges = _random((4, 6, 6), 2, 0.5)
    a = ea.dense_generator(edges)
    norm = np.abs(a).sum(0).max()
    t = jnp.asarray([-2.5, -1.0, 0.0, 0.4, 1.7, 3.0])
    x = _random((6, 6, 6), 3)
    y = np.asarray(ea.expm_action(edges, t, x, substeps=substeps, terms=terms))
    for ti, xi, yi in zip(t, x, y):
        ref = np.asarray(jax.scipy.linalg.expm(ti * jnp.asarray(a))) @ np.asarray(xi).ravel()
        err = np.linalg.norm(yi.ravel() - ref, 1) / np.linalg.norm(np.asarray(xi).ravel(), 1)
        bound = ea.taylor_error_bound(abs(float(ti)) * norm, substeps=substeps, terms=terms)
        assert err <= bound + 1e-14, (float(ti), err, bound)
        assert err < 1e-5
    np.testing.assert_array_equal(y[2], np.asarray(x[2]))  # t = 0 is exactly the identity


def test_expm_action_vjp_matches_autodiff_of_the_plain_series():
    edges, x, w = _random((4, 6, 6), 4, 0.4), _random((3, 6, 6), 5), _random((3, 6, 6), 6)
    t = jnp.asarray([-1.2, 0.5, 2.0])
    f = lambda g: jax.grad(lambda e, t, x: jnp.sum(w * g(e, t, x)), (0, 1, 2))  # noqa: E731
    got = f(lambda e, t, x: ea.expm_action(e, t, x, substeps=2, terms=3))(edges, t, x)
    ref = f(lambda e, t, x: _taylor_reference(e, t, x, 2, 3))(edges, t, x)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_antisymmetric_generator_is_bounded_and_antisymmetric():
    raw = _random((4, 6, 6), 7, 2.0)
    g = aug.generator_edges(raw, "antisymmetric", 0.5)
    a = ea.dense_generator(g)
    np.testing.assert_allclose(a, -a.T, atol=1e-15)
    assert float(jnp.max(jnp.abs(g))) <= 0.5
    eig = np.linalg.eigvals(a)
    np.testing.assert_allclose(eig.real, 0, atol=1e-10)  # imaginary spectrum: a flow
    general = ea.dense_generator(aug.generator_edges(raw, "general", 0.5))
    assert np.abs(general - general.T).max() > 0.1
    vx, vy = aug.flow_field(aug.generator_edges(
        jnp.zeros((4, 6, 6)).at[1].set(0.2), "antisymmetric", 10.0))  # A x = 0.2 x[j-1]
    assert float(np.median(vx)) > 0 and np.allclose(vy, 0)  # content moves right


@pytest.fixture(scope="module")
def tiny():
    pool = rdata.load_mnist("embedded")
    parts = rdata.split(pool, {"train": 40, "valid": 50}, 0)
    data = {k: (jnp.asarray(d.images, jnp.float64), jnp.asarray(d.onehot, jnp.float64))
            for k, d in parts.items()}
    static = aug.Config(hidden=8, batch_size=10, steps=4, substeps=2, terms=4, lr=0.5,
                        penalty_strength=1e-3, image_dtype="float64").program()
    return data, static


def _loss_grad(theta, data, static, t_sign=1.0, method="reversible"):
    loss, grads, _ = aug._hypergrad(theta, jax.random.PRNGKey(0), data, static, t_sign, method)
    return loss, grads["edges"]


def _grad(theta, data, static, t_sign=1.0, method="reversible"):
    return _loss_grad(theta, data, static, t_sign, method)[1]


def test_symmetry_trap_at_zero(tiny):
    """At A = 0 one draw's hypergradient is exactly odd in t, so it averages to
    zero; away from 0 it is not (the second-order effects the run relies on)."""
    data, static = tiny
    zero = {"edges": jnp.zeros((4, 28, 28))}
    g_plus, g_minus = _grad(zero, data, static), _grad(zero, data, static, -1.0)
    assert float(jnp.linalg.norm(g_plus)) > 1e-6
    np.testing.assert_allclose(g_minus, -g_plus, rtol=1e-6, atol=1e-12)
    rand = {"edges": _random((4, 28, 28), 8, 0.3)}
    g_plus, g_minus = _grad(rand, data, static), _grad(rand, data, static, -1.0)
    assert float(jnp.linalg.norm(g_plus + g_minus)) > 0.05 * float(jnp.linalg.norm(g_plus))


def test_meta_hypergradient_reversible_unrolled_fd(tiny):
    data, static = tiny
    theta = {"edges": _random((4, 28, 28), 9, 0.1)}
    g_rev = _grad(theta, data, static)
    g_unr = _grad(theta, data, static, method="unrolled")
    np.testing.assert_allclose(g_rev, g_unr, rtol=1e-7, atol=1e-12)
    d = _random((4, 28, 28), 10)
    d = d / jnp.linalg.norm(d)
    eps = 1e-4
    f = lambda e: _loss_grad({"edges": e}, data, static)[0]  # noqa: E731  (same program)
    fd = (f(theta["edges"] + eps * d) - f(theta["edges"] - eps * d)) / (2 * eps)
    np.testing.assert_allclose(float(jnp.sum(g_rev * d)), float(fd), rtol=1e-5)


def test_no_augmentation_is_t_zero(tiny):
    """The "no augmentation" baseline (augment=False) trains on the plain batches,
    which are exactly the augmented ones at t = 0 (expm(0) x = x)."""
    data, static = tiny
    stream = jax.jit(aug._augmented_stream, static_argnames=("static", "augment"))
    key = jax.random.PRNGKey(5)
    edges = aug.generator_edges(_random((4, 28, 28), 11), "antisymmetric", 0.5)
    xa, ya = stream(edges, key, data["train"], static, augment=False)
    idx = jax.vmap(lambda k: aug.models.batch_indices(40, 10, k, jax.random.fold_in(key, 0)))(
        jnp.arange(4))
    np.testing.assert_array_equal(xa, data["train"][0][idx])
    np.testing.assert_array_equal(ya, data["train"][1][idx])
    np.testing.assert_array_equal(stream(edges, key, data["train"], static, 0.0)[0], xa)
    on, _ = stream(edges, key, data["train"], static)
    assert float(jnp.max(jnp.abs(on - xa))) > 0.01
    again, _ = stream(edges, key, data["train"], static)
    np.testing.assert_array_equal(on, again)  # a pure function of (key, step)


def test_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="terms"):
        aug.Config(terms=1)
    with pytest.raises(ValueError, match="batch_size"):
        aug.Config(n_train=20, batch_size=50)
    with pytest.raises(ValueError, match="max_edge"):
        aug.Config(max_edge=0.0)
