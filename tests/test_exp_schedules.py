"""schedules: the hyperparameter count and spaces, the projection that keeps
momentum above the bound the reversible buffer is sized for, the mode defaults,
and the seed-averaged hypergradient w.r.t. per-layer, per-step learning rates,
momenta (traced) and initial scales against unrolled autodiff and finite
differences."""

import jax

jax.config.update("jax_enable_x64", True)

import math

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import revlearn
from revlearn.experiments import schedules as sch


def test_paper_configuration_has_1608_hyperparameters():
    theta = sch.initial_hypers(sch.Config())
    assert sum(x.size for x in jax.tree_util.tree_leaves(theta)) == 1608
    h = sch.constrained(theta)
    np.testing.assert_allclose(h["lr"][2]["b"], np.full(100, math.exp(-1)))
    np.testing.assert_allclose(h["momentum"][0]["w"], np.full(100, 0.5))
    np.testing.assert_allclose(h["scale"][3]["w"], math.exp(-3))


def test_modes_fill_in_their_defaults():
    long = sch.Config(mode="long").resolved()
    assert (long.sizes, long.steps, long.n_average) == ((784, 50, 10), 1000, 4)
    avg = sch.Config(mode="averaged", n_average=3).resolved()
    assert avg.n_average == 3 and avg.steps == 100
    assert sch.Config(steps=7).resolved().steps == 7
    with pytest.raises(ValueError, match="n_valid"):
        sch.Config(objective="valid")
    with pytest.raises(ValueError, match="min_momentum"):
        sch.Config(init_momentum=0.05)


def test_projection_keeps_momentum_above_the_bound():
    theta = sch.initial_hypers(sch.Config(sizes=(784, 10), steps=5))
    tx = optax.chain(optax.adam(0.5), sch.keep_momentum_in(0.1, sch.MAX_MOMENTUM))
    state = tx.init(theta)
    # a gradient that always pushes momentum down and the learning rate up
    grads = jax.tree_util.tree_map(jnp.ones_like, theta)
    grads["log_lr"] = jax.tree_util.tree_map(lambda x: -x, grads["log_lr"])
    for _ in range(30):
        updates, state = tx.update(grads, state, theta)
        theta = optax.apply_updates(theta, updates)
    mom = sch.constrained(theta)["momentum"][0]["w"]
    np.testing.assert_allclose(mom, 0.1, rtol=1e-12)  # pinned at the bound
    assert np.all(theta["log_lr"][0]["w"] > -1 + 10)  # the other leaves move freely


@pytest.fixture(scope="module")
def tiny():
    # steps == the hidden width, so [steps] schedules would be ambiguous for the biases
    config = sch.Config(sizes=(784, 6, 10), steps=6, n_average=2, n_train=60, batch_size=20,
                        init_log_lr=-0.5, init_momentum=0.6)
    data = sch._splits(config)
    static = sch._Static.of(config)
    theta = sch.initial_hypers(config)
    leaves, tdef = jax.tree_util.tree_flatten(theta)
    keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
    theta = jax.tree_util.tree_unflatten(
        tdef, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    return data, static, theta


def _flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(tree)])


def test_averaged_hypergradient_matches_unrolled_and_finite_differences(tiny):
    data, static, theta = tiny
    key = jax.random.PRNGKey(1)
    loss, g_rev, metrics, sq = sch._hypergrad(theta, key, data, static)
    # the same average over the same keys, differentiated by unrolling
    def one(th, k):
        return sch.meta_objective(th, k, data, static, revlearn.Unrolled())[0]

    vg_unr = jax.jit(jax.value_and_grad(
        lambda th: revlearn.meta.average_over(one, static.n_average)(th, key)))
    f_unr = lambda th: vg_unr(th)[0]  # noqa: E731  (one compiled program for everything)
    loss_unr, g_unr = vg_unr(theta)
    np.testing.assert_allclose(loss, loss_unr, rtol=1e-10)
    a, b = _flat(g_rev), _flat(g_unr)
    assert np.linalg.norm(a - b) <= 1e-7 * np.linalg.norm(b)
    for name in ("log_lr", "logit_momentum", "log_scale"):  # every kind gets a gradient
        assert np.linalg.norm(_flat(g_rev[name])) > 1e-6 * np.linalg.norm(a), name
    # the mean square is at least the square of the mean (Jensen), equal only for K = 1
    assert np.all(_flat(sq) >= a**2 - 1e-15)

    # Finite differences along a random direction in (log_lr, log_scale). Not along
    # logit_momentum: sgd applies round(gamma * 2^16) / 2^16, a staircase whose steps
    # (1.5e-5) are larger than a finite-difference step, and differentiates it as if
    # it were the identity; that derivative is checked against Unrolled above.
    leaves, tdef = jax.tree_util.tree_flatten(theta)
    dkeys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
    d = jax.tree_util.tree_unflatten(
        tdef, [jax.random.normal(k, x.shape) for x, k in zip(leaves, dkeys)])
    d["logit_momentum"] = jax.tree_util.tree_map(jnp.zeros_like, d["logit_momentum"])
    d = jax.tree_util.tree_leaves(d)
    shift = lambda s: jax.tree_util.tree_unflatten(  # noqa: E731
        tdef, [x + s * dx for x, dx in zip(leaves, d)])
    eps = 1e-5
    fd = (f_unr(shift(eps)) - f_unr(shift(-eps))) / (2 * eps)
    directional = float(np.dot(a, _flat(d)))
    assert abs(fd - directional) <= 1e-5 * abs(directional)


def test_curve_matches_reversible_training(tiny):
    data, static, theta = tiny
    key = jax.random.PRNGKey(1)
    loss = sch._hypergrad(theta, key, data, static)[0]  # compiled above: a cache hit
    every2 = static._replace(curve_every=2)
    finals = []
    for k in jax.random.split(key, static.n_average):
        curve, final = sch._curve(theta, k, data, every2)
        assert curve.shape == (static.steps + 1,)
        assert np.all(np.isnan(np.asarray(curve[1::2]))) and np.all(np.isfinite(curve[::2]))
        finals.append(final["train_loss"])
    np.testing.assert_allclose(np.mean(finals), loss, rtol=1e-9)
