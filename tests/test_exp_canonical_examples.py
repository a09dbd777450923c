"""canonical-examples: the hypergradient w.r.t. the training pixels three ways,
the block projection of the resolution study, and the validation subsets."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from revlearn import data as rdata
from revlearn.experiments import canonical_examples as ce


@pytest.fixture(scope="module")
def problem():
    pool = rdata.load_mnist("embedded")
    parts = rdata.split(pool, {"valid": 60, "test": 40}, 0)
    arr = {k: (jnp.asarray(d.images, jnp.float64), jnp.asarray(d.onehot, jnp.float64))
           for k, d in parts.items()}
    return {"labels": ce._labels(1), "valid": arr["valid"], "test": arr["test"]}


def _loss_grad(theta, static, data, proj=None, weights=None, lr=1.0, l2=0.0,
               method="reversible"):
    """(validation loss, hypergradient) through the experiment's own jitted program."""
    proj = ce.block_projection(28) if proj is None else proj
    weights = jnp.ones((data["valid"][0].shape[0],)) if weights is None else weights
    loss, grads, _ = ce._hypergrad(theta, jax.random.PRNGKey(3), data, proj, weights,
                                   jnp.asarray(lr), jnp.asarray(l2), static, method)
    return loss, grads


def test_pixel_hypergradient_reversible_unrolled_fd(problem):
    """Near zero images, the hypergradient is non-zero and agrees three ways."""
    static = ce.Config(steps=4).program()
    theta = {"pixels": 0.01 * jax.random.normal(jax.random.PRNGKey(0), (10, 784))}
    g_rev = _loss_grad(theta, static, problem)[1]["pixels"]
    g_unr = _loss_grad(theta, static, problem, method="unrolled")[1]["pixels"]
    assert float(jnp.linalg.norm(g_rev)) > 1e-3  # zero images are not a stationary point
    np.testing.assert_allclose(g_rev, g_unr, rtol=1e-7, atol=1e-12)
    d = jax.random.normal(jax.random.PRNGKey(1), (10, 784))
    d = d / jnp.linalg.norm(d)
    eps = 1e-4
    f = lambda p: _loss_grad({"pixels": p}, static, problem)[0]  # noqa: E731
    fd = (f(theta["pixels"] + eps * d) - f(theta["pixels"] - eps * d)) / (2 * eps)
    np.testing.assert_allclose(float(jnp.sum(g_rev * d)), float(fd), rtol=1e-5)


def test_mlp_and_learned_lr_l2_match_unrolled(problem):
    static = ce.Config(learner="mlp", hidden=8, batch_size=5, steps=4, learn_lr_l2=True).program()
    theta = {"pixels": 0.1 * jax.random.normal(jax.random.PRNGKey(2), (10, 784)),
             "log_lr": jnp.asarray(np.log(0.5)), "log_l2": jnp.asarray(np.log(1e-3))}
    g_rev = _loss_grad(theta, static, problem)[1]
    g_unr = _loss_grad(theta, static, problem, method="unrolled")[1]
    for k in theta:
        np.testing.assert_allclose(g_rev[k], g_unr[k], rtol=1e-7, atol=1e-12, err_msg=k)
    assert abs(float(g_rev["log_lr"])) > 0 and abs(float(g_rev["log_l2"])) > 0


@pytest.mark.parametrize("r", [7, 14, 28])
def test_block_projection_is_a_symmetric_block_average(r):
    p = np.asarray(ce.block_projection(r))
    np.testing.assert_allclose(p, p.T)
    np.testing.assert_allclose(p @ p, p, atol=1e-15)
    z = np.random.default_rng(0).normal(size=(28, 28))
    x = p @ z @ p.T
    b = 28 // r
    blocks = x.reshape(r, b, r, b)
    np.testing.assert_allclose(blocks, blocks[:, :1, :, :1] * np.ones((1, b, 1, b)), atol=1e-12)
    np.testing.assert_allclose(blocks[:, 0, :, 0], z.reshape(r, b, r, b).mean((1, 3)), atol=1e-12)
    with pytest.raises(ValueError, match="must divide 28"):
        ce.block_projection(5)


def test_low_resolution_hypergradient_stays_block_constant(problem):
    """x = P z P^T, so the gradient w.r.t. z is P g P^T: gradient descent from
    block-constant images keeps them block-constant (10 r^2 hyperparameters)."""
    static = ce.Config(steps=4).program()
    proj = ce.block_projection(7)
    g = _loss_grad({"pixels": jnp.zeros((10, 784))}, static, problem, proj)[1]["pixels"]
    np.testing.assert_allclose(ce._images(g, proj), g, atol=1e-14)


def test_validation_weights_select_a_subset(problem):
    """With 0/1 weights, the examples outside the subset do not matter."""
    static = ce.Config(steps=4).program()
    theta = {"pixels": 0.1 * jax.random.normal(jax.random.PRNGKey(4), (10, 784))}
    n = 17
    weights = (jnp.arange(60) < n).astype(jnp.float64)
    x, y = problem["valid"]
    other = dict(problem, valid=(x.at[n:].set(x[::-1][:60 - n]),
                                 y.at[n:].set(jnp.roll(y[n:], 3, 1))))
    a, ga = _loss_grad(theta, static, problem, weights=weights)
    b, gb = _loss_grad(theta, static, other, weights=weights)
    np.testing.assert_allclose(float(a), float(b), rtol=1e-12)
    np.testing.assert_allclose(ga["pixels"], gb["pixels"], rtol=1e-10, atol=1e-14)
    c, _ = _loss_grad(theta, static, problem)
    assert abs(float(a) - float(c)) > 1e-6


def test_config_rejects_impossible_studies():
    with pytest.raises(ValueError, match="validation_sizes"):
        ce.Config(n_valid=500, validation_sizes=(100, 1000))
    with pytest.raises(ValueError, match="must divide 28"):
        ce.Config(study_resolutions=(5,))
    with pytest.raises(ValueError, match="batch_size"):
        ce.Config(batch_size=20)
    assert ce.Config(per_class=2, batch_size=20).batch_size == 20


def test_labels_are_grouped_by_class():
    y = np.asarray(ce._labels(3))
    assert y.shape == (30, 10)
    np.testing.assert_array_equal(y.argmax(1), np.repeat(np.arange(10), 3))
