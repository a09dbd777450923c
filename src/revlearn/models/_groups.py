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
    """The same structure as ``params`` with each leaf replaced by its group
    name: list positions become ``layer<i>``, dict keys stay, joined by ``/``."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "/".join(_key_name(k) for k in path), params
    )


def per_group(params, fn: Callable[[str, jax.Array], object]):
    """``fn(group_name, leaf)`` at every leaf of ``params``, same structure."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: fn("/".join(_key_name(k) for k in path), leaf), params
    )


def group_schedule(params, values_by_type: Mapping[str, object]):
    """One hyperparameter per group, chosen by the group's type (last name part).

    ``group_schedule(params, {"w": jnp.full(steps, 0.1), "b": jnp.full(steps,
    0.5)})`` gives every weight matrix its own ``[steps]`` schedule starting at
    0.1 and every bias one at 0.5; the result has ``params``' structure and is
    what a per-layer, per-type schedule optimises.
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
