"""The `toy` experiment's own logic: the meta-objective's hypergradient matches
unrolled autodiff and finite differences, the probe reads out the exactly
reversed path, and the naive reversal's error grows about like eps prod 1/gamma."""

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


def _theta(log_lr=CFG.init_log_lr, momentum=CFG.init_momentum, seed=0, steps=CFG.steps):
    rng = np.random.default_rng(seed)
    return {"log_lr": jnp.asarray(log_lr + 0.1 * rng.standard_normal(steps)),
            "logit_momentum": jnp.asarray(math.log(momentum / (1 - momentum))
                                          + 0.1 * rng.standard_normal(steps))}


def test_loss_is_the_papers():
    # 800 sigmoid(R / 500), R = 100 (w2 - w1^2)^2 + (1 - w1)^2 + 200 w1, at the start point
    r = 100 * (3.9 - 1.4**2) ** 2 + (1 - 1.4) ** 2 + 200 * 1.4
    np.testing.assert_allclose(toy.loss(W0), 800 / (1 + math.exp(-r / 500)), rtol=1e-14)


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
        np.testing.assert_allclose(grads[k], u_grads[k], rtol=1e-7,
                                   atol=1e-10 * np.abs(u_grads[k]).max())
    # Finite differences along a random direction: tiny steps in log_lr; in
    # logit_momentum steps large against the 2^-16 grid that momentum is rounded to.
    rng = np.random.default_rng(1)
    f = jax.jit(unrolled)
    for key, eps, rtol in (("log_lr", 1e-6, 1e-5), ("logit_momentum", 5e-2, 5e-2)):
        d = jnp.asarray(rng.standard_normal(CFG.steps))
        plus = f({**theta, key: theta[key] + eps * d})
        minus = f({**theta, key: theta[key] - eps * d})
        np.testing.assert_allclose(float(jnp.vdot(grads[key], d)), (plus - minus) / (2 * eps),
                                   rtol=rtol)


def test_probe_reads_out_the_exactly_reversed_path():
    theta = _theta(seed=2)
    _, _, recovered = toy.hypergrad(theta, W0, min_momentum=CFG.min_momentum)
    h = spaces.constrain(theta)
    ws = toy.forward_path(W0, h["lr"], h["momentum"])
    # the fixed-point path differs from the float64 one by rounding only
    np.testing.assert_allclose(recovered, ws[:-1], rtol=0, atol=1e-12)
    fixed_w0 = np.round(np.asarray(W0) * 2.0**52) / 2.0**52  # w_0 in fixed point
    np.testing.assert_array_equal(np.asarray(recovered)[0], fixed_w0)
    check = revlearn.check_reversal(toy._loss_fn, W0, None, lr=h["lr"], momentum=h["momentum"],
                                    steps=CFG.steps, method=toy.reversible(CFG.min_momentum))
    assert check.passed


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_naive_reversal_error_grows_about_like_inverse_momentum(dtype):
    steps, gamma = CFG.reverse_steps, CFG.reverse_momentum
    lr = jnp.full((steps,), math.exp(CFG.reverse_log_lr))
    fw, back = toy.naive_roundtrip(W0, lr, jnp.full((steps,), gamma), dtype)
    err = np.linalg.norm(np.asarray(back - fw, np.float64), axis=1)
    bound = np.finfo(dtype).eps * (1 / gamma) ** (steps - np.arange(steps + 1))
    assert 0.01 * bound[0] < err[0] < 10 * bound[0]  # w_0 is lost by about eps / gamma^T
    t = np.flatnonzero(err > 100 * np.finfo(dtype).eps * np.abs(np.asarray(fw)).max())
    slope = -np.polyfit(t, np.log(err[t]), 1)[0]  # log growth per reversed step
    assert 0.5 * math.log(1 / gamma) < slope < 1.5 * math.log(1 / gamma)


@pytest.mark.parametrize("kwargs,match", [({"reverse_momentum": 0.4}, "reverse_momentum"),
                                          ({"meta_lr": 0.0}, "meta_lr"),
                                          ({"steps": 0}, "steps")])
def test_config_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        toy.Config(**kwargs)
