"""Hypergradients three ways: Reversible, Unrolled (and Checkpointed), finite differences.

Always under jit. float64: Reversible agrees with Unrolled to 1e-7 relative (the only
difference is the 2^-52 fixed-point quantisation)."""

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp
import numpy as np
import pytest

import revlearn
from _problems import layer_schedules, make

STEPS = 20


def rel(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    num = np.sqrt(sum(np.sum((np.asarray(x) - np.asarray(y)) ** 2) for x, y in zip(la, lb)))
    den = np.sqrt(sum(np.sum(np.asarray(y) ** 2) for y in lb))
    return num / den


def norm(a):
    return np.sqrt(sum(np.sum(np.asarray(x) ** 2) for x in jax.tree_util.tree_leaves(a)))


def hypergrads(model, method, dtype=jnp.float64):
    loss_fn, meta_fn, params0, hypers = make(model, dtype)
    lr, mom = layer_schedules(params0, STEPS, lr=0.2)

    def f(p0, hyp, lr, mom):
        return meta_fn(revlearn.sgd(loss_fn, p0, hyp, lr=lr, momentum=mom, steps=STEPS, method=method))

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))(params0, hypers, lr, mom)


@pytest.mark.parametrize("model", ["logistic", "mlp"])
def test_reversible_matches_unrolled_and_checkpointed(model):
    v_rev, g_rev = hypergrads(model, revlearn.Reversible(min_momentum=0.5))
    v_unr, g_unr = hypergrads(model, revlearn.Unrolled())
    v_chk, g_chk = hypergrads(model, revlearn.Checkpointed(every=6))
    assert abs(v_rev - v_unr) <= 1e-12 * abs(v_unr)
    names = ["params0", "hypers (per-weight L2 and training data)", "lr (per step, per layer)",
             "momentum (per step, per layer)"]
    for i, name in enumerate(names):
        assert rel(g_rev[i], g_unr[i]) < 1e-7, (name, rel(g_rev[i], g_unr[i]))
        assert rel(g_chk[i], g_unr[i]) < 1e-12, (name, rel(g_chk[i], g_unr[i]))
    # the gradients are not trivially zero
    assert all(norm(g) > 0 for g in g_rev)
    assert float(jnp.max(jnp.abs(g_rev[1]["x"]))) > 0 and float(jnp.max(jnp.abs(g_rev[1]["log_l2"]))) > 0


def test_float32_model_reversible_matches_unrolled():
    _, g_rev = hypergrads("mlp", revlearn.Reversible(min_momentum=0.5), jnp.float32)
    _, g_unr = hypergrads("mlp", revlearn.Unrolled(), jnp.float32)
    for i in range(4):
        assert rel(g_rev[i], g_unr[i]) < 1e-4


def test_checker_agrees_with_finite_differences():
    loss_fn, meta_fn, params0, hypers = make("logistic")
    lr, mom = layer_schedules(params0, STEPS, lr=0.2)
    report = revlearn.check_hypergradients(loss_fn, meta_fn, params0, {"log_l2": hypers["log_l2"]} | {"x": hypers["x"]},
                                           lr=lr, momentum=mom, steps=STEPS,
                                           method=revlearn.Reversible(min_momentum=0.5))
    assert report.passed, str(report)
    assert max(report.rel_err_fd) < 1e-4
    assert max(report.rel_err_unrolled) < 1e-7


def test_path_term_area_under_training_curve():
    loss_fn, meta_fn, params0, hypers = make("logistic")
    T = 15

    def f(lr, method):
        wT, area = revlearn.sgd(loss_fn, params0, hypers, lr=lr, momentum=0.9, steps=T,
                                method=method, path_fn=loss_fn)
        return area / T + meta_fn(wT)

    lr = jnp.full(T, 0.3)
    v1, g1 = jax.jit(jax.value_and_grad(lambda l: f(l, revlearn.Reversible())))(lr)
    v2, g2 = jax.jit(jax.value_and_grad(lambda l: f(l, revlearn.Unrolled())))(lr)
    assert abs(v1 - v2) < 1e-12
    assert rel(g1, g2) < 1e-7
    h = 1e-6
    e = jnp.zeros(T).at[3].set(h)
    fd = (f(lr + e, revlearn.Unrolled()) - f(lr - e, revlearn.Unrolled())) / (2 * h)
    assert abs(float(g1[3]) - float(fd)) < 1e-5 * max(abs(float(fd)), 1e-3)


def test_gradient_wrt_initial_velocity():
    loss_fn, meta_fn, params0, hypers = make("logistic")
    v0 = jax.tree_util.tree_map(lambda p: 0.01 * jnp.ones_like(p), params0)

    def f(v0, method):
        return meta_fn(revlearn.sgd(loss_fn, params0, hypers, lr=0.3, momentum=0.8, steps=10,
                                    v0=v0, method=method))

    g1 = jax.jit(jax.grad(lambda v: f(v, revlearn.Reversible())))(v0)
    g2 = jax.jit(jax.grad(lambda v: f(v, revlearn.Unrolled())))(v0)
    assert rel(g1, g2) < 1e-7 and norm(g2) > 0


def test_vmap_over_seeds_and_non_float_hypers():
    """A PRNG key and an int in hypers get no gradient and break nothing; vmap over seeds."""
    from revlearn import models

    x = jax.random.uniform(jax.random.PRNGKey(0), (64, 784))
    y = jax.nn.one_hot(jnp.arange(64) % 10, 10)
    params0 = models.mlp_init(jax.random.PRNGKey(1), [784, 10], scale=0.0)

    def loss_fn(params, hypers, step):
        xb, yb = models.minibatch(x, y, 16, step, hypers["key"])
        noise = 0.01 * jax.random.normal(jax.random.fold_in(hypers["key"], step), xb.shape)
        return (models.nll(models.mlp_apply(params, xb + noise), yb)
                + jnp.exp(hypers["log_l2"]) * hypers["count"] * jnp.sum(params[0]["w"] ** 2))

    def meta(log_l2, key, method):
        hyp = {"log_l2": log_l2, "key": key, "count": jnp.int32(1)}
        wT = revlearn.sgd(loss_fn, params0, hyp, lr=0.5, momentum=0.9, steps=12, method=method)
        return models.nll(models.mlp_apply(wT, x), y)

    keys = jax.random.split(jax.random.PRNGKey(5), 3)
    g_rev = jax.jit(jax.vmap(jax.grad(lambda l, k: meta(l, k, revlearn.Reversible())), (None, 0)))(-3.0, keys)
    g_unr = jax.jit(jax.vmap(jax.grad(lambda l, k: meta(l, k, revlearn.Unrolled())), (None, 0)))(-3.0, keys)
    assert g_rev.shape == (3,)
    np.testing.assert_allclose(np.asarray(g_rev), np.asarray(g_unr), rtol=1e-7)
    assert len(set(np.round(np.asarray(g_rev), 12))) == 3  # seeds really differ


def test_loss_closing_over_traced_hyperparameter_gets_its_gradient():
    """Values the loss closes over (here a traced L2 strength) are hoisted and differentiated."""
    loss_fn, meta_fn, params0, hypers = make("logistic")

    def f(log_l2, method):
        def closed_loss(p, hyp, t):
            return loss_fn(p, hyp, t) + jnp.exp(log_l2) * jnp.sum(p[0]["w"] ** 2)
        return meta_fn(revlearn.sgd(closed_loss, params0, hypers, lr=0.5, momentum=0.9, steps=10,
                                    method=method))

    g1 = jax.jit(jax.grad(lambda l: f(l, revlearn.Reversible())))(-2.0)
    g2 = jax.jit(jax.grad(lambda l: f(l, revlearn.Unrolled())))(-2.0)
    assert g2 != 0 and abs(g1 - g2) < 1e-7 * abs(g2)


def test_dict_and_tuple_pytrees_with_group_prefix_schedules():
    """Flax-style nested dicts; lr given per top-level group (a prefix of params0)."""
    x = jax.random.uniform(jax.random.PRNGKey(0), (32, 5))
    params0 = {"params": {"dense": {"kernel": 0.1 * jnp.ones((5, 3)), "bias": jnp.zeros(3)}},
               "extra": (jnp.ones(2),)}

    def loss_fn(p, hyp, t):
        out = jnp.tanh(x @ p["params"]["dense"]["kernel"] + p["params"]["dense"]["bias"])
        return jnp.mean((out - hyp) ** 2) + jnp.sum(p["extra"][0] ** 2)

    lr = {"params": jnp.linspace(0.1, 0.5, 8), "extra": 0.05}

    def f(lr, method):
        wT = revlearn.sgd(loss_fn, params0, 0.3, lr=lr, momentum=0.7, steps=8, method=method)
        return jnp.sum(wT["params"]["dense"]["kernel"]) + jnp.sum(wT["extra"][0])

    g1 = jax.jit(jax.grad(lambda l: f(l, revlearn.Reversible())))(lr)
    g2 = jax.jit(jax.grad(lambda l: f(l, revlearn.Unrolled())))(lr)
    assert g1["params"].shape == (8,) and jnp.shape(g1["extra"]) == ()
    assert rel(g1, g2) < 1e-7


def test_per_weight_momentum_and_per_column_lr_match_unrolled():
    """Per-weight momentum gives every weight its own buffer head (the scatter path);
    a per-column lr ([1, 1, n_out]) and per-step bias lr exercise the sums back to each shape."""
    loss_fn, meta_fn, params0, hypers = make("logistic")
    steps = 20
    w, b = params0[0]["w"], params0[0]["b"]
    mom = [{"w": jax.random.uniform(jax.random.PRNGKey(1), w.shape, minval=0.5, maxval=0.95),
            "b": jnp.full((steps,) + b.shape, 0.8)}]
    lr = [{"w": jnp.full((1, 1, w.shape[1]), 0.4), "b": jnp.full((steps,), 0.3)}]

    def f(lr, mom, method):
        return meta_fn(revlearn.sgd(loss_fn, params0, hypers, lr=lr, momentum=mom, steps=steps,
                                    method=method))

    g_rev = jax.jit(jax.grad(lambda l, m: f(l, m, revlearn.Reversible(min_momentum=0.5)),
                             argnums=(0, 1)))(lr, mom)
    g_unr = jax.jit(jax.grad(lambda l, m: f(l, m, revlearn.Unrolled()), argnums=(0, 1)))(lr, mom)
    for a, b_ in zip(jax.tree_util.tree_leaves(g_rev), jax.tree_util.tree_leaves(g_unr)):
        assert a.shape == b_.shape
        assert rel(a, b_) < 1e-7, rel(a, b_)
