"""The lab's learning-curve helper `experiments._float.float_train`: the rule's float step
leaf by leaf, with decays on their grids, ends where `revlearn.train(method=Unrolled())`
ends (bit for bit: the same float_step and decays) for every rule and every
hyperparameter form the experiments use, and records after steps 0, every, 2 every, ..."""

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp
import numpy as np
import pytest

import revlearn
from revlearn.experiments._float import float_train

T = 7
P0 = {"a": jax.random.normal(jax.random.PRNGKey(0), (3, 4)), "b": jnp.zeros(4)}
X = jax.random.normal(jax.random.PRNGKey(1), (8, 3))


def _loss(p, h, t):
    return (jnp.mean(jnp.tanh(X @ p["a"] + p["b"]) ** 2) * (1 + 0.1 * t)
            + h * jnp.sum(p["a"] ** 2))


RULES = {
    "momentum": revlearn.optim.momentum(jnp.linspace(0.1, 0.3, T),
                                        {"a": 0.9, "b": jnp.full(T, 0.7)}),
    "adam": revlearn.optim.adam({"a": jnp.full((T, 1, 4), 0.01), "b": 0.02},
                                b1=jnp.linspace(0.5, 0.9, T), b2=0.999),
    "rmsprop_momentum": revlearn.optim.rmsprop_momentum(0.01, 0.9, 0.8),
}


@pytest.mark.parametrize("name", list(RULES))
def test_float_train_is_unrolled_training(name):
    rule = RULES[name]
    record = lambda w, s, t: (_loss(w, 0.01, t), t, s[-1]["b"])  # noqa: E731  (s[-1]: a moment)
    w, recs = jax.jit(lambda p: float_train(rule, _loss, p, 0.01, steps=T, record=record))(P0)
    w_unr, state = revlearn.train(_loss, P0, 0.01, optimizer=rule, steps=T,
                                  method=revlearn.Unrolled(), return_state=True)
    for x, y in zip(jax.tree_util.tree_leaves(w), jax.tree_util.tree_leaves(w_unr)):
        np.testing.assert_array_equal(x, y)
    loss, t, last_moment = recs
    np.testing.assert_array_equal(t, np.arange(T + 1))
    np.testing.assert_array_equal(loss[-1], _loss(w_unr, 0.01, T))
    np.testing.assert_array_equal(last_moment[-1], state[-1]["b"])
    # every 3rd step: after 0, 3, 6 steps (the trailing step is not recorded)
    _, (loss3, t3, _) = float_train(rule, _loss, P0, 0.01, steps=T, every=3, record=record)
    np.testing.assert_array_equal(t3, [0, 3, 6])
    np.testing.assert_allclose(loss3, loss[::3], rtol=1e-13)  # one jitted, one not


def test_float_train_rejects_per_weight_constants():
    rule = revlearn.optim.momentum({"a": jnp.full((3, 4), 0.1), "b": 0.1}, 0.9)
    with pytest.raises(ValueError, match="lr: float_train takes scalars"):
        float_train(rule, _loss, P0, 0.0, steps=T, record=lambda w, s, t: t)
