"""Tests of revlearn.models: MLP, convnet, losses, groups, minibatches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from revlearn.models import (
    batch_indices,
    convnet_apply,
    convnet_init,
    error_rate,
    group_schedule,
    l2_penalty,
    logistic_apply,
    logistic_init,
    minibatch,
    mlp_apply,
    mlp_init,
    nll,
    param_groups,
    per_group,
    resolve_dtype,
)

KEY = jax.random.PRNGKey(0)


# ---------------------------------------------------------------------- MLP


def test_mlp_shapes_and_dtype():
    params = mlp_init(KEY, [784, 50, 20, 10], dtype=jnp.float32)
    assert [(p["w"].shape, p["b"].shape) for p in params] == [
        ((784, 50), (50,)), ((50, 20), (20,)), ((20, 10), (10,))
    ]
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    out = mlp_apply(params, jnp.ones((7, 784), jnp.float32))
    assert out.shape == (7, 10) and out.dtype == jnp.float32
    np.testing.assert_allclose(jnp.exp(out).sum(-1), 1.0, rtol=1e-5)


def test_default_dtype_follows_jax():
    assert resolve_dtype(None) == jnp.asarray(0.0).dtype
    params = mlp_init(KEY, [3, 2])
    assert params[0]["w"].dtype == jnp.asarray(0.0).dtype
    with pytest.raises(ValueError, match="dtype must be a float dtype, got int32"):
        resolve_dtype(jnp.int32)


def test_mlp_matches_numpy():
    params = mlp_init(KEY, [5, 4, 3, 2], scale=0.7, dtype=jnp.float32)
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (6, 5)), np.float64)
    h = x
    for p in params[:-1]:
        h = np.tanh(h @ np.asarray(p["w"], np.float64) + np.asarray(p["b"], np.float64))
    logits = h @ np.asarray(params[-1]["w"], np.float64) + np.asarray(params[-1]["b"], np.float64)
    expected = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    got = mlp_apply(params, jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_mlp_scales():
    params = mlp_init(KEY, [200, 100, 10], scale=[(0.5, 0.0), (2.0, 3.0)], dtype=jnp.float32)
    assert float(jnp.std(params[0]["w"])) == pytest.approx(0.5, rel=0.02)
    assert float(jnp.max(jnp.abs(params[0]["b"]))) == 0.0
    assert float(jnp.std(params[1]["w"])) == pytest.approx(2.0, rel=0.05)
    default = mlp_init(KEY, [400, 10], dtype=jnp.float32)
    assert float(jnp.std(default[0]["w"])) == pytest.approx(1 / 20, rel=0.05)
    with pytest.raises(ValueError, match="scale has 1 entries but sizes=\\[4, 3, 2\\] has 2 layers"):
        mlp_init(KEY, [4, 3, 2], scale=[(1.0, 1.0)])
    with pytest.raises(ValueError, match="sizes=\\[784\\] must list at least two"):
        mlp_init(KEY, [784])


def test_mlp_init_differentiable_in_scale():
    def loss(log_scale):
        params = mlp_init(KEY, [3, 2], scale=jnp.exp(log_scale), dtype=jnp.float32)
        return jnp.sum(params[0]["w"] ** 2)

    g = jax.jit(jax.grad(loss))(jnp.float32(0.0))
    assert float(g) == pytest.approx(2 * float(loss(0.0)), rel=1e-5)

    # per-layer, per-type scales as a traced [n_layers, 2] array or pairs
    @jax.jit
    def total(scales):
        as_array = mlp_init(KEY, [3, 2, 2], scale=scales, dtype=jnp.float32)
        as_pairs = mlp_init(KEY, [3, 2, 2], scale=[(s[0], s[1]) for s in scales], dtype=jnp.float32)
        return as_array, as_pairs

    a, b = total(jnp.array([[1.0, 0.0], [0.0, 2.0]], jnp.float32))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    assert float(jnp.abs(a[0]["b"]).sum()) == 0.0 and float(jnp.abs(a[1]["w"]).sum()) == 0.0
    assert float(jnp.abs(a[1]["b"]).sum()) > 0.0


def test_logistic_regression():
    params = logistic_init(KEY, dtype=jnp.float32)
    assert params[0]["w"].shape == (784, 10)
    assert float(jnp.abs(params[0]["w"]).sum()) == 0.0
    out = logistic_apply(params, jnp.ones((2, 784), jnp.float32))
    np.testing.assert_allclose(out, np.log(0.1), rtol=1e-6)


# ------------------------------------------------------------------ convnet


def test_convnet_jit_and_grad():
    params = convnet_init(KEY, channels=(2, 3), kernel=3, dtype=jnp.float32)
    assert params[0]["w"].shape == (3, 3, 1, 2)
    assert params[1]["w"].shape == (3, 3, 2, 3)
    assert params[2]["w"].shape == (7 * 7 * 3, 10)
    x = jax.random.uniform(jax.random.PRNGKey(2), (3, 784), jnp.float32)
    y = jax.nn.one_hot(jnp.arange(3) % 10, 10)
    out = jax.jit(convnet_apply)(params, x)
    assert out.shape == (3, 10)
    np.testing.assert_allclose(jnp.exp(out).sum(-1), 1.0, rtol=1e-5)
    grad_fn = jax.jit(jax.grad(lambda p: nll(convnet_apply(p, x), y)))
    g1, g2 = grad_fn(params), grad_fn(params)
    assert jax.tree.structure(g1) == jax.tree.structure(params)
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(g1))
    assert float(jnp.abs(g1[0]["w"]).sum()) > 0
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_array_equal(a, b)  # deterministic


def test_convnet_rejects_non_square_input():
    params = convnet_init(KEY, channels=(2,), kernel=3, dtype=jnp.float32)
    with pytest.raises(ValueError, match="x has 783 features"):
        convnet_apply(params, jnp.ones((1, 783)))


# ------------------------------------------------------------------- losses


def test_nll_and_error_rate():
    log_probs = jnp.log(jnp.array([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]))
    onehot = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert float(nll(log_probs, onehot)) == pytest.approx(-(np.log(0.5) + np.log(0.1)) / 2, rel=1e-6)
    assert float(error_rate(log_probs, onehot)) == 0.5
    assert float(error_rate(log_probs, jnp.array([0, 2]))) == 0.0
    with pytest.raises(ValueError, match="same shape"):
        nll(log_probs, jnp.array([0, 1]))


def test_l2_penalty_numbers():
    params = [
        {"w": jnp.array([[1.0, 2.0]]), "b": jnp.array([3.0])},
        {"w": jnp.array([[-1.0]]), "b": jnp.array([0.5])},
    ]
    # global: 1 + 4 + 9 + 1 + 0.25 = 15.25
    assert float(l2_penalty(params, 2.0)) == pytest.approx(30.5)
    # per layer
    assert float(l2_penalty(params, [1.0, 10.0])) == pytest.approx(14 + 12.5)
    # per layer and type
    lam = [{"w": 1.0, "b": 0.0}, {"w": 0.0, "b": 4.0}]
    assert float(l2_penalty(params, lam)) == pytest.approx(5 + 1.0)
    # per weight
    lam = [{"w": jnp.array([[1.0, 0.5]]), "b": 0.0}, {"w": 0.0, "b": 0.0}]
    assert float(l2_penalty(params, lam)) == pytest.approx(1 + 2)
    # differentiable in lam
    g = jax.grad(lambda lam: l2_penalty(params, lam))([1.0, 1.0])
    assert [float(v) for v in g] == pytest.approx([14.0, 1.25])
    with pytest.raises(ValueError, match="lam must be a pytree prefix of params"):
        l2_penalty(params, [1.0, 2.0, 3.0])


# ------------------------------------------------------------------- groups


def test_param_groups_and_schedules():
    params = mlp_init(KEY, [4, 3, 2], dtype=jnp.float32)
    assert param_groups(params) == [
        {"w": "layer0/w", "b": "layer0/b"}, {"w": "layer1/w", "b": "layer1/b"}
    ]
    sizes = per_group(params, lambda name, leaf: (name, leaf.size))
    assert sizes[1]["w"] == ("layer1/w", 6)
    sched = group_schedule(params, {"w": jnp.full(5, 0.1), "b": jnp.full(5, 0.5)})
    assert jax.tree.structure(sched) == jax.tree.structure(params)
    assert sched[1]["b"].shape == (5,) and float(sched[1]["b"][0]) == 0.5
    assert float(sched[0]["w"][4]) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="no entry for parameter type 'b' .*add a 'b' entry"):
        group_schedule(params, {"w": 1.0})


# ---------------------------------------------------------------- minibatch


def test_minibatch_determinism_and_epochs():
    n, bs = 12, 4
    x = jnp.arange(n, dtype=jnp.float32)[:, None] * jnp.ones((1, 3))
    y = jnp.arange(n)
    xb0, yb0 = minibatch(x, y, bs, 0, KEY)
    xb0b, yb0b = minibatch(x, y, bs, 0, KEY)
    np.testing.assert_array_equal(yb0, yb0b)
    np.testing.assert_array_equal(xb0[:, 0], yb0.astype(jnp.float32))
    epoch0 = np.concatenate([np.asarray(minibatch(x, y, bs, s, KEY)[1]) for s in range(3)])
    epoch1 = np.concatenate([np.asarray(minibatch(x, y, bs, s, KEY)[1]) for s in range(3, 6)])
    assert sorted(epoch0.tolist()) == list(range(n))  # every example once per epoch
    assert sorted(epoch1.tolist()) == list(range(n))
    assert epoch0.tolist() != epoch1.tolist()  # a new order each epoch
    other = np.asarray(minibatch(x, y, bs, 0, jax.random.PRNGKey(1))[1])
    assert other.tolist() != np.asarray(yb0).tolist()
    np.testing.assert_array_equal(minibatch(x, y, bs, 0, 0)[1], yb0)  # int seed


def test_minibatch_under_jit_scan_and_vmap():
    n, bs = 10, 3
    x = jnp.arange(n, dtype=jnp.float32)[:, None]
    y = jnp.arange(n)
    f = jax.jit(lambda step, key: minibatch(x, y, bs, step, key)[1])
    for step in (0, 4, 7):
        np.testing.assert_array_equal(f(step, KEY), minibatch(x, y, bs, step, KEY)[1])

    def body(carry, step):
        return carry, minibatch(x, y, bs, step, KEY)[1]

    _, scanned = jax.lax.scan(body, 0, jnp.arange(6))
    np.testing.assert_array_equal(scanned[4], minibatch(x, y, bs, 4, KEY)[1])
    keys = jax.random.split(KEY, 3)
    batched = jax.vmap(lambda k: minibatch(x, y, bs, 2, k)[1])(keys)
    assert batched.shape == (3, bs)
    np.testing.assert_array_equal(batched[1], minibatch(x, y, bs, 2, keys[1])[1])


def test_minibatch_errors():
    with pytest.raises(ValueError, match="batch_size=20 must be between 1 and the number of examples n=10"):
        batch_indices(10, 20, 0, KEY)
    with pytest.raises(ValueError, match="x has 3 examples but y has 4"):
        minibatch(jnp.zeros((3, 2)), jnp.zeros(4), 1, 0, KEY)
