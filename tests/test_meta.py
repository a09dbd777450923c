"""revlearn.meta: run folders, atomic checkpoints, the loop, chaos, resume, seeds."""

from __future__ import annotations

import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from revlearn.meta import (ChaosWarning, RunDir, average_over, chaos_flags, environment,
                           is_chaotic, iteration_key, meta_optimize)


# -- run folders -------------------------------------------------------------------

def _tree():
    return {"layers": [{"w": np.arange(6.0).reshape(2, 3), "b": np.float32([1, 2, 3])}],
            "count": np.int32(7), "flag": np.array([True, False]),
            "opt": optax.adam(0.1).init({"a": jnp.ones(3)})}


def test_save_load_round_trip(tmp_path):
    rd = RunDir(tmp_path / "run")
    tree = _tree()
    rd.save_arrays("state", tree)
    back = rd.load_arrays("state", tree)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(tree)
    for a, b in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(back)):
        a = np.asarray(a)
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    flat = rd.load_arrays("state.npz")
    assert set(flat) >= {"layers/0/w", "layers/0/b", "count", "flag"}
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]


def test_npz_is_not_pickled(tmp_path):
    rd = RunDir(tmp_path)
    path = rd.save_arrays("x", {"a": np.ones(3)})
    with np.load(path, allow_pickle=False) as f:  # would raise if anything were pickled
        assert sorted(f.files) == ["__paths__", "leaf_00000"]
    with pytest.raises(TypeError, match="dtype object"):
        rd.save_arrays("bad", {"a": np.array([object()])})


def test_load_checks_the_template(tmp_path):
    rd = RunDir(tmp_path)
    rd.save_arrays("x", {"a": np.ones(3), "b": np.zeros(2)})
    with pytest.raises(ValueError, match="holds leaves"):
        rd.load_arrays("x", {"a": np.ones(3)})
    with pytest.raises(ValueError, match="float64\\[3\\] but the template has float64\\[4\\]"):
        rd.load_arrays("x", {"a": np.ones(4), "b": np.zeros(2)})


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    rd = RunDir(tmp_path)
    rd.save_arrays("x", {"a": np.ones(3)})
    rd.write_json("s.json", {"v": 1})

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        rd.save_arrays("x", {"a": np.zeros(3)})
    with pytest.raises(OSError):
        rd.write_json("s.json", {"v": 2})
    monkeypatch.undo()
    assert rd.load_arrays("x", {"a": np.ones(3)})["a"].tolist() == [1.0, 1.0, 1.0]
    assert rd.read_json("s.json") == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json", "x.npz"]


def test_metrics_append_truncate_and_torn_line(tmp_path):
    rd = RunDir(tmp_path)
    for i in range(4):
        rd.append_metrics({"iteration": i, "loss": np.float32(0.5) * i, "nan": float("nan")})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 4, "lo')  # a write torn by a kill
    records = rd.read_metrics()
    assert [r["iteration"] for r in records] == [0, 1, 2, 3]
    assert records[1]["loss"] == 0.5 and records[0]["nan"] is None
    rd.truncate_metrics(2)
    assert [r["iteration"] for r in rd.read_metrics()] == [0, 1]


def test_config_and_environment(tmp_path):
    rd = RunDir(tmp_path)
    rd.write_config({"seed": 3, "sizes": (784, 10)})
    assert rd.read_config() == {"seed": 3, "sizes": [784, 10]}
    rd.write_env()
    env = rd.read_json("env.json")
    for key in ("python", "jax", "jaxlib", "numpy", "optax", "jax_devices", "platform",
                "cpu_count", "git_revision"):
        assert key in env
    assert env["jax_enable_x64"] is True
    assert environment()["cpu_count"] == os.cpu_count()


# -- chaos detector -------------------------------------------------------------------

def test_chaos_fires_on_an_exploding_sequence():
    rng = np.random.default_rng(0)
    stable = 1.0 + 0.3 * rng.standard_normal(50)
    assert not chaos_flags(stable).any()
    exploding = np.concatenate([stable[:10], 10.0 ** np.arange(2, 7)])
    flags = chaos_flags(exploding)
    assert not flags[:10].any() and flags[10:].any() and flags[10]
    assert is_chaotic([1.0, 1.0, 1.0], float("nan"))
    assert not is_chaotic([1.0], 100.0)  # too little history (warm-up)


def _quadratic_hypergrad(target, noise=0.1):
    """A deterministic toy: meta-loss |theta - target|^2 plus iteration-seeded noise."""

    @jax.jit
    def f(theta, key):
        loss = jnp.sum((theta["x"] - target) ** 2)
        g = {"x": 2 * (theta["x"] - target) + noise * jax.random.normal(key, theta["x"].shape)}
        return loss, g, {"valid_loss": loss}

    return lambda theta, i: f(theta, iteration_key(0, i))


def test_meta_optimize_flags_chaos_in_metrics(tmp_path):
    def explode(theta, i):
        scale = 1.0 if i < 6 else 1e6
        return jnp.sum(theta["x"] ** 2), {"x": scale * jnp.ones(2)}, {}

    with pytest.warns(ChaosWarning, match="meta-iteration") as record:
        meta_optimize(explode, {"x": jnp.ones(2)}, optax.sgd(1e-9), 8, RunDir(tmp_path),
                      progress=False)
    assert [str(w.message).split(":")[0] for w in record] == ["meta-iteration 6", "meta-iteration 7"]
    flags = [r["chaos"] for r in RunDir(tmp_path).read_metrics()]
    assert flags == [False] * 6 + [True, True]


def test_meta_optimize_stable_run_has_no_chaos(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ChaosWarning)
        res = meta_optimize(_quadratic_hypergrad(jnp.array([1.0, -2.0])), {"x": jnp.zeros(2)},
                            optax.sgd(0.2), 40, RunDir(tmp_path), progress=False)
    assert not any(r["chaos"] for r in res.history)
    np.testing.assert_allclose(res.hypers["x"], [1.0, -2.0], atol=0.1)
    rec = res.history[-1]
    assert {"iteration", "meta_loss", "hypergrad_norm", "wall_time_s", "valid_loss"} <= set(rec)


def test_clip_matches_optax_chain():
    hg = _quadratic_hypergrad(jnp.array([50.0, -20.0]))
    a = meta_optimize(hg, {"x": jnp.zeros(2)}, optax.sgd(0.1), 3, None, clip=1.0, progress=False)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1))
    theta, state = {"x": jnp.zeros(2)}, tx.init({"x": jnp.zeros(2)})
    for i in range(3):
        _, g, _ = hg(theta, i)
        u, state = tx.update(g, state, theta)
        theta = optax.apply_updates(theta, u)
    np.testing.assert_allclose(a.hypers["x"], theta["x"], rtol=1e-12)


def test_non_finite_hypergradient_stops_and_keeps_checkpoint(tmp_path):
    def f(theta, i):
        bad = jnp.nan if i == 2 else 1.0
        return jnp.sum(theta["x"]), {"x": bad * jnp.ones(2)}, {}

    rd = RunDir(tmp_path)
    with pytest.raises(FloatingPointError, match="meta-iteration 2"), \
            pytest.warns(ChaosWarning):
        meta_optimize(f, {"x": jnp.zeros(2)}, optax.sgd(0.1), 5, rd, progress=False)
    assert int(rd.load_arrays("checkpoint")["iteration"]) == 2


def test_resume_in_process_is_bit_identical(tmp_path):
    hg = _quadratic_hypergrad(jnp.array([1.0, -2.0, 3.0]))
    theta0 = {"x": jnp.zeros(3)}
    full = meta_optimize(hg, theta0, optax.adam(0.1), 12, RunDir(tmp_path / "a"), progress=False)
    rd = RunDir(tmp_path / "b")
    meta_optimize(hg, theta0, optax.adam(0.1), 5, rd, progress=False)
    rd.append_metrics({"iteration": 5, "meta_loss": 123.0})  # written just before a kill
    rd.resume = True
    res = meta_optimize(hg, theta0, optax.adam(0.1), 12, rd, progress=False)
    assert res.resumed_from == 5
    assert np.asarray(res.hypers["x"]).tobytes() == np.asarray(full.hypers["x"]).tobytes()
    records = rd.read_metrics()
    assert [r["iteration"] for r in records] == list(range(12))
    assert [r["meta_loss"] for r in records] == [r["meta_loss"] for r in full.history]


# -- seeds ---------------------------------------------------------------------------

def test_average_over_matches_a_loop():
    def f(theta, key):
        noise = jax.random.normal(key, (3,))
        return jnp.sum(theta * noise), {"g": noise * 2.0, "count": jnp.int32(1)}

    theta, key = jnp.ones(3), jax.random.PRNGKey(4)
    keys = jax.random.split(key, 5)
    manual = np.mean([np.asarray(f(theta, k)[1]["g"]) for k in keys], axis=0)
    loss, out = jax.jit(average_over(f, 5))(theta, key)
    np.testing.assert_allclose(out["g"], manual, rtol=1e-12)
    assert out["count"] == 1.0
    loss2, out2 = average_over(f, 5, batch_size=2)(theta, key)
    np.testing.assert_allclose(out2["g"], out["g"], rtol=1e-12)
    with pytest.raises(ValueError, match="num=0"):
        average_over(f, 0)


def test_iteration_key_is_deterministic():
    assert np.array_equal(iteration_key(3, 7), iteration_key(3, 7))
    assert not np.array_equal(iteration_key(3, 7), iteration_key(3, 8))
    assert not np.array_equal(iteration_key(3, 7), iteration_key(4, 7))


# Resume after SIGKILL through the real command line: tests/test_run_store.py.
