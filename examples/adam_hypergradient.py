"""Hypergradients of a validation loss through 100 steps of Adam, by exact reversal.

    python examples/adam_hypergradient.py

Trains a 784-50-10 tanh MLP with Adam on 1,000 real MNIST images (bundled with
revlearn), takes the gradient of the validation loss with respect to a per-step,
per-layer learning-rate schedule, Adam's b1 and a per-weight L2 penalty by running
Adam backwards exactly, and checks it against unrolled autodiff and finite
differences.
"""

import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp

import revlearn
from revlearn import data, models, optim

STEPS, BATCH = 100, 100

splits = data.split(data.load_mnist("embedded"), {"train": 1000, "valid": 1000}, seed=0)
x, y = jnp.asarray(splits["train"].images, jnp.float64), jnp.asarray(splits["train"].onehot, jnp.float64)
xv, yv = jnp.asarray(splits["valid"].images, jnp.float64), jnp.asarray(splits["valid"].onehot, jnp.float64)
params0 = models.mlp_init(jax.random.PRNGKey(0), [784, 50, 10], dtype=jnp.float64)


def loss_fn(params, hypers, step):
    xb, yb = models.minibatch(x, y, BATCH, step, 0)
    penalty = jnp.sum(jnp.exp(hypers["log_l2"]) * params[0]["w"] ** 2)
    return models.nll(models.mlp_apply(params, xb), yb) + penalty


def meta_fn(params):
    return models.nll(models.mlp_apply(params, xv), yv)


hypers = {"log_l2": jnp.full(params0[0]["w"].shape, -8.0)}
lr = [{"w": jnp.full(STEPS, 3e-3), "b": jnp.full(STEPS, 3e-3)} for _ in params0]


def validation_loss(lr, b1, hypers):
    # b1 is differentiated, hence traced: its buffer is sized from a lower bound
    wT = revlearn.train(loss_fn, params0, hypers, optimizer=optim.adam(lr, b1=b1), steps=STEPS,
                        method=revlearn.Reversible(min_decay={"b1": 0.5}))
    return meta_fn(wT)


f = jax.jit(jax.value_and_grad(validation_loss, argnums=(0, 1, 2)))
jax.block_until_ready(f(lr, 0.9, hypers))
t0 = time.perf_counter()
loss, (d_lr, d_b1, d_hypers) = jax.block_until_ready(f(lr, 0.9, hypers))
print(f"validation loss after {STEPS} Adam steps: {float(loss):.5f}  "
      f"(hypergradient in {time.perf_counter() - t0:.2f} s)")
print("d loss / d lr, layer 0 weights, steps 0..4: ", jnp.round(d_lr[0]["w"][:5], 4))
print("d loss / d lr, layer 0 weights, last 5 steps:", jnp.round(d_lr[0]["w"][-5:], 4))
print(f"d loss / d b1: {float(d_b1):.6f}   (b1 = 0.9 is applied as "
      f"{float(optim.applied(0.9, optim.FINE)):.10f})")
print(f"d loss / d log_l2: norm {float(jnp.linalg.norm(d_hypers['log_l2'])):.3e} over "
      f"{d_hypers['log_l2'].size} per-weight penalties")

print("\nChecking on this problem (30 steps): exact reversal, unrolled autodiff, finite differences")
short = optim.adam([{"w": jnp.full(30, 3e-3), "b": jnp.full(30, 3e-3)} for _ in params0])
print(revlearn.check_reversal(loss_fn, params0, hypers, optimizer=short, steps=30))
print(revlearn.check_hypergradients(loss_fn, meta_fn, params0, hypers, optimizer=short, steps=30))
usage = revlearn.buffer_usage(loss_fn, params0, hypers, optimizer=optim.adam(lr), steps=STEPS)
print(f"\nbuffer: {usage.bits_per_weight_per_step:.4f} bits per weight per step, minimum "
      f"log2(1/b1) + log2(1/b2) = {usage.ideal_bits_per_weight_per_step:.4f} (ratio {usage.ratio:.4f})")
