"""`l2-per-weight`: the hypergradient of its meta-objective (per-weight log-L2 plus
the meta-penalty) three ways, the penalty images, the grid choice, w_0."""

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp
import numpy as np
import pytest

import revlearn
from revlearn.experiments import l2_per_weight as exp


def _tiny_data(key, n=(40, 30, 20)):
    out = {}
    for name, k, m in zip(("train", "valid", "test"), jax.random.split(key, 3), n):
        kx, ky = jax.random.split(k)
        x = jax.random.uniform(kx, (m, 784), jnp.float64)
        y = jax.nn.one_hot(jax.random.randint(ky, (m,), 0, 10), 10, dtype=jnp.float64)
        out[name] = (x, y)
    return out


@pytest.mark.parametrize("model", ["logistic", pytest.param("mlp", marks=pytest.mark.slow)])
def test_reversible_hypergradient_matches_unrolled_or_finite_differences(model):
    config = exp.Config(model=model, hidden=6, seed=3)
    static = exp.Config(model=model, hidden=6, steps=4, batch_size=10, lr=0.5,
                        meta_penalty=3.0).program()
    data = _tiny_data(jax.random.PRNGKey(0))
    params0 = exp._params0(config)
    # a different log-L2 for every weight, around lambda ~ 0.05
    leaves, tree = jax.tree_util.tree_flatten(params0)
    ks = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    theta = {"log_l2": jax.tree_util.tree_unflatten(
        tree, [-3.0 + 0.5 * jax.random.normal(k, l.shape) for k, l in zip(ks, leaves)])}
    key = jax.random.PRNGKey(7)

    def value_and_grad(method):
        f = lambda th: exp.meta_objective(th, params0, key, data, static, method)[0]  # noqa: E731
        return jax.jit(jax.value_and_grad(f))(theta)

    v_rev, g_rev, metrics = exp._hypergrad(theta, params0, key, data, static)
    # the meta-penalty is the Gaussian prior of the original: meta_penalty * sum lambda^2
    lam2 = sum(float(jnp.sum(jnp.exp(2 * t))) for t in jax.tree_util.tree_leaves(theta))
    assert float(metrics["meta_penalty"]) == pytest.approx(3.0 * lam2, rel=1e-12)
    assert float(v_rev) == pytest.approx(float(metrics["valid_loss"]) + 3.0 * lam2, rel=1e-12)
    # per-weight gradients really differ between weights (not one shared value)
    assert float(jnp.std(jnp.ravel(g_rev["log_l2"][0]["w"]))) > 0

    if model == "mlp":  # against unrolled autodiff
        v_unr, g_unr = value_and_grad(revlearn.Unrolled())
        assert abs(float(v_rev) - float(v_unr)) <= 1e-12 * abs(float(v_unr))
        flat_rev = jnp.concatenate([jnp.ravel(g) for g in jax.tree_util.tree_leaves(g_rev)])
        flat_unr = jnp.concatenate([jnp.ravel(g) for g in jax.tree_util.tree_leaves(g_unr)])
        assert (float(jnp.linalg.norm(flat_rev - flat_unr))
                < 1e-7 * float(jnp.linalg.norm(flat_unr)))

    if model == "logistic":  # central finite differences along a random direction
        d = jax.tree_util.tree_map(lambda t: jax.random.normal(jax.random.PRNGKey(5), t.shape),
                                   theta)
        f = lambda th: exp._hypergrad(th, params0, key, data, static)[0]  # noqa: E731
        eps = 1e-5
        shift = lambda s: jax.tree_util.tree_map(lambda t, u: t + s * u, theta, d)  # noqa: E731
        fd = (float(f(shift(eps))) - float(f(shift(-eps)))) / (2 * eps)
        directional = sum(float(jnp.vdot(g, u)) for g, u in zip(
            jax.tree_util.tree_leaves(g_rev), jax.tree_util.tree_leaves(d)))
        assert directional == pytest.approx(fd, rel=1e-5)


def test_penalty_images_are_columns_in_pixel_order_clipped_at_the_98th_percentile():
    rng = np.random.default_rng(0)
    pen = rng.exponential(size=(784, 10))
    pen[5 * 28 + 7, 3] = 1e3  # pixel (row 5, column 7) of class 3: an outlier
    images, vmax = exp.penalty_images(pen)
    assert images.shape == (10, 28, 28)
    assert vmax == pytest.approx(np.percentile(pen, 98))
    assert images[3, 5, 7] == vmax
    mask = pen.T.reshape(10, 28, 28) <= vmax
    np.testing.assert_array_equal(images[mask], pen.T.reshape(10, 28, 28)[mask])
    assert (images <= vmax).all()
    with pytest.raises(ValueError, match=r"\[784, n_units\]"):
        exp.penalty_images(pen.T)


def test_best_grid_point_is_the_lowest_validation_loss():
    assert exp.best_grid_index([0.5, 0.3, np.nan, 0.3, 0.4]) == 1
    with pytest.raises(ValueError, match="finite"):
        exp.best_grid_index([np.nan, np.inf])


def test_initial_weights():
    logistic = exp._params0(exp.Config(seed=1))
    assert all(float(jnp.abs(p).max()) == 0 for p in jax.tree_util.tree_leaves(logistic))
    a = exp._params0(exp.Config(model="mlp", hidden=7, seed=1))
    b = exp._params0(exp.Config(model="mlp", hidden=7, seed=1))
    c = exp._params0(exp.Config(model="mlp", hidden=7, seed=2))
    assert a[0]["w"].shape == (784, 7) and a[1]["w"].shape == (7, 10)
    np.testing.assert_array_equal(a[0]["w"], b[0]["w"])
    assert not np.array_equal(a[0]["w"], c[0]["w"])


def test_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="init_l2"):
        exp.Config(init_l2=0.0)
    with pytest.raises(ValueError, match="grid"):
        exp.Config(grid=(-1.0,))
