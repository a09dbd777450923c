"""Parameter groups: name every leaf ``"layer<i>/<type>"`` and build
hyperparameter pytrees with one entry per group.

For an MLP ``[{"w": ..., "b": ...}, ...]`` the groups are ``"layer0/w"``,
``"layer0/b"``, ``"layer1/w"``, ... . Per-layer, per-type hyperparameters (a
learning-rate schedule ``[steps]`` per group, say) are pytrees of the same
structure as the parameters, built with :func:`per_group` or
:func:`group_schedule`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

__all__ = ["param_groups", "per_group", "group_schedule"]


def _key_name(k) -> str:
    if isinstance(k, jax.tree_util.SequenceKey):
        return f"layer{k.idx}"
    if isinstance(k, jax.tree_util.DictKey):
        return str(k.key)
    if isinstance(k, jax.tree_util.GetAttrKey):
        return k.name
    return str(k)


def param_groups(params):
    """The group name of every leaf: list positions become ``layer<i>``, dict keys stay,
    joined by ``/``.

    Args:
      params: a pytree of arrays (e.g. an MLP from `mlp_init`).

    Returns:
      A pytree of ``params``' structure holding strings, e.g.
      ``[{"w": "layer0/w", "b": "layer0/b"}, ...]``.

    Example:
        ```python
        revlearn.models.param_groups(mlp_init(key, [784, 10]))   # [{'w': 'layer0/w', 'b': 'layer0/b'}]
        ```
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "/".join(_key_name(k) for k in path), params
    )


def per_group(params, fn: Callable[[str, jax.Array], object]):
    """``fn(group_name, leaf)`` at every leaf of ``params``.

    Args:
      params: a pytree of arrays.
      fn: ``fn(group_name, leaf) -> value``, group names as in `param_groups`.

    Returns:
      A pytree of ``params``' structure holding the values.

    Example:
        ```python
        lr = revlearn.models.per_group(params, lambda g, w: 0.1 if g.endswith("/w") else 0.5)
        ```
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: fn("/".join(_key_name(k) for k in path), leaf), params
    )


def group_schedule(params, values_by_type: Mapping[str, object]):
    """One hyperparameter per group, chosen by the group's type (the last name part).

    Args:
      params: a pytree of arrays (an MLP: types ``"w"`` and ``"b"``).
      values_by_type: type -> value (a scalar, a ``[steps]`` schedule, ...).

    Returns:
      A pytree of ``params``' structure: what a per-layer, per-type schedule
      optimises, and a valid hyperparameter of every `revlearn.optim` rule.

    Raises:
      ValueError: a parameter type has no entry in ``values_by_type``.

    Example:
        ```python
        lr = revlearn.models.group_schedule(params, {"w": jnp.full(steps, 0.1),
                                                     "b": jnp.full(steps, 0.5)})
        revlearn.train(loss_fn, params, optimizer=revlearn.optim.momentum(lr, 0.9), steps=steps)
        ```
    """

    def pick(name, _):
        kind = name.rsplit("/", 1)[-1]
        if kind not in values_by_type:
            raise ValueError(
                f"values_by_type has no entry for parameter type {kind!r} (group "
                f"{name!r}); it has {sorted(values_by_type)}; add a {kind!r} entry"
            )
        return jnp.asarray(values_by_type[kind])

    return per_group(params, pick)
