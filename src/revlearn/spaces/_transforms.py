"""Unconstrained hyperparameter spaces, named by prefix.

Hyperparameters are stored and optimised unconstrained; the name says how to
map them to the value the training loop uses::

    log_<name>    : <name> = exp(u)            domain of <name>: (0, inf)
    logit_<name>  : <name> = 1 / (1 + exp(-u))  domain of <name>: (0, 1)
    <name>        : <name> = u                 (identity, any real)

``constrain({"log_lr": u1, "logit_momentum": u2, "seed_scale": u3})`` returns
``{"lr": exp(u1), "momentum": sigmoid(u2), "seed_scale": u3}``;
:func:`unconstrain` is the inverse. Values may be arrays or pytrees (a per-step,
per-layer schedule); the map applies leaf by leaf.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Space",
    "log_space",
    "logit_space",
    "identity",
    "SPACES",
    "space_of",
    "constrain",
    "unconstrain",
]


class Space(NamedTuple):
    """A bijection between the real line and a hyperparameter's domain.

    Attributes:
      name: the prefix of names stored in this space (``"log"``), or
        ``"identity"``.
      forward: unconstrained -> constrained.
      inverse: constrained -> unconstrained.
      contains: constrained value -> bool array, True inside the open domain.
      domain: the domain in words, for error messages.
    """

    name: str
    forward: Callable
    inverse: Callable
    contains: Callable
    domain: str


log_space = Space("log", jnp.exp, jnp.log, lambda x: x > 0, "(0, inf)")
"""Positive hyperparameters (learning rates, L2 strengths): x = exp(u)."""
logit_space = Space(
    "logit",
    jax.nn.sigmoid,
    lambda p: jnp.log(p) - jnp.log1p(-p),
    lambda p: (p > 0) & (p < 1),
    "(0, 1)",
)
"""Hyperparameters in (0, 1) (momenta, decays): x = sigmoid(u)."""
identity = Space(
    "identity", lambda u: u, lambda x: x, lambda x: jnp.isfinite(x), "(-inf, inf)"
)
"""Unconstrained hyperparameters: x = u."""

SPACES: dict[str, Space] = {"log": log_space, "logit": logit_space}
"""Prefix -> space (``log_lr`` is in `log_space`); names without one of these prefixes
are `identity`."""


def space_of(name: str) -> tuple[Space, str]:
    """The space a stored name is in, and the constrained name.

    Args:
      name: a stored hyperparameter name, e.g. ``"log_lr"``.

    Returns:
      ``(space, constrained_name)``: ``"log_lr"`` -> ``(log_space, "lr")``; a name
      without a known prefix -> ``(identity, name)``.

    Raises:
      ValueError: ``name`` is not a string, or is a prefix with nothing after it
        (``"log_"``).

    Example:
        ```python
        space, name = revlearn.spaces.space_of("logit_momentum")   # (logit_space, "momentum")
        ```
    """
    if not isinstance(name, str):
        raise ValueError(f"hyperparameter names must be strings, got {name!r}")
    prefix, sep, rest = name.partition("_")
    if sep and prefix in SPACES and not rest:
        raise ValueError(
            f"hyperparameter name {name!r} has the {prefix!r} prefix but no name "
            f"after it; use e.g. '{prefix}_lr'"
        )
    if sep and prefix in SPACES:
        return SPACES[prefix], rest
    return identity, name


def _lookup(space) -> Space:
    if isinstance(space, Space):
        return space
    if space == "identity":
        return identity
    if space in SPACES:
        return SPACES[space]
    raise ValueError(
        f"unknown space {space!r}; use one of {sorted(SPACES) + ['identity']} "
        "or a Space"
    )


def constrain(tree: Mapping) -> dict:
    """Map stored (unconstrained) hyperparameters to their constrained values, dropping
    the space prefix from each name.

    Args:
      tree: ``{stored name: value or pytree}``, e.g. ``{"log_lr": u}``.

    Returns:
      ``{constrained name: value}``, e.g. ``{"lr": exp(u)}``; pytrees are mapped leaf
      by leaf.

    Raises:
      ValueError: two stored names constrain to the same name (``"lr"`` and
        ``"log_lr"``), or a name as `space_of` refuses.

    Example:
        ```python
        h = revlearn.spaces.constrain({"log_lr": jnp.log(0.1), "logit_momentum": 2.2})
        opt = revlearn.optim.momentum(h["lr"], h["momentum"])
        ```
    """
    out, origin = {}, {}
    for name, value in tree.items():
        space, plain = space_of(name)
        if plain in out:
            raise ValueError(
                f"{origin[plain]!r} and {name!r} both constrain to {plain!r}; "
                "keep one of them"
            )
        out[plain], origin[plain] = jax.tree.map(space.forward, value), name
    return out


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def unconstrain(values: Mapping, spaces: Mapping) -> dict:
    """Inverse of `constrain`: store ``values`` in the given spaces.

    Args:
      values: ``{name: constrained value or pytree}``.
      spaces: ``{name: "log" | "logit" | "identity" | Space}`` for some names;
        the rest are identity.

    Returns:
      ``{stored name: unconstrained value}``, e.g. ``{"log_lr": log(0.1)}``.

    Raises:
      ValueError: an unknown space, a space name for a missing value, or a
        concrete value outside its space's domain (e.g. a momentum of exactly
        1.0, whose logit is infinite).

    Example:
        ```python
        theta0 = revlearn.spaces.unconstrain({"lr": 0.1, "momentum": 0.9},
                                             {"lr": "log", "momentum": "logit"})
        # {"log_lr": -2.30, "logit_momentum": 2.20}
        ```
    """
    unknown = set(spaces) - set(values)
    if unknown:
        raise ValueError(
            f"spaces names {sorted(unknown)}, which are not in values "
            f"{sorted(values)}; remove them or add their values"
        )
    out = {}
    for name, value in values.items():
        space = _lookup(spaces.get(name, "identity"))
        stored = name if space.name == "identity" else f"{space.name}_{name}"
        for leaf in jax.tree.leaves(value):
            if _is_concrete(leaf) and not bool(np.all(np.asarray(space.contains(jnp.asarray(leaf))))):
                bad = np.asarray(leaf)
                hint = {
                    "logit": " (its logit is infinite; use e.g. 0.999 instead of 1.0)",
                    "log": " (its log is -inf or nan; use a small positive value)",
                }.get(space.name, "")
                raise ValueError(
                    f"{name}={bad if bad.size < 8 else f'array with range [{bad.min()}, {bad.max()}]'} "
                    f"is outside the {space.name} space's domain {space.domain}{hint}"
                )
        out[stored] = jax.tree.map(space.inverse, value)
    return out
