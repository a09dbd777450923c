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

On several devices the vmapped axis (K seeds here; any population of
hyperparameter candidates or tasks through `split_population`) is split over
them: each device evaluates K / n of the members, then the outputs are
gathered and reduced as on one device, so the result is the same bit for bit.
`using_devices(n)` (the command line's `--devices N`) limits n; by default
every visible device takes part.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = ["average_over", "iteration_key", "population_devices", "split_population",
           "using_devices"]

_DEVICES: contextvars.ContextVar[int | None] = contextvars.ContextVar("revlearn_devices",
                                                                       default=None)


@contextlib.contextmanager
def using_devices(n: int | None) -> Iterator[None]:
    """Split population axes over the first `n` devices within the block.

    It is read when a function is traced: a function jitted and called before keeps the
    split it was compiled with (jit caches by argument types).

    Args:
      n: the number of devices, >= 1 and at most the visible ones; None for all.

    Raises:
      ValueError: `n` is not a positive int, or more than the visible devices.

    Example:
        ```python
        with revlearn.meta.using_devices(2):
            loss, grads = jax.jit(revlearn.meta.average_over(hypergrad, 8))(hypers, key)
        ```
    """
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"devices={n!r}: give a number of devices >= 1, or None for all")
    if n is not None and n > len(jax.devices()):
        raise ValueError(f"devices={n}: only {len(jax.devices())} device(s) are visible "
                         f"({jax.devices()[0].platform}); pass at most {len(jax.devices())}")
    token = _DEVICES.set(n)
    try:
        yield
    finally:
        _DEVICES.reset(token)


def population_devices(size: int) -> int:
    """How many devices a population of `size` members is split over.

    Args:
      size: the population's length (seeds, sweep points).

    Returns:
      The largest n <= the devices in use (`using_devices`) that divides `size`; 1 means
      not split.

    Example:
        ```python
        revlearn.meta.population_devices(8)    # 8 on 8 devices, 1 on one
        ```
    """
    n = min(_DEVICES.get() or len(jax.devices()), len(jax.devices()), max(size, 1))
    while n > 1 and size % n:
        n -= 1
    return n


def split_population(tree: Any) -> tuple[Any, Callable[[Any], Any]]:
    """Split the leading axis (the population) of `tree` over `population_devices(length)`
    devices, so a `jax.vmap` over it runs 1/n of the members per device.

    Args:
      tree: a pytree of arrays sharing the leading axis length (the population).

    Returns:
      `(tree, gather)`: the tree constrained to the split, and `gather`, to apply to the
      vmapped outputs to bring them back whole to every device before reducing them, so
      the reduction runs as on one device (the result is the same bit for bit).

    Example:
        ```python
        keys, gather = revlearn.meta.split_population(jax.random.split(key, 8))
        losses = gather(jax.vmap(loss_of_seed)(keys))
        ```
    """
    n = population_devices(jax.tree_util.tree_leaves(tree)[0].shape[0])
    if n == 1:
        return tree, lambda out: out
    mesh = Mesh(np.array(jax.devices()[:n]), ("population",))

    def spec(x):
        return NamedSharding(mesh, P("population", *([None] * (x.ndim - 1))))

    tree = jax.tree_util.tree_map(lambda x: jax.lax.with_sharding_constraint(x, spec(x)), tree)
    whole = NamedSharding(mesh, P())
    return tree, lambda out: jax.tree_util.tree_map(
        lambda x: jax.lax.with_sharding_constraint(x, whole), out)


def iteration_key(seed: int, iteration) -> jax.Array:
    """The key of one meta-iteration: `fold_in(PRNGKey(seed), iteration)`.

    Args:
      seed: the run's seed.
      iteration: the meta-iteration index (may be traced).

    Returns:
      A `jax.random` key; drawing everything random of iteration i from it makes a
      hypergradient function a pure function of (hypers, i), so runs resume exactly.

    Example:
        ```python
        def hypergrad_fn(hypers, i):
            key = revlearn.meta.iteration_key(0, i)
            ...
        ```
    """
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
        None evaluates all K together with `jax.vmap` (split over the devices, see
        `split_population`).

    Returns:
      `avg(hypers, key, *args)`: the same pytree, every leaf the mean over the
      K evaluations (integer and boolean leaves are averaged as floats). Wrap
      it in `jax.jit` yourself.

    Raises:
      ValueError: `num` or `batch_size` is not a positive int.

    Example:
        ```python
        def hypergrad(hypers, key):
            return jax.value_and_grad(lambda h: meta_fn(train_from(h, key)))(hypers)

        loss, grads = jax.jit(revlearn.meta.average_over(hypergrad, 10))(hypers, key)
        ```
    """
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"num={num!r}: the number of seeds to average over must be an int >= 1")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise ValueError(f"batch_size={batch_size!r} must be None (all at once) or an int >= 1")

    def averaged(hypers, key, *args):
        keys = jax.random.split(key, num)
        if batch_size is None:
            keys, gather = split_population(keys)
            out = gather(jax.vmap(lambda k: fn(hypers, k, *args))(keys))
        else:
            out = jax.lax.map(lambda k: fn(hypers, k, *args), keys, batch_size=batch_size)
        return jax.tree_util.tree_map(
            lambda x: jnp.mean(x if jnp.issubdtype(x.dtype, jnp.inexact)
                               else x.astype(jnp.result_type(float)), axis=0), out)

    return averaged
