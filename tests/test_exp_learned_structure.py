"""`learned-structure`: the geometry of the grid of units, the offset-L2 and tying
penalty against a brute-force loop, its convnet limit, the soft ceiling of the
strengths, and the hypergradient of the meta-objective against finite differences."""

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp
import numpy as np
import pytest

import revlearn
from revlearn.experiments import learned_structure as exp

SIDE, N_OFF = exp.SIDE, exp.N_OFF


def _offset(dy, dx):
    return (dy + SIDE - 1) * N_OFF + (dx + SIDE - 1)


def _brute_force_penalty(w, l2, tie, grid, channels):
    s = SIDE // grid
    pos = [s * g + s // 2 for g in range(grid)]
    unit = lambda gy, gx, c: (gy * grid + gx) * channels + c  # noqa: E731
    total = 0.0
    for gy in range(grid):
        for gx in range(grid):
            for c in range(channels):
                u = unit(gy, gx, c)
                for py in range(SIDE):
                    for px in range(SIDE):
                        d = (py - pos[gy] + SIDE - 1, px - pos[gx] + SIDE - 1)
                        total += l2[d] * w[py * SIDE + px, u] ** 2
                        for ny, nx in ((gy, gx + 1), (gy + 1, gx)):  # right and lower neighbour
                            if ny == grid or nx == grid:
                                continue
                            qy, qx = py + pos[ny] - pos[gy], px + pos[nx] - pos[gx]
                            if qy < SIDE and qx < SIDE:
                                diff = w[py * SIDE + px, u] - w[qy * SIDE + qx, unit(ny, nx, c)]
                                total += tie[d] * diff ** 2
    return total


def test_geometry_offsets():
    g = exp.geometry(7, 2)
    assert g.stride == 4 and list(g.positions) == [2, 6, 10, 14, 18, 22, 26] and g.hidden == 98
    # pixel (row 0, column 27) and unit (gy=3, gx=1, channel 1): offset (0 - 14, 27 - 6)
    assert g.l2_index[0 * SIDE + 27, (3 * 7 + 1) * 2 + 1] == _offset(-14, 21)
    # every (pixel, unit) pair counted once; offsets outside [-26, 25] never occur
    assert g.l2_count.sum() == SIDE * SIDE * g.hidden
    assert g.l2_count[0].sum() == 0 and g.l2_count[:, -1].sum() == 0
    assert g.l2_count[SIDE - 1, SIDE - 1] == g.hidden  # d = 0: every unit once
    # neighbour pairs: 2 * G * (G - 1) per channel at offset 0
    assert g.tie_count[SIDE - 1, SIDE - 1] == 2 * 2 * 7 * 6


def test_structure_penalty_matches_brute_force():
    grid, channels = 4, 2
    geom = exp.geometry(grid, channels)
    rng = np.random.default_rng(0)
    w = rng.normal(size=(SIDE * SIDE, geom.hidden))
    l2, tie = rng.exponential(size=(N_OFF, N_OFF)), rng.exponential(size=(N_OFF, N_OFF))
    got = float(exp.structure_penalty(jnp.asarray(w), jnp.asarray(l2), jnp.asarray(tie), geom))
    assert got == pytest.approx(_brute_force_penalty(w, l2, tie, grid, channels), rel=1e-10)


def test_a_convolution_pays_no_tying_penalty_and_global_l2_is_plain_l2():
    geom = exp.geometry(7, 3)
    rng = np.random.default_rng(1)
    filters = rng.normal(size=(N_OFF, N_OFF, 3))  # one filter per channel over all offsets
    w = filters[geom.l2_index.reshape(SIDE * SIDE, -1, 3)[..., 0] // N_OFF,
                geom.l2_index.reshape(SIDE * SIDE, -1, 3)[..., 0] % N_OFF]  # [784, 49, 3]
    w = jnp.asarray(w.reshape(SIDE * SIDE, geom.hidden))
    ones, zeros = jnp.ones((N_OFF, N_OFF)), jnp.zeros((N_OFF, N_OFF))
    assert float(exp.structure_penalty(w, zeros, ones, geom)) == pytest.approx(0.0, abs=1e-20)
    w_untied = w + 1e-3 * jnp.asarray(rng.normal(size=w.shape))
    assert float(exp.structure_penalty(w_untied, zeros, ones, geom)) > 0
    h = exp.strengths(exp.flat_hypers(0.3, 0.0, 1.0), 1.0)
    assert float(exp.structure_penalty(w, h["l2_offset"], h["tie_offset"], geom)) == (
        pytest.approx(0.3 * float(jnp.sum(w ** 2)), rel=1e-12))
    assert float(h["l2_out"]) == pytest.approx(0.3)


def test_reversible_hypergradient_matches_finite_differences():
    static = exp.Config(steps=3, batch_size=10, lr=0.5, momentum=0.9, grid=7, channels=1,
                        max_strength=1.0).program()
    keys = jax.random.split(jax.random.PRNGKey(0), 6)
    data = {}
    for i, (name, n) in enumerate((("train", 30), ("valid", 20), ("test", 10))):
        x = jax.random.uniform(keys[2 * i], (n, SIDE * SIDE), jnp.float64)
        y = jax.nn.one_hot(jax.random.randint(keys[2 * i + 1], (n,), 0, 10), 10,
                           dtype=jnp.float64)
        data[name] = (x, y)
    rng = np.random.default_rng(2)
    theta = {"log_l2_offset": jnp.asarray(rng.normal(-2.0, 0.5, (N_OFF, N_OFF))),
             "log_tie_offset": jnp.asarray(rng.normal(-1.0, 0.5, (N_OFF, N_OFF))),
             "log_l2_out": jnp.asarray(-3.0, jnp.float64)}  # not weakly typed: one compile
    key = jax.random.PRNGKey(3)
    v_rev, g_rev, _ = exp._hypergrad(theta, key, data, static)

    # the maps get gradient only where offsets occur, and differ from offset to offset
    geom = static.geom
    assert float(jnp.abs(g_rev["log_l2_offset"][geom.l2_count == 0]).max()) == 0
    assert float(jnp.std(g_rev["log_l2_offset"][geom.l2_count > 0])) > 0
    assert float(jnp.std(g_rev["log_tie_offset"][geom.tie_count > 0])) > 0

    # central differences (of the values the same compiled program returns), along
    # a random direction in all 6,051 hyperparameters and along the tie map alone
    f = lambda th: exp._hypergrad(th, key, data, static)[0]  # noqa: E731
    eps = 1e-5
    for which in ("all", "tie"):
        d = {k: jnp.asarray(rng.normal(size=np.shape(v))) * (which == "all" or "tie" in k)
             for k, v in theta.items()}
        shift = lambda s: {k: theta[k] + s * d[k] for k in theta}  # noqa: E731
        fd = (float(f(shift(eps))) - float(f(shift(-eps)))) / (2 * eps)
        directional = sum(float(jnp.vdot(g_rev[k], d[k])) for k in theta)
        assert directional == pytest.approx(fd, rel=1e-5), which


def test_strengths_are_log_space_with_a_soft_ceiling():
    cfg = exp.Config(init_l2=0.02, init_tie=0.3, max_strength=2.0)
    h = exp.strengths(exp.flat_hypers(cfg.init_l2, cfg.init_tie, cfg.max_strength),
                    cfg.max_strength)
    assert float(h["l2_offset"][0, 0]) == pytest.approx(0.02, rel=1e-12)
    assert float(h["tie_offset"][5, 7]) == pytest.approx(0.3, rel=1e-12)
    assert float(h["l2_out"]) == pytest.approx(0.02, rel=1e-12)
    u = jnp.asarray([-20.0, -5.0, 0.0, 5.0, 50.0])
    s = exp.strengths({"log_x": u}, 2.0)["x"]
    np.testing.assert_allclose(s, np.exp(u) / (1 + np.exp(u) / 2.0), rtol=1e-12)
    assert float(s[-1]) <= 2.0 and float(s[0]) == pytest.approx(np.exp(-20.0), rel=1e-8)
    assert float(exp.strengths(exp.flat_hypers(0.0, 0.0, 1.0), 1.0)["l2_out"]) == 0.0


def test_config_rejects_a_grid_that_does_not_tile_the_image():
    with pytest.raises(ValueError, match="must divide 28"):
        exp.Config(grid=5)


def test_active_counts_only_count_pairs_that_touch_a_non_blank_pixel():
    geom = exp.geometry(7, 2)
    everything = exp.active_counts(geom, np.ones(SIDE * SIDE, bool))
    np.testing.assert_array_equal(everything[0], geom.l2_count)
    np.testing.assert_array_equal(everything[1], geom.tie_count)
    blank = exp.active_counts(geom, np.zeros(SIDE * SIDE, bool))
    assert blank[0].sum() == 0 and blank[1].sum() == 0
    one = np.zeros(SIDE * SIDE, bool)
    one[10 * SIDE + 3] = True  # pixel (row 10, column 3)
    l2, tie = exp.active_counts(geom, one)
    assert l2.sum() == geom.hidden  # one pair per unit
    assert l2[10 - 2 + SIDE - 1, 3 - 2 + SIDE - 1] == 2  # unit (0, 0), both channels
    assert 0 < tie.sum() < geom.tie_count.sum()


def test_convnet_baseline_has_one_unit_per_grid_position_and_channel():
    config = exp.Config(grid=7, channels=2, n_train=20, batch_size=10, steps=2)
    static = config.program()
    params = revlearn.models.convnet_init(jax.random.PRNGKey(0), channels=(2,), kernel=5,
                                          stride=static.geom.stride, dtype=jnp.float64)
    assert params[1]["w"].shape == (static.geom.hidden, 10)  # 7 x 7 positions x 2 channels
    x = jax.random.uniform(jax.random.PRNGKey(1), (20, SIDE * SIDE), jnp.float64)
    y = jax.nn.one_hot(jnp.arange(20) % 10, 10, dtype=jnp.float64)
    data = {"train": (x, y), "valid": (x, y), "test": (x, y)}
    keys = jnp.stack([jax.random.PRNGKey(2), jax.random.PRNGKey(3)])
    metrics, w = exp._retrain(jnp.asarray(0.0), keys, data, static, 5)
    assert w[0]["w"].shape == (5, 5, 1, 2)
    assert np.isfinite(float(metrics["valid_loss"])) and float(metrics["train_error"]) <= 1
