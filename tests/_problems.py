"""Small inner problems shared by the core tests (real models from revlearn.models)."""

import jax
import jax.numpy as jnp

from revlearn import models


def data(n=64, d=784, classes=10, seed=0, dtype=jnp.float64):
    kx, ky = jax.random.split(jax.random.PRNGKey(seed))
    x = jax.random.uniform(kx, (n, d), dtype)
    y = jax.nn.one_hot(jax.random.randint(ky, (n,), 0, classes), classes, dtype=dtype)
    return x, y


def make(model: str, dtype=jnp.float64, batch=16, n=64, seed=0):
    """(loss_fn, meta_fn, params0, hypers) for 'logistic', 'mlp' or 'convnet'.

    hypers = {"log_l2": per-weight log L2 of the first layer's weights, "x": training
    inputs}, so hypergradients reach per-weight penalties and the training data."""
    x, y = data(n=n, seed=seed, dtype=dtype)
    xv, yv = data(n=32, seed=seed + 1, dtype=dtype)
    key = jax.random.PRNGKey(seed + 2)
    if model == "logistic":
        params0 = models.mlp_init(key, [784, 10], scale=0.1, dtype=dtype)
        apply = models.mlp_apply
    elif model == "mlp":
        params0 = models.mlp_init(key, [784, 16, 10], dtype=dtype)
        apply = models.mlp_apply
    elif model == "convnet":
        params0 = models.convnet_init(key, channels=(3, 4), kernel=3, dtype=dtype)
        apply = models.convnet_apply
    else:
        raise ValueError(model)
    hypers = {"log_l2": jnp.full(params0[0]["w"].shape, -6.0, dtype), "x": x}

    def loss_fn(params, hypers, step):
        xb, yb = models.minibatch(hypers["x"], y, batch, step, 0)
        penalty = jnp.sum(jnp.exp(hypers["log_l2"]) * params[0]["w"] ** 2)
        return models.nll(apply(params, xb), yb) + penalty

    def meta_fn(params):
        return models.nll(apply(params, xv), yv)

    return loss_fn, meta_fn, params0, hypers


def layer_schedules(params0, steps, lr=0.3, momentum=0.9):
    """Per-step, per-layer, per-type lr and momentum schedules ([steps] leaves)."""
    ramp = jnp.linspace(0.5, 1.0, steps)
    lr_s = [{"w": lr * ramp, "b": jnp.full(steps, lr)} for _ in params0]
    mom_s = [{"w": jnp.full(steps, momentum), "b": momentum - 0.1 * ramp} for _ in params0]
    return lr_s, mom_s
