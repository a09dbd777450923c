"""The data splits of an experiment and the metrics of a model on them.

An MNIST experiment's config has a size `n_<name>` per split it uses; the
splits are drawn without overlap from the pool `config.data` with
`config.seed` (`revlearn.data.split`), so they are the same for every run of
that seed. `evaluate` gives each split's mean NLL and error rate.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from revlearn import data as rdata
from revlearn import models

__all__ = ["arrays", "evaluate", "mnist_parts", "mnist_splits"]

Splits = dict[str, tuple[jax.Array, jax.Array]]


def mnist_parts(config, *names: str) -> dict[str, rdata.Dataset]:
    """{name: Dataset of config.n_<name> examples} for each of `names`, disjoint."""
    pool = rdata.load_mnist(config.data, config.data_dir)
    return rdata.split(pool, {n: getattr(config, f"n_{n}") for n in names}, config.seed)


def arrays(parts: dict[str, rdata.Dataset], dtype=jnp.float64) -> Splits:
    """{name: (images [n, 784], one-hot labels [n, 10])} as `dtype` arrays."""
    return {k: (jnp.asarray(d.images, dtype), jnp.asarray(d.onehot, dtype)) for k, d in parts.items()}


def mnist_splits(config, *names: str, dtype=jnp.float64) -> Splits:
    """`arrays(mnist_parts(config, *names), dtype)`."""
    return arrays(mnist_parts(config, *names), dtype)


def evaluate(apply: Callable, params, data: Splits, names=None) -> dict[str, jax.Array]:
    """{"<split>_loss": mean NLL, "<split>_error": error rate} of `apply(params, x)`
    (log-probabilities [n, classes]) on each split of `data` (or of `names`)."""
    out = {}
    for name in names or data:
        x, y = data[name]
        logp = apply(params, x)
        out[f"{name}_loss"] = models.nll(logp, y)
        out[f"{name}_error"] = models.error_rate(logp, y).astype(logp.dtype)
    return out
