"""The `toy` experiment's own logic: the hand-written gradient is the gradient of
the loss (and differentiable), the meta-objective's hypergradient matches
unrolled autodiff and finite differences, the probe reads out the exactly
reversed path, and the naive float reversal's error grows about like
prod 1/gamma."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import revlearn
from revlearn import spaces
from revlearn.experiments import toy

CFG = toy.Config()
W0 = jnp.asarray(CFG.w0, jnp.float64)


def _plain(w):
    x, y = w[0], w[1]
    return ((x * x + y - 11.0) ** 2 + (x + y * y - 7.0) ** 2) / 128.0


def _theta(lr=0.3, momentum=0.5, seed=0):
    rng = np.random.default_rng(seed)
    return {"log_lr": jnp.asarray(math.log(lr) + 0.1 * rng.standard_normal(CFG.steps)),
            "logit_momentum": jnp.asarray(math.log(momentum / (1 - momentum))
                                          + 0.1 * rng.standard_normal(CFG.steps))}


def test_hand_written_gradient_and_its_derivative_are_right():
    pts = jax.random.uniform(jax.random.PRNGKey(0), (50, 2), jnp.float64, -5, 5)
    g = jax.vmap(jax.grad(toy.loss))(pts)
    np.testing.assert_allclose(g, jax.vmap(jax.grad(_plain))(pts), rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(jax.vmap(toy.loss_grad)(pts), g, rtol=0, atol=0)
    hess = jax.vmap(jax.hessian(toy.loss))(pts)
    np.testing.assert_allclose(hess, jax.vmap(jax.hessian(_plain))(pts), rtol=1e-12, atol=1e-13)


def test_hypergradient_matches_unrolled_and_finite_differences():
    theta = _theta()
    value, grads, _ = toy.hypergrad(theta, W0, min_momentum=CFG.min_momentum)

    def unrolled(theta):
        h = spaces.constrain(theta)
        w = revlearn.sgd(toy._loss_fn, W0, None, lr=h["lr"], momentum=h["momentum"],
                         steps=CFG.steps, method=revlearn.Unrolled())
        return toy.loss(w)

    u_value, u_grads = jax.jit(jax.value_and_grad(unrolled))(theta)
    np.testing.assert_allclose(value, u_value, rtol=1e-12)
    for k in theta:
        np.testing.assert_allclose(grads[k], u_grads[k], rtol=1e-7, atol=1e-12 * np.abs(
            u_grads[k]).max())
    # Finite differences along a random direction: tiny steps in log_lr; in
    # logit_momentum steps large against the 2^-16 grid that momentum is rounded to.
    rng = np.random.default_rng(1)
    f = jax.jit(unrolled)
    for key, eps, rtol in (("log_lr", 1e-6, 1e-6), ("logit_momentum", 1e-2, 2e-2)):
        d = jnp.asarray(rng.standard_normal(CFG.steps))
        plus = f({**theta, key: theta[key] + eps * d})
        minus = f({**theta, key: theta[key] - eps * d})
        np.testing.assert_allclose(float(jnp.vdot(grads[key], d)), (plus - minus) / (2 * eps),
                                   rtol=rtol)


def test_probe_reads_out_the_exactly_reversed_path():
    theta = _theta(seed=2)
    _, _, recovered = toy.hypergrad(theta, W0, min_momentum=CFG.min_momentum)
    h = spaces.constrain(theta)
    ws, _ = toy.float_forward(W0, h["lr"], h["momentum"])
    # the fixed-point path differs from the float64 one by rounding only
    np.testing.assert_allclose(recovered, ws[:-1], rtol=0, atol=1e-12)
    fixed_w0 = np.round(np.asarray(W0) * 2.0**52) / 2.0**52  # w_0 in fixed point
    np.testing.assert_array_equal(np.asarray(recovered)[0], fixed_w0)
    check = revlearn.check_reversal(toy._loss_fn, W0, None, lr=h["lr"], momentum=h["momentum"],
                                    steps=CFG.steps,
                                    method=revlearn.Reversible(min_momentum=CFG.min_momentum))
    assert check.passed


def test_naive_reversal_error_grows_about_like_inverse_momentum():
    lr, gamma = jnp.full((CFG.steps,), 0.3), jnp.full((CFG.steps,), 0.5)
    ws, vs = toy.float_forward(W0, lr, gamma)
    naive = toy.naive_reverse(ws[-1], vs[-1], lr, gamma)
    np.testing.assert_array_equal(naive[-1], ws[-1])
    err = np.linalg.norm(np.asarray(naive - ws), axis=1)
    assert err[0] > 1e-2  # w_0 is lost
    t = np.flatnonzero((err > 1e-13) & (err < 1e-2))
    slope = -np.polyfit(t, np.log(err[t]), 1)[0]  # log growth per reversed step
    assert 0.5 * math.log(2.0) < slope < 1.5 * math.log(2.0)


@pytest.mark.parametrize("kwargs,match", [({"snapshots": (0, 40)}, "snapshots"),
                                          ({"init_momentum": 0.005}, "init_momentum"),
                                          ({"init_lr": 0.0}, "init_lr")])
def test_config_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        toy.Config(**kwargs)
