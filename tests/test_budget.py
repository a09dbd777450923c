"""Reversible(budget=...): the last steps' gradients and VJP residuals kept by the forward
pass and used by the reverse pass instead of recomputing them.

The kept steps must give the hypergradients of the budget-0 method (and of Unrolled), the
reversal stays exact (a drift would raise), and the budget's two spellings (steps, bytes)
size what is kept."""

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp
import numpy as np
import pytest

import revlearn
from revlearn._problem import split_inexact
from revlearn._train import prepare
from revlearn.methods import _reversible
from _problems import layer_schedules, make

STEPS = 12


def rel(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    num = np.sqrt(sum(np.sum((np.asarray(x) - np.asarray(y)) ** 2) for x, y in zip(la, lb)))
    return num / np.sqrt(sum(np.sum(np.asarray(y) ** 2) for y in lb))


def momentum_hypergrads(model, method):
    """d(validation loss) w.r.t. (params0, hypers = per-weight L2 and the training inputs,
    per-layer lr and momentum schedules)."""
    loss_fn, meta_fn, params0, hypers = make(model)
    lr, mom = layer_schedules(params0, STEPS, lr=0.2)

    def f(p0, hyp, lr, mom):
        return meta_fn(revlearn.sgd(loss_fn, p0, hyp, lr=lr, momentum=mom, steps=STEPS,
                                    method=method))

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))(params0, hypers, lr, mom)


def step_bytes(model):
    loss_fn, _, params0, hypers = make(model)
    p = prepare(loss_fn, params0, hypers, lr=0.2, momentum=0.9, steps=STEPS)
    return p, revlearn.Reversible().step_bytes(p, *split_inexact(p.theta))


@pytest.mark.parametrize("model,budget", [("mlp", STEPS // 3), ("mlp", STEPS),
                                          pytest.param("convnet", 5, marks=pytest.mark.slow)])
def test_kept_steps_give_the_same_hypergradients(model, budget):
    v0, g0 = momentum_hypergrads(model, revlearn.Reversible(min_momentum=0.5))
    vb, gb = momentum_hypergrads(model, revlearn.Reversible(min_momentum=0.5, budget=budget))
    vu, gu = momentum_hypergrads(model, revlearn.Unrolled())
    assert abs(float(vb - v0)) <= 1e-12 * abs(float(v0))
    for i, name in enumerate(["params0", "hypers (L2 and inputs)", "lr", "momentum"]):
        assert rel(gb[i], g0[i]) < 1e-9, (name, rel(gb[i], g0[i]))
        assert rel(gb[i], gu[i]) < 1e-7, (name, rel(gb[i], gu[i]))
    # the training inputs are a hyperparameter: their slices are recomputed, not kept, and
    # still get their gradient
    assert float(jnp.max(jnp.abs(gb[1]["x"]))) > 0


def test_budget_in_bytes_keeps_what_fits():
    p, per = step_bytes("mlp")
    params_bytes = sum(int(np.prod(s)) * 8 for s in p.problem.shapes)
    # what is kept: the gradient plus the matrix products computed from the params (the
    # activations of the 16-example minibatch); the training inputs (a 64 x 784
    # hyperparameter) and the params themselves are recomputed
    theta_f, theta_o = split_inexact(p.theta)
    res = _reversible._kept_residuals(p.problem, theta_o, p.params0, theta_f)
    kept = [a.shape for k, a in res if k]
    dropped = [a.shape for k, a in res if not k]
    assert kept and all(s[0] == 16 and len(s) == 2 for s in kept), kept
    assert (64, 784) in dropped and all(s in dropped for s in p.problem.shapes)
    assert per == params_bytes + sum(int(np.prod(s)) * 8 for s in kept)
    for budget, steps in [(f"{3 * per + per // 2}B", 3), (f"{per - 1}B", 0), ("1GiB", STEPS),
                          (f"{per / 2**10:.6f}KiB", 1)]:
        assert revlearn.Reversible(budget=budget).kept_steps(p) == steps, budget
    assert revlearn.Reversible(budget=10**6).kept_steps(p) == STEPS
    assert revlearn.Reversible().kept_steps(p) == 0
    # what a user reads to size a budget
    loss_fn, _, params0, hypers = make("mlp")
    usage = revlearn.buffer_usage(loss_fn, params0, hypers, steps=STEPS, lr=0.2, momentum=0.9,
                                  method=revlearn.Reversible(budget=f"{5 * per}B"))
    assert (usage.kept_step_bytes, usage.kept_steps) == (per, 5)
    _, g_bytes = momentum_hypergrads("logistic", revlearn.Reversible(min_momentum=0.5,
                                                                     budget="1MB"))
    _, g_none = momentum_hypergrads("logistic", revlearn.Reversible(min_momentum=0.5))
    assert rel(g_bytes, g_none) < 1e-9


def test_adam_and_path_term_with_kept_steps():
    """Adam's cotangent reads the gradient (the kept one); a path term's VJP is kept too."""
    loss_fn, meta_fn, params0, hypers = make("logistic")

    def f(lr, method):
        wT, area = revlearn.train(loss_fn, params0, hypers, optimizer=revlearn.optim.adam(lr),
                                     steps=STEPS, method=method, path_fn=loss_fn)
        return area / STEPS + meta_fn(wT)

    lr = jnp.full(STEPS, 0.01)
    grad = lambda m: jax.jit(jax.grad(lambda l: f(l, m)))(lr)
    g0, gb, gu = (grad(revlearn.Reversible()), grad(revlearn.Reversible(budget=STEPS // 2)),
                  grad(revlearn.Unrolled()))
    assert rel(gb, g0) < 1e-9 and rel(gb, gu) < 1e-7
    assert float(jnp.linalg.norm(gb)) > 0


@pytest.mark.parametrize("budget", [-1, 2.5, True, "lots", "12", "3 parsecs", [4]])
def test_bad_budget_is_refused_at_construction(budget):
    with pytest.raises(ValueError, match=r"Reversible\(budget=.*number of steps"):
        revlearn.Reversible(budget=budget)


def test_kept_steps_under_vmap():
    """A budget under jax.vmap (the batched gradient's residuals are kept per problem)."""
    loss_fn, meta_fn, params0, hypers = make("logistic")

    def f(log_l2, method):
        hyp = {**hypers, "log_l2": jnp.full_like(hypers["log_l2"], log_l2)}
        return meta_fn(revlearn.sgd(loss_fn, params0, hyp, lr=0.3, momentum=0.9, steps=STEPS,
                                    method=method))

    ls = jnp.array([-5.0, -3.0, -1.0])
    grad = lambda m: jax.jit(jax.vmap(jax.grad(lambda l: f(l, m))))(ls)
    gb, gu = grad(revlearn.Reversible(budget=STEPS // 2)), grad(revlearn.Unrolled())
    np.testing.assert_allclose(np.asarray(gb), np.asarray(gu), rtol=1e-7)
    assert len(set(np.round(np.asarray(gb), 12))) == 3
