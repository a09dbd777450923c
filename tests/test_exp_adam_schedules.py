"""adam-schedules (the schedules experiment with Adam inside): its config and
hyperparameters, the projection that keeps beta1 above the bound the reversible
buffer is sized for, the seed-averaged hypergradient w.r.t. per-layer, per-step
learning rates, beta1 (traced) and initial scales against unrolled autodiff and
finite differences, the learning curve against the reversible run, and the smoke
run's results (the same smoke run that tests/test_cli.py drives through the
command line; in one pytest session the second run reuses its compiled
programs)."""

import jax

jax.config.update("jax_enable_x64", True)

import json
import math

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import revlearn
from revlearn import experiments, spaces
from revlearn.cli import main
from revlearn.experiments import schedules as sch


def test_adam_configuration():
    exp = experiments.get("adam-schedules")
    assert exp.Config is sch.AdamConfig and exp.smoke == sch.ADAM_SMOKE
    c = sch.AdamConfig()
    assert (c.DECAY, c.sizes, c.steps, c.meta_iterations) == (
        "b1", (784, 50, 50, 50, 10), 100, 50)
    theta = sch.initial_hypers(c)
    assert set(theta) == {"log_lr", "logit_b1", "log_scale"}
    assert sum(x.size for x in jax.tree_util.tree_leaves(theta)) == 1608
    h = spaces.constrain(theta)
    np.testing.assert_allclose(h["lr"][1]["w"], np.full(100, 1e-3))
    np.testing.assert_allclose(h["b1"][3]["b"], np.full(100, 0.9))
    # the SGD experiment keeps its own defaults
    assert sch.Config().init_log_lr == -1.0
    assert set(sch.initial_hypers(sch.Config())) == {"log_lr", "logit_momentum", "log_scale"}
    with pytest.raises(ValueError, match="init_decay"):
        sch.AdamConfig(init_decay=0.05)
    with pytest.raises(ValueError, match="min_decay"):
        sch.AdamConfig(min_decay=0.01)  # min_decay / 2 would fall off b1's grid (>= 2^-7)
    with pytest.raises(ValueError, match="b2"):
        sch.AdamConfig(b2=1.0)
    sch.Config(min_decay=0.01, init_decay=0.05)  # momentum's grid is finer


def test_projection_keeps_b1_above_the_bound():
    theta = sch.initial_hypers(sch.AdamConfig(sizes=(784, 10), steps=5))
    tx = optax.chain(optax.adam(0.5), sch.keep_logit_in("logit_b1", 0.1, sch.MAX_DECAY))
    state = tx.init(theta)
    grads = jax.tree_util.tree_map(jnp.ones_like, theta)  # pushes b1 down
    for _ in range(30):
        updates, state = tx.update(grads, state, theta)
        theta = optax.apply_updates(theta, updates)
    np.testing.assert_allclose(spaces.constrain(theta)["b1"][0]["b"], 0.1, rtol=1e-12)


@pytest.fixture(scope="module")
def tiny():
    config = sch.AdamConfig(sizes=(784, 6, 10), steps=6, n_average=2, n_train=60,
                            batch_size=20, init_log_lr=math.log(0.01), init_decay=0.8)
    data, static = sch._data(config), config.program()
    theta = sch.initial_hypers(config)
    leaves, tdef = jax.tree_util.tree_flatten(theta)
    keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
    theta = jax.tree_util.tree_unflatten(
        tdef, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    return data, static, theta


def _flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(tree)])


@pytest.mark.slow  # 36 s; Adam against Unrolled is covered by test_properties.py, FD by test_optim.py
def test_adam_hypergradient_matches_unrolled_and_finite_differences(tiny):
    data, static, theta = tiny
    key = jax.random.PRNGKey(1)
    loss, g_rev, _, sq = sch._hypergrad(theta, key, data, static)

    def one(th, k):
        return sch.meta_objective(th, k, data, static, revlearn.Unrolled())[0]

    vg_unr = jax.jit(jax.value_and_grad(
        lambda th: revlearn.meta.average_over(one, static.n_average)(th, key)))
    f_unr = lambda th: vg_unr(th)[0]  # noqa: E731  (one compiled program for everything)
    loss_unr, g_unr = vg_unr(theta)
    np.testing.assert_allclose(loss, loss_unr, rtol=1e-10)
    a, b = _flat(g_rev), _flat(g_unr)
    assert np.linalg.norm(a - b) <= 1e-7 * np.linalg.norm(b)
    for name in ("log_lr", "logit_b1", "log_scale"):  # every kind gets a gradient
        assert np.linalg.norm(_flat(g_rev[name])) > 1e-6 * np.linalg.norm(a), name
    assert np.all(_flat(sq) >= a**2 - 1e-15)

    # Central differences along random directions: in (log_lr, log_scale) with a tiny
    # step; in logit_b1 with a step large against b1's grid (2^-24, a staircase that
    # every method differentiates as the identity).
    leaves, tdef = jax.tree_util.tree_flatten(theta)
    rng = np.random.default_rng(2)
    for keys, eps, rtol in ((("log_lr", "log_scale"), 1e-5, 1e-5), (("logit_b1",), 1e-3, 1e-3)):
        d = {k: jax.tree_util.tree_map(
            lambda x: jnp.asarray(rng.standard_normal(x.shape)) if k in keys
            else jnp.zeros_like(x), theta[k]) for k in theta}
        shift = lambda s: jax.tree_util.tree_map(  # noqa: E731
            lambda x, dx: x + s * dx, theta, d)
        fd = (f_unr(shift(eps)) - f_unr(shift(-eps))) / (2 * eps)
        directional = float(np.dot(a, _flat(d)))
        assert abs(fd - directional) <= rtol * abs(directional), (keys, fd, directional)


def test_adam_curve_matches_reversible_training(tiny):
    data, static, theta = tiny
    key = jax.random.PRNGKey(1)
    loss = sch._hypergrad(theta, key, data, static)[0]  # compiled above: a cache hit
    finals = []
    for k in jax.random.split(key, static.n_average):
        curve, final = sch._curve(theta, k, data, static, 1)
        assert curve.shape == (static.steps + 1,) and np.all(np.isfinite(curve))
        finals.append(final["train_loss"])
    # float Adam against fixed-point Adam: equal up to the fixed point's rounding
    np.testing.assert_allclose(np.mean(finals), loss, rtol=1e-9)


def test_smoke_run_records_the_adam_schedules(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "adam-schedules", "--smoke", "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    summary = json.loads((out / "summary.json").read_text())
    assert "grad_logit_b1_w_first5" in summary
    assert summary["n_hyperparameters"] == 2 * 2 * 6 + 2
    res = revlearn.meta.RunDir(out).load_arrays("results")
    c = sch.ADAM_SMOKE
    for tag in ("initial", "learned"):
        for t in ("w", "b"):
            b1 = res[f"{tag}/b1/0/{t}"]
            assert b1.shape == (c.steps,) and np.all((b1 >= c.min_decay) & (b1 < 1))
        assert np.all(np.isfinite(res[f"{tag}/curve"]))
    np.testing.assert_allclose(res["initial/lr/0/w"], 1e-3)
    records = revlearn.meta.RunDir(out).read_metrics()
    assert len(records) == c.meta_iterations and "scale_0w" in records[0]
    assert {p.name for p in (out / "figures").glob("*.png")} == {
        "schedules.png", "learning_curves.png", "meta_gradient.png", "initial_scales.png"}
