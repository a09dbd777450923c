"""Hyperparameter schedules: scalar, per step, per group, per weight.

Every hyperparameter of an update rule (`lr`, `momentum`, Adam's `b1`, ...) is one of

* a scalar: the same value for every weight at every step;
* an array of shape [steps]: one value per step for every weight;
* a pytree that is a prefix of `params0`: each leaf applies to the params
  subtree below it and is a scalar, a [steps] schedule, or, when it sits on a
  single params leaf of shape S, per weight (shape S) or per step and weight
  (shape [steps, *S]). The explicit forms [1, *B] and [steps, *B], with B
  broadcastable to S, remove any ambiguity (e.g. a leaf of shape (steps,) that
  is also S).

`normalise` turns a spec into a `Schedule`: for each params leaf i exactly one of
`constant[i]` (shape B_i) or `stepwise[i]` (shape [steps, *B_i]), B_i broadcastable
to the leaf's shape. `values(schedule, slices, ...)` gives the per-leaf arrays at one
step; the stepwise arrays travel through `lax.scan` as `xs`, so the gradient of
each step's slice comes back as a scan output instead of an O(steps) scatter.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

class Schedule(NamedTuple):
    """Per params leaf: `constant[i]` [*B_i] or None, `stepwise[i]` [steps, *B_i] or None."""

    constant: tuple
    stepwise: tuple


def _is_array_like(x) -> bool:
    return isinstance(x, (int, float, np.ndarray, np.generic, jax.Array)) and not isinstance(x, bool)


def _path(p) -> str:
    return jax.tree_util.keystr(p) or "<root>"


def _leaf_schedule(name: str, where: str, spec, shape: tuple, steps: int, single_leaf: bool):
    """One params leaf of `shape` under spec -> ("constant" | "stepwise", array)."""
    # Keep concrete inputs as numpy (even under jit) so the buffer can be sized from them.
    a = spec if isinstance(spec, jax.Array) else np.asarray(spec)
    if not jnp.issubdtype(a.dtype, jnp.floating):
        a = a.astype(jnp.result_type(float))
    s = a.shape
    hint = (f"Allowed for {name}{where}: a scalar, shape ({steps},) for one value per step"
            + (f", {shape} per weight, ({steps}, *{shape}) per step and weight, or the explicit "
               f"forms (1, *B) / ({steps}, *B) with B broadcastable to {shape}" if single_leaf else
               " (it covers several params leaves, so per-weight shapes are not possible here)"))
    if a.ndim == 0:
        return "constant", a
    if single_leaf and s == (steps,) and shape == (steps,):
        raise ValueError(
            f"{name}{where} has shape {s}, which is both the number of steps ({steps}) and the "
            f"weight's shape {shape}, so it is ambiguous. Write it as shape ({steps}, 1) for a "
            f"per-step schedule or (1, {steps}) for one value per weight.")
    if s == (steps,) and not (single_leaf and s == shape):
        return "stepwise", a.reshape((steps,) + (1,) * len(shape))
    if single_leaf and s == shape:
        return "constant", a
    if single_leaf and a.ndim == len(shape) + 1 and s[0] in (1, steps):
        try:
            np.broadcast_shapes(s[1:], shape)
        except ValueError:
            raise ValueError(f"{name}{where} has shape {s}, whose trailing dims do not broadcast "
                             f"to the weight's shape {shape}. {hint}.") from None
        if np.broadcast_shapes(s[1:], shape) != tuple(shape):
            raise ValueError(f"{name}{where} has shape {s}, which would broadcast the weight's "
                             f"shape {shape} to something larger. {hint}.")
        if s[0] == steps and steps > 1:
            return "stepwise", a
        return "constant", a[0]
    raise ValueError(f"{name}{where} has shape {s}, which fits neither steps={steps} nor the "
                     f"weight's shape {shape}. {hint}.")


class _Sub:
    """(key path, spec entry, params subtree) of one entry of a prefix spec: an opaque leaf,
    so no tuple in the spec is mistaken for one."""

    __slots__ = ("path", "spec", "subtree")

    def __init__(self, path, spec, subtree):
        self.path, self.spec, self.subtree = path, spec, subtree

    def parts(self):
        return self.path, self.spec, self.subtree


def normalise(name: str, spec: Any, params0: Any, steps: int) -> Schedule:
    """Validate `spec` (see module docstring) against `params0` and `steps`."""
    leaves, treedef = jax.tree_util.tree_flatten(params0)
    shapes = [tuple(jnp.shape(l)) for l in leaves]
    if spec is None:
        raise ValueError(f"{name} is required: pass a scalar, a [steps] array, or a pytree "
                         "shaped like params0.")
    if _is_array_like(spec):
        # on a params0 of one leaf (a bare array, say) it may also be per weight
        per_leaf = [(_path(()), spec, len(leaves) == 1)] * len(leaves)
    else:
        try:
            sub = jax.tree_util.tree_map_with_path(
                lambda p, s, subtree: _Sub(p, s, subtree), spec, params0,
                is_leaf=lambda x: x is None)
        except (ValueError, TypeError) as e:
            raise ValueError(
                f"{name} is a {type(spec).__name__} whose structure is not a prefix of params0's "
                f"({treedef}): {e}. Pass a scalar, a [steps] array, or a pytree with params0's "
                "structure (or a prefix of it, e.g. one entry per layer).") from None
        per_leaf = []
        for p, s, subtree in (x.parts() for x in jax.tree_util.tree_leaves(
                sub, is_leaf=lambda x: isinstance(x, _Sub))):
            n_sub = len(jax.tree_util.tree_leaves(subtree))
            if s is None and n_sub == 0:
                continue  # nothing trained below (a carried leaf of an Equinox module)
            if s is None:
                raise ValueError(f"{name}{_path(p)} is None; give a value for every params leaf.")
            per_leaf.extend([(_path(p), s, n_sub == 1)] * n_sub)
    constant, stepwise = [], []
    for (where, s, single), shape in zip(per_leaf, shapes):
        where = "" if where == "<root>" else where
        kind, a = _leaf_schedule(name, where, s, shape, steps, single)
        constant.append(a if kind == "constant" else None)
        stepwise.append(a if kind == "stepwise" else None)
    return Schedule(tuple(constant), tuple(stepwise))


def values(schedule: Schedule, slices, shapes: list[tuple], dtypes: list) -> list[jax.Array]:
    """Per-leaf hyperparameter arrays at one step (broadcast to each leaf's shape and dtype)."""
    out = []
    for c, s, shape, dt in zip(schedule.constant, slices, shapes, dtypes):
        a = c if c is not None else s
        out.append(jnp.broadcast_to(a.astype(dt), shape))
    return out


def is_concrete(schedule: Schedule) -> bool:
    return not any(isinstance(a, jax.core.Tracer)
                   for a in jax.tree_util.tree_leaves(schedule))


def combine(fn, schedules: dict, names) -> Schedule:
    """Per params leaf, `fn({name: entry})` of the named schedules' entries, broadcasting:
    constant if every entry is constant, else stepwise [steps, *B] (constants are
    broadcast along steps). Concrete (numpy) entries give concrete results."""
    leaves = len(next(iter(schedules.values())).constant)
    constant, stepwise = [], []
    for i in range(leaves):
        stepped = any(schedules[n].stepwise[i] is not None for n in names)
        args = {}
        for n in names:
            c, s = schedules[n].constant[i], schedules[n].stepwise[i]
            args[n] = s if c is None else (c[None] if stepped else c)
        out = fn(args)
        constant.append(None if stepped else out)
        stepwise.append(out if stepped else None)
    return Schedule(tuple(constant), tuple(stepwise))


def at_step(schedule: Schedule, slices) -> list:
    """Per leaf, the schedule's entry at one step: the constant [*B_i], or this step's slice of
    the stepwise array (`slices`, as `lax.scan` hands them out)."""
    return [c if c is not None else s for c, s in zip(schedule.constant, slices)]


def entries(schedule: Schedule) -> list:
    """Per leaf, the constant entry or the stepwise array."""
    return [c if c is not None else s for c, s in zip(schedule.constant, schedule.stepwise)]
