"""schedules: the hyperparameter count and spaces, the projection that keeps
momentum above the bound the reversible buffer is sized for, the stopping rule,
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
from revlearn import spaces
from revlearn.experiments import config_to_dict
from revlearn.experiments import schedules as sch


def test_paper_configuration_has_1608_hyperparameters():
    theta = sch.initial_hypers(sch.Config())
    assert sum(x.size for x in jax.tree_util.tree_leaves(theta)) == 1608
    h = spaces.constrain(theta)
    np.testing.assert_allclose(h["lr"][2]["b"], np.full(100, math.exp(-1)))
    np.testing.assert_allclose(h["momentum"][0]["w"], np.full(100, 0.5))
    np.testing.assert_allclose(h["scale"][3]["w"], math.exp(-3))
    with pytest.raises(ValueError, match="init_decay"):
        sch.Config(init_decay=0.05)  # below min_decay


def test_projection_keeps_momentum_above_the_bound():
    theta = sch.initial_hypers(sch.Config(sizes=(784, 10), steps=5))
    tx = optax.chain(optax.adam(0.5), sch.keep_logit_in("logit_momentum", 0.1, sch.MAX_DECAY))
    state = tx.init(theta)
    # a gradient that always pushes momentum down and the learning rate up
    grads = jax.tree_util.tree_map(jnp.ones_like, theta)
    grads["log_lr"] = jax.tree_util.tree_map(lambda x: -x, grads["log_lr"])
    for _ in range(30):
        updates, state = tx.update(grads, state, theta)
        theta = optax.apply_updates(theta, updates)
    mom = spaces.constrain(theta)["momentum"][0]["w"]
    np.testing.assert_allclose(mom, 0.1, rtol=1e-12)  # pinned at the bound
    assert np.all(theta["log_lr"][0]["w"] > -1 + 10)  # the other leaves move freely


def test_chaos_stops_meta_training_and_keeps_the_hyperparameters(tmp_path, monkeypatch):
    """A meta-gradient 100 times the previous ones stops the run at that iteration: its
    record is written (chaos, stopped), its update is not applied, the run is summarised
    from the hyperparameters before it."""
    config = sch.Config(sizes=(784, 10), steps=3, meta_iterations=8, n_train=100,
                        batch_size=50)
    real, calls = sch._hypergrad, []

    def exploding(theta, key, data, static):
        f, g, metrics, sq = real(theta, key, data, static)
        calls.append(theta)
        scale = 100.0 if len(calls) == 6 else 1.0  # meta-iteration 5 explodes
        return f, jax.tree_util.tree_map(lambda x: scale * x, g), metrics, sq

    monkeypatch.setattr(sch, "_hypergrad", exploding)
    rd = revlearn.meta.RunDir(tmp_path / "run", progress=False)
    rd.write_config({"experiment": "schedules", "config": config_to_dict(config)})  # for plot
    summary = sch.run(config, rd)
    records = rd.read_metrics()
    assert [r["iteration"] for r in records] == list(range(6)) and len(calls) == 6
    assert records[-1]["stopped"] and records[-1]["chaos"]
    assert not any(r["chaos"] for r in records[:-1])
    assert summary["meta_iterations"] == 5 and summary["stopped_by_chaos"]
    kept = rd.load_arrays("hypers_final", calls[5])
    for a, b in zip(jax.tree_util.tree_leaves(kept), jax.tree_util.tree_leaves(calls[5])):
        np.testing.assert_array_equal(a, b)
    # the scales of every meta-iteration are recorded, the stopping one included
    np.testing.assert_allclose(records[-1]["scale_0w"], np.exp(calls[5]["log_scale"][0]["w"]))


@pytest.fixture(scope="module")
def tiny():
    # steps == the hidden width, so [steps] schedules would be ambiguous for the biases
    config = sch.Config(sizes=(784, 6, 10), steps=6, n_average=2, n_train=60, batch_size=20,
                        init_log_lr=-0.5, init_decay=0.6)
    data, static = sch._data(config), config.program()
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
    finals = []
    for k in jax.random.split(key, static.n_average):
        curve, final = sch._curve(theta, k, data, static, 2)
        assert curve.shape == (static.steps + 1,)
        assert np.all(np.isnan(np.asarray(curve[1::2]))) and np.all(np.isfinite(curve[::2]))
        finals.append(final["train_loss"])
    np.testing.assert_allclose(np.mean(finals), loss, rtol=1e-9)
