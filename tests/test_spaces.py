"""Tests of revlearn.spaces: log/logit round trips, prefixes, schedule bases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from revlearn.spaces import (
    constrain,
    fit_coeffs,
    fourier_basis,
    identity,
    log_space,
    logit_space,
    piecewise_linear_basis,
    smooth_schedule,
    space_of,
    unconstrain,
)

FAST = settings(max_examples=60, deadline=None)


# -------------------------------------------------------------- transforms


@FAST
@given(st.floats(min_value=1e-30, max_value=1e30))
def test_log_round_trip(x):
    x64 = np.float64(x)
    got = float(log_space.forward(log_space.inverse(jnp.asarray(x64, jnp.float32))))
    assert got == pytest.approx(float(np.float32(x64)), rel=1e-5)


@FAST
@given(st.floats(min_value=1e-6, max_value=1 - 1e-6))
def test_logit_round_trip(p):
    got = float(logit_space.forward(logit_space.inverse(jnp.asarray(p, jnp.float32))))
    assert got == pytest.approx(p, rel=1e-4, abs=1e-6)


@FAST
@given(st.floats(min_value=-20.0, max_value=20.0))
def test_inverse_of_forward(u):
    x = jnp.asarray(u, jnp.float32)
    for space in (log_space, identity):
        assert float(space.inverse(space.forward(x))) == pytest.approx(u, rel=1e-5, abs=1e-5)
    if abs(u) <= 8:  # beyond, sigmoid(u) rounds to 1 - 2^-24 steps in float32
        assert float(logit_space.inverse(logit_space.forward(x))) == pytest.approx(u, rel=1e-3, abs=1e-3)


def test_space_of_prefixes():
    assert space_of("log_lr") == (log_space, "lr")
    assert space_of("logit_momentum") == (logit_space, "momentum")
    assert space_of("log_init_scale") == (log_space, "init_scale")
    assert space_of("seed_scale") == (identity, "seed_scale")
    assert space_of("logistic") == (identity, "logistic")
    with pytest.raises(ValueError, match="'log_' has the 'log' prefix but no name after it"):
        space_of("log_")


def test_constrain_and_unconstrain():
    stored = {
        "log_lr": jnp.log(jnp.array([0.1, 0.2])),
        "logit_momentum": jnp.array(0.0),
        "log_l2": [{"w": jnp.log(1e-3), "b": jnp.log(1e-4)}],
        "shift": jnp.array(-3.0),
    }
    values = constrain(stored)
    assert sorted(values) == ["l2", "lr", "momentum", "shift"]
    np.testing.assert_allclose(values["lr"], [0.1, 0.2], rtol=1e-6)
    assert float(values["momentum"]) == pytest.approx(0.5)
    assert float(values["l2"][0]["w"]) == pytest.approx(1e-3, rel=1e-5)
    assert float(values["shift"]) == -3.0
    back = unconstrain(values, {"lr": "log", "momentum": "logit", "l2": log_space})
    assert sorted(back) == sorted(stored)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(stored)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_constrain_differentiable_under_jit():
    g = jax.jit(jax.grad(lambda u: constrain({"log_lr": u})["lr"]))(jnp.float32(0.5))
    assert float(g) == pytest.approx(np.exp(0.5), rel=1e-6)


def test_unconstrain_skips_domain_check_when_traced():
    f = jax.jit(lambda m: unconstrain({"momentum": m}, {"momentum": "logit"})["logit_momentum"])
    assert float(f(jnp.float32(0.5))) == pytest.approx(0.0, abs=1e-6)


def test_transform_errors():
    with pytest.raises(ValueError, match=r"momentum=1.0 is outside the logit space's domain \(0, 1\) \(its logit is infinite"):
        unconstrain({"momentum": 1.0}, {"momentum": "logit"})
    with pytest.raises(ValueError, match=r"lr=.*-0.1.* is outside the log space's domain \(0, inf\)"):
        unconstrain({"lr": jnp.array([0.1, -0.1])}, {"lr": "log"})
    with pytest.raises(ValueError, match="unknown space 'softplus'; use one of"):
        unconstrain({"lr": 0.1}, {"lr": "softplus"})
    with pytest.raises(ValueError, match=r"spaces names \['alpha'\], which are not in values"):
        unconstrain({"lr": 0.1}, {"alpha": "log"})
    with pytest.raises(ValueError, match="'log_lr' and 'lr' both constrain to 'lr'"):
        constrain({"log_lr": 0.0, "lr": 1.0})


# ------------------------------------------------------------------- bases


@settings(max_examples=25, deadline=None)
@given(st.integers(min_value=1, max_value=80), st.data())
def test_fourier_basis_orthonormal(steps, data):
    n = data.draw(st.integers(min_value=1, max_value=steps))
    basis = np.asarray(fourier_basis(steps, n, dtype=jnp.float32), np.float64)
    assert basis.shape == (steps, n)
    np.testing.assert_allclose(basis.T @ basis, np.eye(n), atol=1e-5)


def test_fourier_basis_is_low_frequency_first():
    basis = np.asarray(fourier_basis(100, 5, dtype=jnp.float32))
    np.testing.assert_allclose(basis[:, 0], 0.1, rtol=1e-6)  # constant first
    sign_changes = [(np.diff(np.sign(basis[:, k])) != 0).sum() for k in range(5)]
    assert sign_changes == [0, 1, 2, 3, 4]


def test_smooth_schedule_filters_high_frequencies():
    steps = 64
    t = np.arange(steps)
    smooth = np.cos(np.pi * (t + 0.5) * 2 / steps)
    noisy = smooth + 0.5 * np.cos(np.pi * (t + 0.5) * 60 / steps)  # high frequency
    basis = fourier_basis(steps, 8, dtype=jnp.float32)
    coeffs = basis.T @ jnp.asarray(noisy, jnp.float32)
    assert np.abs(noisy - smooth).max() > 0.4
    np.testing.assert_allclose(smooth_schedule(coeffs, basis), smooth, atol=1e-5)
    # batched coefficients: one schedule per layer
    coeffs2 = jnp.stack([coeffs, 2 * coeffs], axis=1)
    out = smooth_schedule(coeffs2, basis)
    assert out.shape == (steps, 2)
    np.testing.assert_allclose(out[:, 1], 2 * out[:, 0], rtol=1e-5, atol=1e-6)


def test_piecewise_linear_basis():
    basis = np.asarray(piecewise_linear_basis(11, 3, dtype=jnp.float32))
    assert basis.shape == (11, 3)
    np.testing.assert_allclose(basis.sum(1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(basis[[0, 5, 10]], np.eye(3))
    sched = np.asarray(smooth_schedule(jnp.array([1.0, 3.0, 2.0]), jnp.asarray(basis)))
    np.testing.assert_allclose(sched[[0, 5, 10]], [1.0, 3.0, 2.0])
    assert float(sched[2]) == pytest.approx(1.8)  # linear between knots
    np.testing.assert_allclose(piecewise_linear_basis(4, 1), np.ones((4, 1)))


def test_fit_coeffs_recovers_constant_schedule():
    for basis in (fourier_basis(30, 4, dtype=jnp.float32), piecewise_linear_basis(30, 5, dtype=jnp.float32)):
        c = fit_coeffs(jnp.full((30, 2), 0.7, jnp.float32), basis)
        assert c.shape == (basis.shape[1], 2)
        np.testing.assert_allclose(smooth_schedule(c, basis), 0.7, rtol=1e-4)


def test_basis_errors():
    with pytest.raises(ValueError, match="n_freq=11 must be between 1 and steps=10"):
        fourier_basis(10, 11)
    with pytest.raises(ValueError, match="n_knots=0 must be between 1 and steps=10"):
        piecewise_linear_basis(10, 0)
    with pytest.raises(ValueError, match="coeffs has 3 rows but basis \\(10, 4\\) has 4 functions"):
        smooth_schedule(jnp.ones(3), fourier_basis(10, 4))
