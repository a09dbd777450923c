"""Deterministic per-iteration keys, and meta-gradients averaged over seeds.

The key of meta-iteration i of a run with seed s is

    key_i = fold_in(PRNGKey(s), i)

so a hypergradient function `f(hypers, i)` that draws everything random
(initial weights, minibatch order, noise) from `key_i` is a pure function of
(hypers, i): this is what makes an interrupted run resume bit-identically.

`average_over(f, K)` turns `f(hypers, key, ...)` into the mean of `f` over K
keys split from `key`:

    f_K(hypers, key) = (1/K) sum_k f(hypers, split(key, K)[k])

evaluated with `jax.vmap` (all K at once) or, with `batch_size`, with
`jax.lax.map` over chunks of that many keys (memory grows with the chunk).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["iteration_key", "average_over"]


def iteration_key(seed: int, iteration) -> jax.Array:
    """`fold_in(PRNGKey(seed), iteration)`: the key of one meta-iteration."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), iteration)


def average_over(fn: Callable[..., Any], num: int, *, batch_size: int | None = None
                 ) -> Callable[..., Any]:
    """Average `fn(hypers, key, *args)` over `num` keys split from `key`.

    Args:
      fn: `fn(hypers, key, *args) -> pytree` of float arrays, e.g.
        `(meta_loss, hypergrad)` or `(meta_loss, hypergrad, metrics)`; `key`
        picks the seed, the minibatch order, or both.
      num: K >= 1, the number of keys.
      batch_size: evaluate at most this many keys at once (`jax.lax.map`);
        None evaluates all K together with `jax.vmap`.

    Returns:
      `avg(hypers, key, *args)`: the same pytree, every leaf the mean over the
      K evaluations (integer and boolean leaves are averaged as floats). Wrap
      it in `jax.jit` yourself.
    """
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"num={num!r}: the number of seeds to average over must be an int >= 1")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise ValueError(f"batch_size={batch_size!r} must be None (all at once) or an int >= 1")

    def averaged(hypers, key, *args):
        keys = jax.random.split(key, num)
        if batch_size is None:
            out = jax.vmap(lambda k: fn(hypers, k, *args))(keys)
        else:
            out = jax.lax.map(lambda k: fn(hypers, k, *args), keys, batch_size=batch_size)
        return jax.tree_util.tree_map(
            lambda x: jnp.mean(x if jnp.issubdtype(x.dtype, jnp.inexact)
                               else x.astype(jnp.result_type(float)), axis=0), out)

    return averaged
