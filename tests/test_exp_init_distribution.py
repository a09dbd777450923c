"""init-distribution: the piecewise-linear inverse CDF is a distribution with the
density it claims, starts near a normal, and the hypergradient w.r.t. its bin
widths and offset (chain rule through F^-1 composed with reversible SGD) matches
unrolled autodiff and finite differences."""

import jax

jax.config.update("jax_enable_x64", True)


import jax.numpy as jnp
import numpy as np
import pytest

import revlearn
from revlearn.experiments import init_distribution as idist
from revlearn.experiments._splits import mnist_splits


def _random_hypers(key, n_bins=7):
    k1, k2 = jax.random.split(key)
    return jax.random.normal(k1, ()) * 0.3, jax.random.normal(k2, (n_bins,)) * 0.5


def test_quantile_is_monotone_and_hits_the_knots():
    offset, log_width = _random_hypers(jax.random.PRNGKey(0))
    u = jnp.linspace(0.0, 1.0, 1001)
    q = idist.quantile(u, offset, log_width, 2.0)
    assert np.all(np.diff(np.asarray(q)) > 0)
    edges, heights = idist.density(offset, log_width, 2.0)
    knots = idist.quantile(jnp.arange(8) / 7, offset, log_width, 2.0)
    np.testing.assert_allclose(knots, edges, rtol=1e-12, atol=1e-12)
    # the offset is the knot q_{K//2} (the median for even K); mass 1/K per bin
    np.testing.assert_allclose(idist.quantile(jnp.asarray(3 / 7), offset, log_width),
                               offset, atol=1e-12)
    even = idist.quantile(jnp.asarray(0.5), offset, log_width[:6])
    np.testing.assert_allclose(even, offset, atol=1e-12)
    np.testing.assert_allclose(heights * np.diff(edges), np.full(7, 1 / 7), rtol=1e-12)


def test_samples_follow_the_claimed_density():
    offset, log_width = _random_hypers(jax.random.PRNGKey(1))
    w = np.asarray(idist.quantile(jax.random.uniform(jax.random.PRNGKey(2), (200_000,)),
                                  offset, log_width, 0.5))
    edges, heights = idist.density(offset, log_width, 0.5)
    counts, _ = np.histogram(w, edges)
    np.testing.assert_allclose(counts / w.size, heights * np.diff(edges), atol=0.004)
    # within a bin, F^-1 is linear, so the samples are uniform there
    inside = w[(w >= edges[3]) & (w < edges[4])]
    half = (edges[3] + edges[4]) / 2
    assert abs(np.mean(inside < half) - 0.5) < 0.02


def test_initial_hypers_approximate_a_normal():
    theta = idist.initial_hypers((784, 50, 10), 20)
    assert len(theta) == 2 and set(theta[0]) == {"w", "b"}
    u = jax.random.uniform(jax.random.PRNGKey(3), (200_000,))
    w = np.asarray(idist.quantile(u, theta[1]["w"]["offset"], theta[1]["w"]["log_width"], 0.1))
    assert abs(np.mean(w)) < 1e-3
    assert 0.095 < np.std(w) < 0.1  # the central 99% of N(0, 0.1^2)
    assert np.max(np.abs(w)) <= 0.1 * 2.58
    # the roughness of a smooth density is small; a jagged one scores higher
    smooth = idist.roughness(theta[0]["w"]["log_width"])
    jagged = theta[0]["w"]["log_width"] + 0.3 * (-1.0) ** jnp.arange(20)
    assert 0.05 < smooth < 0.08 and idist.roughness(jagged) > 10 * smooth


@pytest.fixture(scope="module")
def tiny():
    config = idist.Config(hidden=6, n_train=60, n_valid=40, batch_size=20, steps=4, n_bins=5,
                          lr=0.5)
    data = mnist_splits(config, "train", "valid")
    static = config.program()
    theta = idist.initial_hypers(config.sizes, config.n_bins)
    # move away from the symmetric start so every leaf has a generic gradient
    leaves, tdef = jax.tree_util.tree_flatten(theta)
    keys = jax.random.split(jax.random.PRNGKey(4), len(leaves))
    theta = jax.tree_util.tree_unflatten(
        tdef, [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    return data, static, theta


def test_hypergradient_matches_unrolled_and_finite_differences(tiny):
    data, static, theta = tiny
    key = jax.random.PRNGKey(5)
    loss, g_rev, _, w0, g_w0 = idist._hypergrad(theta, key, data, static)

    vg_unr = jax.jit(jax.value_and_grad(
        lambda th: idist.meta_objective(th, key, data, static, revlearn.Unrolled())[0]))
    f_unr = lambda th: vg_unr(th)[0]  # noqa: E731  (one compiled program for everything)
    g_unr = vg_unr(theta)[1]
    a, b = (np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(t)])
            for t in (g_rev, g_unr))
    assert np.linalg.norm(a - b) <= 1e-7 * np.linalg.norm(b)
    # the output layer's offsets move every output weight (bias) by the same amount,
    # which adds the same number to every logit: an exact symmetry, zero gradient
    scale = np.linalg.norm(b)
    assert abs(float(g_unr[1]["w"]["offset"])) < 1e-12 * scale
    assert abs(float(g_unr[1]["b"]["offset"])) < 1e-12 * scale
    assert abs(float(g_unr[0]["w"]["offset"])) > 1e-6 * scale
    np.testing.assert_allclose(loss, f_unr(theta), rtol=1e-10)

    # central finite differences along a random direction
    leaves, tdef = jax.tree_util.tree_flatten(theta)
    keys = jax.random.split(jax.random.PRNGKey(6), len(leaves))
    d = [jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    shift = lambda s: jax.tree_util.tree_unflatten(  # noqa: E731
        tdef, [x + s * dx for x, dx in zip(leaves, d)])
    eps = 1e-5
    fd = (f_unr(shift(eps)) - f_unr(shift(-eps))) / (2 * eps)
    directional = sum(np.sum(np.asarray(g) * np.asarray(dx))
                      for g, dx in zip(jax.tree_util.tree_leaves(g_rev), d))
    assert abs(fd - directional) <= 1e-5 * abs(directional)

    assert all(x.shape == y.shape for x, y in zip(jax.tree_util.tree_leaves(w0),
                                                   jax.tree_util.tree_leaves(g_w0)))


def test_curve_ends_where_reversible_sgd_ends(tiny):
    data, static, theta = tiny
    key = jax.random.PRNGKey(5)
    loss = idist._hypergrad(theta, key, data, static)[0]  # compiled above: a cache hit
    curve, final = idist._curve(theta, key, data, static)
    assert curve.shape == (static.steps + 1,)
    np.testing.assert_allclose(curve[-1], loss, rtol=1e-9)
    np.testing.assert_allclose(final["train_loss"], loss, rtol=1e-9)


def test_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="batch_size"):
        idist.Config(n_train=100, batch_size=200)
    with pytest.raises(ValueError, match="meta_lr_end"):
        idist.Config(meta_lr_end=2.0)
    assert idist.Config(model="logistic").sizes == (784, 10)
