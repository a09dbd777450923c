"""The JAX side of the benchmark problems: a tanh MLP trained by `revlearn.train`.

Loss at step t: mean NLL of minibatch (t mod n_batches) + sum_i l2_i w_i^2
(per-weight L2). Meta-objective: mean NLL on a validation set at w_T.
The data are closed over as concrete arrays (not hyperparameters), so no
method spends time on a cotangent for them.
"""

from __future__ import annotations

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402

import revlearn  # noqa: E402

from _common import init_params, make_data  # noqa: E402


def mlp(params, x):
    h = x
    for i, (W, b) in enumerate(params):
        h = h @ W + b
        if i < len(params) - 1:
            h = jnp.tanh(h)
    return h


def nll(logits, y):
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


def method_of(name: str, T: int, optimizer: str = "momentum"):
    """"reversible", "unrolled", "checkpointed", or "reversible@f": Reversible keeping the
    last round(f T) steps (`Reversible(budget=...)`)."""
    if name.startswith("reversible"):
        budget = round(float(name.split("@")[1]) * T) if "@" in name else None
        if optimizer == "adam":
            return revlearn.Reversible(min_decay={"b1": 0.9}, budget=budget)
        return revlearn.Reversible(min_momentum=0.9, budget=budget)
    if name == "unrolled":
        return revlearn.Unrolled()
    if name == "checkpointed":
        return revlearn.Checkpointed()
    raise ValueError(name)


class Problem:
    """Data, init and loss for one (sizes, batch, dtype)."""

    def __init__(self, sizes, batch, n_train, n_val=1000, dtype=jnp.float64, seed=0):
        X, y, Xv, yv = make_data(n_train, n_val, sizes[0], sizes[-1], seed)
        self.sizes, self.batch, self.dtype = sizes, batch, dtype
        self.nb = n_train // batch
        self.X = jnp.asarray(X, dtype)
        self.y = jnp.asarray(y)
        self.Xv = jnp.asarray(Xv, dtype)
        self.yv = jnp.asarray(yv)
        self.params0 = [(jnp.asarray(W, dtype), jnp.asarray(b, dtype)) for W, b in init_params(sizes)]

    def loss_fn(self, params, hypers, step):
        i = (step % self.nb) * self.batch
        xb = jax.lax.dynamic_slice_in_dim(self.X, i, self.batch)
        yb = jax.lax.dynamic_slice_in_dim(self.y, i, self.batch)
        reg = sum(jnp.sum(l * w * w) for l, w in zip(jax.tree_util.tree_leaves(hypers["l2"]),
                                                    jax.tree_util.tree_leaves(params)))
        return nll(mlp(params, xb), yb) + reg

    def val_loss(self, params):
        return nll(mlp(params, self.Xv), self.yv)
