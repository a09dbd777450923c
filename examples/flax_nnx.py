"""Hypergradients of a Flax nnx model's validation loss, by exact reversal.

    pip install flax && python examples/flax_nnx.py

`nnx.split(model, nnx.Param, ...)` gives the model's structure, its parameters (an
`nnx.State` of arrays: `params0`) and the rest (here empty; RNG state and batch
statistics would go there); the loss rebuilds the model with `nnx.merge`. The gradient
of the validation loss after 50 steps of SGD with momentum on 1,000 real MNIST images
(bundled with revlearn) w.r.t. a per-layer learning rate and the momentum is checked
against unrolled autodiff.
"""

import jax

jax.config.update("jax_enable_x64", True)   # the fixed-point state is int64

import jax.numpy as jnp
from flax import nnx

import revlearn
from revlearn import data, models

STEPS, BATCH = 50, 100
splits = data.split(data.load_mnist("embedded"), {"train": 1000, "valid": 1000}, seed=0)
x, y = jnp.asarray(splits["train"].images), jnp.asarray(splits["train"].onehot)
xv, yv = jnp.asarray(splits["valid"].images), jnp.asarray(splits["valid"].onehot)


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(784, 50, param_dtype=jnp.float64, rngs=rngs)
        self.out = nnx.Linear(50, 10, param_dtype=jnp.float64, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.hidden(x)))


graphdef, params0, rest = nnx.split(MLP(nnx.Rngs(0)), nnx.Param, ...)


def nll(params, x, y):
    model = nnx.merge(graphdef, params, rest)
    return -jnp.mean(jnp.sum(jax.nn.log_softmax(model(x)) * y, -1))


def loss_fn(params, hypers, step):                 # step picks the minibatch
    return nll(params, *models.minibatch(x, y, BATCH, step, 0))


def validation_loss(lr, momentum, method):
    opt = revlearn.optim.momentum(lr, momentum)
    w_T = revlearn.train(loss_fn, params0, None, optimizer=opt, steps=STEPS, method=method)
    return nll(w_T, xv, yv)                         # nnx.merge(graphdef, w_T, rest): the model


lr = nnx.State({"hidden": jnp.asarray(0.5), "out": jnp.asarray(0.5)})  # per layer: a prefix of params0
grad = jax.jit(jax.value_and_grad(validation_loss, argnums=(0, 1)), static_argnums=2)
# the momentum is differentiated: Reversible needs a lower bound on it to size its buffer
loss, (d_lr, d_mom) = grad(lr, 0.9, revlearn.Reversible(min_momentum=0.5))
print(f"validation loss after {STEPS} steps: {float(loss):.5f} "
      f"(initial model: {float(nll(params0, xv, yv)):.5f})")
print(f"d loss / d lr: hidden {float(d_lr['hidden']):.6f}, out {float(d_lr['out']):.6f}; "
      f"d loss / d momentum: {float(d_mom):.6f}")

_, (u_lr, u_mom) = grad(lr, 0.9, revlearn.Unrolled())
err = max(float(abs(a - b) / abs(b)) for a, b in zip(jax.tree_util.tree_leaves((d_lr, d_mom)),
                                                     jax.tree_util.tree_leaves((u_lr, u_mom))))
print(f"relative difference from unrolled autodiff: {err:.1e}")
print(revlearn.check_reversal(loss_fn, params0, None, steps=STEPS,
                              optimizer=revlearn.optim.momentum(lr, 0.9)))
