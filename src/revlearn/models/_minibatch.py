"""Deterministic minibatches as a pure function of (key, step).

With ``n`` examples and ``m = n // batch_size`` batches per epoch::

    epoch = step // m,  i = step % m
    perm  = jax.random.permutation(fold_in(key, epoch), n)
    batch = x[perm[i * batch_size : (i + 1) * batch_size]]

so every epoch visits ``m * batch_size`` distinct examples in a fresh order, and
the same ``(key, step)`` always gives the same batch. ``step`` may be traced
(inside ``jit``, ``scan`` or a reversed loop) and ``key`` may be ``vmap``-ped.
The ``n % batch_size`` examples left over in each epoch's permutation are not
used that epoch. Gathering rows has a scatter-add transpose, deterministic on
CPU; differentiate with respect to ``x`` on GPU only with that in mind.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["minibatch", "batch_indices"]


def _as_key(key_or_seed):
    if isinstance(key_or_seed, (int, np.integer)) and not isinstance(key_or_seed, bool):
        return jax.random.PRNGKey(int(key_or_seed))
    arr = key_or_seed if isinstance(key_or_seed, jax.Array) else jnp.asarray(key_or_seed)
    if jnp.issubdtype(arr.dtype, jax.dtypes.prng_key):
        return arr
    if arr.shape == (2,) and arr.dtype == jnp.uint32:
        return arr
    if arr.shape == () and jnp.issubdtype(arr.dtype, jnp.integer):
        return jax.random.PRNGKey(arr)
    raise ValueError(
        f"key_or_seed must be a jax.random key or an integer seed, got an "
        f"array of shape {arr.shape} and dtype {arr.dtype}"
    )


def batch_indices(n: int, batch_size: int, step, key_or_seed) -> jax.Array:
    """The indices of the examples of minibatch ``step`` (see the module docstring).

    Args:
      n: the number of examples.
      batch_size: the minibatch size, 1 <= batch_size <= n.
      step: the step index (may be traced).
      key_or_seed: a ``jax.random`` key (may be vmapped) or an integer seed.

    Returns:
      An int array ``[batch_size]``; the same ``(key, step)`` always gives the same
      indices, and each epoch of ``n // batch_size`` steps visits distinct examples.

    Raises:
      ValueError: ``batch_size`` outside [1, n], or ``key_or_seed`` neither a key nor
        an integer.

    Example:
        ```python
        idx = revlearn.models.batch_indices(1000, 100, step, 0)
        ```
    """
    if not 1 <= batch_size <= n:
        raise ValueError(
            f"batch_size={batch_size} must be between 1 and the number of "
            f"examples n={n}"
        )
    per_epoch = n // batch_size
    step = jnp.asarray(step)
    epoch, i = step // per_epoch, step % per_epoch
    perm = jax.random.permutation(jax.random.fold_in(_as_key(key_or_seed), epoch), n)
    return jax.lax.dynamic_slice(perm, (i * batch_size,), (batch_size,))


def minibatch(x: jax.Array, y: jax.Array, batch_size: int, step, key_or_seed):
    """Minibatch ``step`` of ``(x, y)``, a pure function of ``(key, step)``, as exact
    reversal needs.

    Args:
      x: inputs ``[n, ...]``.
      y: targets ``[n, ...]``.
      batch_size: the minibatch size, 1 <= batch_size <= n.
      step: the step index (may be traced: the ``step`` argument of ``loss_fn``).
      key_or_seed: a ``jax.random`` key or an integer seed.

    Returns:
      ``(x[idx], y[idx])`` with ``idx`` from `batch_indices`.

    Raises:
      ValueError: ``x`` and ``y`` hold different numbers of examples, or as
        `batch_indices`.

    Example:
        ```python
        def loss_fn(params, hypers, step):
            xb, yb = revlearn.models.minibatch(x, y, 100, step, 0)
            return revlearn.models.nll(revlearn.models.mlp_apply(params, xb), yb)
        ```
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"x has {x.shape[0]} examples but y has {y.shape[0]}; they must match"
        )
    idx = batch_indices(x.shape[0], batch_size, step, key_or_seed)
    return jnp.take(x, idx, axis=0), jnp.take(y, idx, axis=0)
