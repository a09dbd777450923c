"""Hypergradients of a Flax linen model's validation loss, by exact reversal.

    pip install flax && python examples/flax_linen.py

A linen model's `params` (a dict of arrays) is `params0` as it is; the loss applies the
model with `model.apply({"params": params}, x)`. The gradient of the validation loss
after 50 steps of Adam on 1,000 real MNIST images (bundled with revlearn) w.r.t. the
learning rate, Adam's b1 and an L2 penalty is checked against unrolled autodiff.
"""

import jax

jax.config.update("jax_enable_x64", True)   # the fixed-point state is int64

import flax.linen as nn
import jax.numpy as jnp

import revlearn
from revlearn import data, models

STEPS, BATCH = 50, 100
splits = data.split(data.load_mnist("embedded"), {"train": 1000, "valid": 1000}, seed=0)
x, y = jnp.asarray(splits["train"].images), jnp.asarray(splits["train"].onehot)
xv, yv = jnp.asarray(splits["valid"].images), jnp.asarray(splits["valid"].onehot)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Dense(50, param_dtype=jnp.float64)(x))
        return nn.Dense(10, param_dtype=jnp.float64)(x)


model = MLP()
params0 = model.init(jax.random.PRNGKey(0), x[:1])["params"]


def nll(params, x, y):
    return -jnp.mean(jnp.sum(jax.nn.log_softmax(model.apply({"params": params}, x)) * y, -1))


def loss_fn(params, hypers, step):                 # step picks the minibatch
    xb, yb = models.minibatch(x, y, BATCH, step, 0)
    l2 = jnp.exp(hypers["log_l2"]) * sum(jnp.sum(layer["kernel"] ** 2)
                                          for layer in params.values())
    return nll(params, xb, yb) + l2


def validation_loss(lr, b1, hypers, method):
    opt = revlearn.optim.adam(lr, b1=b1)
    w_T = revlearn.train(loss_fn, params0, hypers, optimizer=opt, steps=STEPS, method=method)
    return nll(w_T, xv, yv)                         # w_T is a params dict like params0


hypers = {"log_l2": jnp.asarray(-6.0)}

def grad(method):
    return jax.jit(jax.value_and_grad(lambda *a: validation_loss(*a, method), argnums=(0, 1, 2)))


# b1 is differentiated, so Reversible needs a lower bound on it to size its buffer
loss, g_rev = grad(revlearn.Reversible(min_decay={"b1": 0.5}))(0.01, 0.9, hypers)
print(f"validation loss after {STEPS} steps: {float(loss):.5f} "
      f"(initial model: {float(nll(params0, xv, yv)):.5f})")
print(f"d loss / d lr = {float(g_rev[0]):.6f}, d loss / d b1 = {float(g_rev[1]):.6f}, "
      f"d loss / d log_l2 = {float(g_rev[2]['log_l2']):.6f}")

_, g_unr = grad(revlearn.Unrolled())(0.01, 0.9, hypers)
err = max(float(abs(a - b) / abs(b)) for a, b in zip(jax.tree_util.tree_leaves(g_rev),
                                                     jax.tree_util.tree_leaves(g_unr)))
print(f"relative difference from unrolled autodiff: {err:.1e}")
print(revlearn.check_reversal(loss_fn, params0, hypers, steps=STEPS,
                              optimizer=revlearn.optim.adam(0.01, b1=0.9)))
