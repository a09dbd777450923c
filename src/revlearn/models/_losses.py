"""Losses of the reference code: mean NLL, a per-group L2 penalty, error rate.

With log-probabilities ``p`` ``[batch, n_classes]`` and one-hot labels ``y``::

    nll(p, y)        = -(1/batch) * sum_{n,k} y_{nk} p_{nk}
    l2_penalty(w, l) = sum_i l_i * w_i^2
    error_rate(p, y) = mean_n [argmax_k p_{nk} != label_n]

The training loss of the paper is ``nll + l2_penalty``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["nll", "l2_penalty", "error_rate"]


def nll(log_probs: jax.Array, onehot: jax.Array) -> jax.Array:
    """Mean negative log-likelihood of one-hot labels under log-probabilities.

    Args:
      log_probs: ``[batch, n_classes]``, e.g. from `mlp_apply`.
      onehot: one-hot labels ``[batch, n_classes]`` (float).

    Returns:
      A scalar, ``-mean_n sum_k onehot[n, k] log_probs[n, k]``.

    Raises:
      ValueError: the two shapes differ (e.g. integer labels: one-hot encode them with
        ``jax.nn.one_hot``).

    Example:
        ```python
        loss = revlearn.models.nll(revlearn.models.mlp_apply(params, x), y_onehot)
        ```
    """
    if log_probs.shape != onehot.shape:
        raise ValueError(
            f"log_probs {log_probs.shape} and onehot {onehot.shape} must have "
            "the same shape [batch, n_classes]; one-hot encode integer labels "
            "with jax.nn.one_hot(labels, n_classes)"
        )
    return -jnp.mean(jnp.sum(log_probs * onehot, axis=-1))


def l2_penalty(params, lam) -> jax.Array:
    """``sum_i lam_i * w_i^2`` over every parameter ``w_i``.

    Args:
      params: a pytree of arrays.
      lam: a pytree *prefix* of ``params``: each leaf of ``lam`` applies to the
        whole subtree of ``params`` under it, and broadcasts against each of its
        arrays. So a scalar is one global strength; ``[{"w": 1e-3, "b": 0.0},
        ...]`` is one per layer and type; an array of a weight's shape is one
        strength per weight.

    Returns:
      A scalar.

    Raises:
      ValueError: ``lam`` is not a pytree prefix of ``params``.

    Example:
        ```python
        def loss_fn(params, hypers, step):
            return nll(mlp_apply(params, xb), yb) + l2_penalty(params, jnp.exp(hypers["log_l2"]))
        ```
    """
    try:
        per_node = jax.tree.map(
            lambda l, sub: sum(jnp.sum(l * w**2) for w in jax.tree.leaves(sub)),
            lam, params,
        )
    except ValueError as e:
        raise ValueError(
            f"lam must be a pytree prefix of params: lam has structure "
            f"{jax.tree.structure(lam)}, params has {jax.tree.structure(params)} "
            f"({e}); give one lam leaf per params subtree, e.g. a scalar for "
            "everything or [{'w': ..., 'b': ...}, ...] per layer"
        ) from None
    return sum(jax.tree.leaves(per_node), jnp.zeros(()))


def error_rate(log_probs: jax.Array, labels: jax.Array) -> jax.Array:
    """Fraction of examples whose ``argmax(log_probs)`` differs from the label.

    Args:
      log_probs: ``[batch, n_classes]`` log-probabilities (or any scores).
      labels: integer labels ``[batch]`` or one-hot ``[batch, n_classes]``.

    Returns:
      A scalar in [0, 1].

    Example:
        ```python
        test_error = revlearn.models.error_rate(mlp_apply(w_T, x_test), y_test)
        ```
    """
    if labels.ndim == log_probs.ndim:
        labels = jnp.argmax(labels, axis=-1)
    return jnp.mean(jnp.argmax(log_probs, axis=-1) != labels)
