"""Hypergradients of an Equinox model's validation loss, by exact reversal.

    pip install equinox && python examples/equinox_mlp.py

An `eqx.nn.MLP` goes to `revlearn.train` as it is: its arrays are trained, its
activation functions are carried unchanged (the `eqx.filter(..., eqx.is_inexact_array)`
convention), and w_T comes back an MLP. The gradient of the validation loss after 50
steps of SGD with momentum on 1,000 real MNIST images (bundled with revlearn) w.r.t. a
per-step learning rate and an L2 penalty is checked against unrolled autodiff.
"""

import jax

jax.config.update("jax_enable_x64", True)   # the fixed-point state is int64

import equinox as eqx
import jax.numpy as jnp

import revlearn
from revlearn import data, models

STEPS, BATCH = 50, 100
splits = data.split(data.load_mnist("embedded"), {"train": 1000, "valid": 1000}, seed=0)
x, y = jnp.asarray(splits["train"].images), jnp.asarray(splits["train"].onehot)
xv, yv = jnp.asarray(splits["valid"].images), jnp.asarray(splits["valid"].onehot)
model = eqx.nn.MLP(784, 10, 50, depth=1, activation=jnp.tanh, dtype=jnp.float64,
                   key=jax.random.PRNGKey(0))


def nll(model, x, y):
    return -jnp.mean(jnp.sum(jax.nn.log_softmax(jax.vmap(model)(x)) * y, axis=-1))


def loss_fn(model, hypers, step):                  # step picks the minibatch
    xb, yb = models.minibatch(x, y, BATCH, step, 0)
    l2 = jnp.exp(hypers["log_l2"]) * sum(jnp.sum(layer.weight ** 2) for layer in model.layers)
    return nll(model, xb, yb) + l2


def validation_loss(log_lr, hypers, method):
    opt = revlearn.optim.momentum(jnp.exp(log_lr), 0.9)
    w_T = revlearn.train(loss_fn, model, hypers, optimizer=opt, steps=STEPS, method=method)
    return nll(w_T, xv, yv)                         # w_T is an eqx.nn.MLP


log_lr, hypers = jnp.full(STEPS, jnp.log(0.5)), {"log_l2": jnp.asarray(-6.0)}
grad = jax.jit(jax.value_and_grad(validation_loss, argnums=(0, 1)), static_argnums=2)
loss, (d_lr, d_hypers) = grad(log_lr, hypers, revlearn.Reversible())
print(f"validation loss after {STEPS} steps: {float(loss):.5f} "
      f"(initial model: {float(nll(model, xv, yv)):.5f})")
print("d loss / d log lr, steps 0..4:", jnp.round(d_lr[:5], 6))
print(f"d loss / d log_l2: {float(d_hypers['log_l2']):.6f}")

_, (u_lr, u_hypers) = grad(log_lr, hypers, revlearn.Unrolled())
err = max(float(jnp.max(jnp.abs(d_lr - u_lr)) / jnp.max(jnp.abs(u_lr))),
          float(abs(d_hypers["log_l2"] - u_hypers["log_l2"]) / abs(u_hypers["log_l2"])))
print(f"relative difference from unrolled autodiff: {err:.1e}")
print(revlearn.check_reversal(loss_fn, model, hypers, steps=STEPS,
                              optimizer=revlearn.optim.momentum(0.5, 0.9)))
