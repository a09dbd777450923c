"""Learning curves: an update rule stepped in ordinary floating point, recording metrics.

The hypergradients of the lab come from `revlearn.train` (exact reversal); the
learning curves only need the losses along the trajectory, which `train` does not
return. `float_train` runs the same training in plain floating point with the
rule's own step (`Rule.float_step`, leaf by leaf, decays applied on their grids as
every revlearn method applies them), so a curve ends where `train` ends up to
rounding (the tests check it against `Unrolled`), for any rule: momentum, Adam,
RMSProp with momentum. It is not differentiated and stores nothing but the records.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from revlearn.exact._grid import on_grid

__all__ = ["float_train"]


def _leaf_specs(name: str, spec: Any, params0: Any, steps: int) -> list:
    """Per params leaf, (array, stepwise): a constant, or a [steps, *B] schedule."""
    leaves = jax.tree_util.tree_leaves(params0)
    if isinstance(spec, (int, float, np.ndarray, np.generic, jax.Array)):
        per_leaf = [spec] * len(leaves)
    else:  # a pytree prefix of params0: each leaf covers the params below it
        per_leaf = []
        for s, sub in zip(jax.tree_util.tree_leaves(spec),
                          jax.tree_util.tree_structure(spec).flatten_up_to(params0)):
            per_leaf += [s] * len(jax.tree_util.tree_leaves(sub))
    out = []
    for s, leaf in zip(per_leaf, leaves):
        a = jnp.asarray(s)
        if a.ndim == 0:
            out.append((a, False))
        elif a.shape[0] == steps and np.ndim(leaf) >= a.ndim - 1:
            out.append((a.reshape(a.shape + (1,) * (np.ndim(leaf) - a.ndim + 1)), True))
        else:
            raise ValueError(f"{name}: float_train takes scalars and [steps, ...] schedules "
                             f"(steps={steps}), got shape {a.shape} for a leaf of shape "
                             f"{np.shape(leaf)}")
    return out


def float_train(rule, loss_fn: Callable, params0: Any, hypers: Any = None, *, steps: int,
                record: Callable, every: int = 1):
    """Train `steps` steps of `rule` (a `revlearn.optim` rule) from its zero state in
    floating point, and record `record(params, state, t)` after t = 0, every, 2 every, ...
    steps (`state` is the rule's `State`, e.g. `MomentumState(v)`).

    Args:
      rule: e.g. `revlearn.optim.momentum(lr, m)`; each hyperparameter a scalar, a [steps]
        schedule, or a pytree prefix of params0 whose leaves are scalars or [steps, *B]
        schedules (B broadcastable to the leaf); per-weight constants are not supported.
      loss_fn: `loss_fn(params, hypers, step)`, as for `revlearn.train`.
      record: `record(params, state, t) -> pytree of arrays` (t an int32 scalar).
      every: record every `every` steps (a trailing partial block is not recorded).

    Returns:
      (w_T, records): records' leaves have a leading axis of length steps // every + 1
      (index j: after j * every steps).
    """
    if every < 1:
        raise ValueError(f"every={every} must be >= 1")
    leaves0, treedef = jax.tree_util.tree_flatten(params0)
    specs = {n: _leaf_specs(n, s, params0, steps) for n, s in rule.hypers().items()}
    decays = rule.decays()
    names = [m.name for m in rule.moments]
    grad = jax.grad(loss_fn)

    def state_of(mom, t):
        fields = {m: treedef.unflatten(mom[m]) for m in names}
        if rule.counted:
            fields["count"] = t
        return rule.State(**fields)

    def step(carry, t):
        w, mom = carry
        g = jax.tree_util.tree_leaves(grad(treedef.unflatten(w), hypers, t))
        k = (t + 1).astype(jnp.float64)
        w_new, mom_new = [], {m: [] for m in names}
        for i, (wi, gi) in enumerate(zip(w, g)):
            h = {n: a[t] if stepwise else a for n, (a, stepwise) in
                 ((n, specs[n][i]) for n in specs)}
            d = {dec.name: on_grid(dec.value({r: h[r] for r in dec.reads}), dec.grid)
                 for dec in decays}
            wi, new = rule.float_step(wi, {m: mom[m][i] for m in names}, gi, h, d, k)
            w_new.append(wi)
            for m in names:
                mom_new[m].append(new[m])
        t1 = t + 1
        now = lambda: record(treedef.unflatten(w_new), state_of(mom_new, t1), t1)  # noqa: E731
        if every == 1:
            return (w_new, mom_new), now()
        shapes = jax.eval_shape(now)
        skip = lambda: jax.tree_util.tree_map(  # noqa: E731
            lambda s: jnp.full(s.shape, jnp.nan if jnp.issubdtype(s.dtype, jnp.inexact)
                               else 0, s.dtype), shapes)
        return (w_new, mom_new), jax.lax.cond(t1 % every == 0, now, skip)

    mom0 = {m: [jnp.zeros_like(l) for l in leaves0] for m in names}
    first = record(params0, state_of(mom0, jnp.int32(0)), jnp.int32(0))
    (w, _), recs = jax.lax.scan(step, (leaves0, mom0), jnp.arange(steps, dtype=jnp.int32))
    recs = jax.tree_util.tree_map(
        lambda r0, rs: jnp.concatenate([jnp.asarray(r0)[None], rs[every - 1::every]]),
        first, recs)
    return treedef.unflatten(w), recs
