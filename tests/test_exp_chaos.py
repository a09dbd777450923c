"""The `chaos` experiment's own logic: its meta-objective's exact hypergradients
(through w_0 = exp(log_scale) z and alpha = exp(log_lr)) agree with unrolled
autodiff and finite differences; a faulting grid point becomes NaN without
sinking its chunk; the grid-consistency test tells smooth from wiggly."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from revlearn.experiments import chaos

CFG = chaos.Config(sizes=(784, 8, 10), n_train=40, batch_size=20)
STEPS = 3


@pytest.fixture(scope="module")
def problem():
    return chaos.make_problem(CFG)


@pytest.mark.parametrize("steps", [0, STEPS])
def test_hypergradients_match_unrolled_and_finite_differences(problem, steps):
    p = np.array([[-1.0, 0.5]])
    rev, bad = chaos.evaluate_points(p, problem, steps=steps, config=CFG, chunk=1)
    assert not bad.any()
    if steps:       # with no step there is no training, so no method to compare
        unr, _ = chaos.evaluate_points(p, problem, steps=steps, config=CFG, method="unrolled",
                                       chunk=1)
        np.testing.assert_allclose(rev[0, 0], unr[0, 0], rtol=1e-12)
        np.testing.assert_allclose(rev[0, 1:], unr[0, 1:], rtol=1e-8, atol=1e-12)
    h = 1e-5
    shifted = np.array([p[0] + [h, 0], p[0] - [h, 0], p[0] + [0, h], p[0] - [0, h]])
    f, _ = chaos.evaluate_points(shifted, problem, steps=steps, config=CFG, method="unrolled",
                                 grad=False, chunk=4)
    fd = np.array([(f[0, 0] - f[1, 0]) / (2 * h), (f[2, 0] - f[3, 0]) / (2 * h)])
    np.testing.assert_allclose(rev[0, 1:], fd, rtol=1e-5, atol=1e-9)
    if steps == 0:
        assert rev[0, 2] == 0.0  # no training: the learning rate does not matter
    else:
        assert abs(rev[0, 2]) > 1e-6


def test_a_faulting_point_becomes_nan_and_spares_its_chunk(problem):
    # alpha = e^14: the first update throws a weight out of the fixed-point range
    pts = np.array([[-1.0, 0.5], [-1.0, 14.0]])
    vals, bad = chaos.evaluate_points(pts, problem, steps=STEPS, config=CFG, chunk=2)
    assert bad.tolist() == [False, True]
    assert np.all(np.isfinite(vals[0])) and np.all(np.isnan(vals[1]))
    one, _ = chaos.evaluate_points(pts[:1], problem, steps=STEPS, config=CFG, chunk=1)
    np.testing.assert_array_equal(vals[0], one[0])


def test_grid_consistency_tells_smooth_from_wiggly():
    x = np.linspace(-2.0, 1.0, 31)
    smooth_f, smooth_g = np.exp(x), np.exp(x)
    assert chaos.first_inconsistent(x, smooth_f, smooth_g) is None
    # a wiggle with a period far below the grid spacing beyond x = 0
    w = np.where(x > 0, 1.0, 0.0)
    f = x + w * 0.01 * np.sin(400 * x)
    g = 1 + w * 4.0 * np.cos(400 * x)
    edge = chaos.first_inconsistent(x, f, g)
    assert edge is not None and -0.15 < edge <= 0.05
    err = chaos.grid_consistency(x, f, g)
    assert np.all(err[x[:-1] < -0.1] < 1e-2)


def test_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="lr_zoom_points"):
        chaos.Config(lr_zoom_points=1)
    with pytest.raises(ValueError, match="scale_zoom"):
        chaos.Config(scale_zoom=(1.0, -2.0))
    with pytest.raises(ValueError, match="fd_h"):
        chaos.Config(fd_h=(1e-3, 0.0))
    with pytest.raises(ValueError, match="momentum"):
        dataclasses.replace(chaos.Config(), momentum=1.0)
