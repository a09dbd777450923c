"""Which leaves of `params0` and `hypers` `train` trains (or traces), and which it carries.

* A plain pytree (dicts, lists, tuples, NamedTuples, a Flax `params` dict, an
  `nnx.State`): every leaf is trained (params0; each must be a float array or number)
  or traced (hypers; each must be an array or a number), as always.
* Inside an Equinox module (an `equinox.Module`, anywhere in the tree), the
  `eqx.filter(tree, eqx.is_inexact_array)` convention: its inexact-array leaves are
  trained (traced), and every other leaf (activation functions, Python numbers and
  bools, integer arrays, keys) is carried unchanged: `loss_fn` sees it in place and
  `w_T` comes back as a module of the same type holding it.

`split` separates the two: the trained part (the tree with None where a carried leaf
was, as `eqx.partition` gives) goes through training; the carried part is put back
around `loss_fn` and `path_fn` (`Carried.wrap`) and around w_T (`Carried.rebuild`).
A carried value the loss reads is closed over, so if it is traced (by an enclosing
`jax.jit` or `jax.grad`) it is differentiated through the loss like any value a loss
closes over (`_problem`). Equinox is recognised without importing it: a tree can only
hold an Equinox module once equinox has been imported.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def _module_types() -> tuple:
    eqx = sys.modules.get("equinox")
    module = getattr(eqx, "Module", None)
    return (module,) if isinstance(module, type) else ()


def is_nnx(tree) -> bool:
    """Whether `tree` is a Flax nnx object (recognised by its class's module, not imported)."""
    return any(c.__module__.startswith("flax.nnx") for c in type(tree).__mro__)


def is_inexact_array(x) -> bool:
    """`eqx.is_inexact_array`: a JAX or NumPy array (or NumPy scalar) of float or complex
    dtype; Python numbers are not arrays."""
    return (isinstance(x, (jax.Array, np.ndarray, np.generic))
            and jnp.issubdtype(x.dtype, jnp.inexact))


def has_module(tree) -> bool:
    """Whether `tree` holds an Equinox module."""
    types = _module_types()
    return bool(types) and any(isinstance(x, types) for x in jax.tree_util.tree_leaves(
        tree, is_leaf=lambda x: isinstance(x, types)))


def mask(tree) -> Any:
    """A tree like `tree` of bools, True where a leaf is trained (traced), False where it is
    carried (a leaf of an Equinox module that is not an inexact array); None when every
    leaf is trained (no Equinox module in `tree`, or one that holds only inexact arrays)."""
    types = _module_types()
    if not types:
        return None
    is_module = lambda x: isinstance(x, types)
    out = jax.tree_util.tree_map(
        lambda x: jax.tree_util.tree_map(is_inexact_array, x) if is_module(x) else True,
        tree, is_leaf=is_module)
    return None if all(jax.tree_util.tree_leaves(out)) else out


def partition(tree, keep) -> tuple:
    """(trained, carried): `tree` with None where `keep` (from `mask`) is False, and with None
    where it is True (`eqx.partition`)."""
    trained = jax.tree_util.tree_map(lambda x, k: x if k else None, tree, keep)
    carried = jax.tree_util.tree_map(lambda x, k: None if k else x, tree, keep)
    return trained, carried


def combine(trained, carried) -> Any:
    """The inverse of `partition` (`eqx.combine`)."""
    return jax.tree_util.tree_map(lambda a, b: b if a is None else a, trained, carried,
                                  is_leaf=lambda x: x is None)


def trained(tree) -> Any:
    """The trained part of `tree` (itself when nothing in it is carried)."""
    keep = mask(tree)
    return tree if keep is None else partition(tree, keep)[0]


class Carried(NamedTuple):
    """The carried parts of params0 and hypers (None where nothing is carried)."""

    params: Any
    hypers: Any

    def wrap(self, fn: Callable | None) -> Callable | None:
        """`fn(params, hypers, step)` called on the trained parts: puts the carried leaves back
        first."""
        if fn is None:
            return None
        params_c, hypers_c = self.params, self.hypers

        def wrapped(params, hypers, step):
            if params_c is not None:
                params = combine(params, params_c)
            if hypers_c is not None:
                hypers = combine(hypers, hypers_c)
            return fn(params, hypers, step)

        return wrapped

    def rebuild(self, params_T) -> Any:
        """w_T as a tree like params0 (a module of the same type, with its carried leaves)."""
        return params_T if self.params is None else combine(params_T, self.params)


def split(params0, hypers) -> tuple:
    """(trained part of params0, traced part of hypers, `Carried` or None if nothing is
    carried)."""
    pk, hk = mask(params0), mask(hypers)
    if pk is None and hk is None:
        return params0, hypers, None
    params_c = hypers_c = None
    if pk is not None:
        params0, params_c = partition(params0, pk)
    if hk is not None:
        hypers, hypers_c = partition(hypers, hk)
    return params0, hypers, Carried(params_c, hypers_c)
