"""Storing methods: reverse-mode autodiff through the training loop.

`Unrolled` is the reference: a `lax.scan` of the rule's floating-point step
(`Rule.float_step`, e.g. for momentum

    v_{t+1} = gamma_t v_t - (1 - gamma_t) grad_w L(w_t, theta, t)
    w_{t+1} = w_t + alpha_t v_{t+1})

differentiated by JAX, which stores every step: memory O(T P).
`Checkpointed(every=k)` stores every k-th state and recomputes the segments
in the backward pass (`jax.checkpoint`): memory O((T/k + k) P), one extra
forward pass of compute. Both apply decays rounded to their grids like
`Reversible` (with the derivative of the unrounded value), so all three methods
compute the same function. Both also run any optax `GradientTransformation`
(`updates, state = tx.update(g, state, w); w = optax.apply_updates(w, updates)`),
which need not be reversible.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from .. import _faults, _schedules
from .._problem import Prepared, decay_values


def _rule_step(p: Prepared):
    """(scan step, initial carry, xs, finish) for a `revlearn.optim` rule."""
    problem, rule, theta = p.problem, p.rule, p.theta
    decays = decay_values(p)
    names = list(p.hypers)
    fault0 = _faults.schedule_faults(_faults.Fault.none(), rule, p.hypers, p.decays,
                                     problem.steps)
    mom0 = {m.name: jax.tree_util.tree_leaves(p.state0[m.name]) for m in rule.moments}
    fault0 = _faults.state0_faults(fault0, rule, mom0)
    count0 = p.state0.get("count", jnp.int32(0))

    def step(carry, xs):
        w, mom, path, fault = carry
        t, h_sl, d_sl = xs
        h = {n: _schedules.values(p.hypers[n], h_sl[n], problem.shapes, problem.dtypes)
             for n in names}
        d = {n: _schedules.at_step(decays[n], d_sl[n]) for n in decays}
        grads, path_t = problem.gradient(problem.treedef.unflatten(w), theta, t)
        g_leaves = jax.tree_util.tree_leaves(grads)
        fault = fault.record(~_faults.all_finite(g_leaves), _faults.NONFINITE_GRADIENT, t)
        k = (count0 + t + 1).astype(jnp.float64)
        w_new, mom_new = [], {m: [] for m in mom}
        for i, (wi, gi) in enumerate(zip(w, g_leaves)):
            wi, new = rule.float_step(wi, {m: mom[m][i] for m in mom}, gi,
                                      {n: h[n][i] for n in names}, {n: d[n][i] for n in d}, k)
            w_new.append(wi)
            for m in mom:
                mom_new[m].append(new[m])
        fault = fault.record(~_faults.all_finite(w_new + sum(mom_new.values(), [])),
                             _faults.NONFINITE_STATE, t)
        return (w_new, mom_new, path + path_t, fault), None

    init = (jax.tree_util.tree_leaves(p.params0), mom0, jnp.zeros((), jnp.result_type(float)),
            fault0)
    xs = (jnp.arange(problem.steps, dtype=jnp.int32), {n: p.hypers[n].stepwise for n in names},
          {n: decays[n].stepwise for n in decays})

    def finish(carry):
        w, mom, path, fault = carry
        state = {m: problem.treedef.unflatten(mom[m]) for m in mom}
        if rule.counted:
            state["count"] = count0 + problem.steps
        return problem.treedef.unflatten(w), rule.State(**state), path, fault

    return step, init, xs, finish


def _optax_step(p: Prepared):
    """(scan step, initial carry, xs, finish) for an optax GradientTransformation."""
    problem, tx, theta = p.problem, p.optimizer, p.theta

    def step(carry, xs):
        w, state, path, fault = carry
        t = xs
        params = problem.treedef.unflatten(w)
        grads, path_t = problem.gradient(params, theta, t)
        fault = fault.record(~_faults.all_finite(jax.tree_util.tree_leaves(grads)),
                             _faults.NONFINITE_GRADIENT, t)
        updates, state = tx.update(grads, state, params)
        w = [(wi + u).astype(wi.dtype) for wi, u in zip(w, jax.tree_util.tree_leaves(updates))]
        fault = fault.record(~_faults.all_finite(w + jax.tree_util.tree_leaves(state)),
                             _faults.NONFINITE_STATE, t)
        return (w, state, path + path_t, fault), None

    init = (jax.tree_util.tree_leaves(p.params0), p.state0, jnp.zeros((), jnp.result_type(float)),
            _faults.Fault.none())

    def finish(carry):
        w, state, path, fault = carry
        return problem.treedef.unflatten(w), state, path, fault

    return step, init, jnp.arange(problem.steps, dtype=jnp.int32), finish


def _parts(p: Prepared, where: str):
    """The scan's parts, with every differentiable input guarded: a non-finite hypergradient
    raises (`_faults.guard_cotangents`) instead of being returned."""
    info = {} if p.rule is None else {"names": _faults.names(p.rule)}
    guarded = _faults.guard_cotangents(
        (p.params0, p.state0, p.theta, p.hypers, p.decays), where + " (backward pass)", **info)
    p = p._replace(**dict(zip(("params0", "state0", "theta", "hypers", "decays"), guarded)))
    return _rule_step(p) if p.rule is not None else _optax_step(p)


def _raise(p: Prepared, fault, where: str):
    info = {} if p.rule is None else {"names": _faults.names(p.rule)}
    _faults.raise_if_fault(fault, where, **info)


@dataclasses.dataclass(frozen=True)
class Unrolled:
    """Reverse-mode autodiff through a scan that stores every step (the reference).

    Memory grows as O(steps * params); use it to check the other methods, for short runs,
    and for optax transforms (which need not reverse). Works without 64-bit mode.

    Example:
        ```python
        g_unr = jax.grad(lambda lr: meta_fn(revlearn.train(
            loss_fn, params0, optimizer=revlearn.optim.adam(lr), steps=100,
            method=revlearn.Unrolled())))(1e-3)
        ```
    """

    def solve(self, p: Prepared):
        """Train; returns (w_T, state_T, path sum)."""
        where = "revlearn.train(method=Unrolled())"
        step, init, xs, finish = _parts(p, where)
        carry, _ = jax.lax.scan(step, init, xs)
        w, state, path, fault = finish(carry)
        _raise(p, fault, where)
        return w, state, path


@dataclasses.dataclass(frozen=True)
class Checkpointed:
    """Store every `every`-th state; recompute the steps between them backwards.

    Memory O((steps / every + every) * params), one extra forward pass of compute.

    Args:
      every: steps between stored states; None picks ceil(sqrt(steps)), the
        memory-optimal single level.

    Raises:
      ValueError: every is not a positive integer.

    Example:
        ```python
        w_T = revlearn.train(loss_fn, params0, optimizer=optax.adamw(1e-3), steps=10_000,
                             method=revlearn.Checkpointed(every=100))
        ```
    """

    every: int | None = None

    def __post_init__(self):
        if self.every is not None and (isinstance(self.every, bool) or not isinstance(self.every, int)
                                       or self.every < 1):
            raise ValueError(f"Checkpointed(every={self.every!r}): every must be a positive "
                             "integer (steps between stored states), or None for sqrt(steps).")

    def solve(self, p: Prepared):
        """Train; returns (w_T, state_T, path sum)."""
        T = p.problem.steps
        k = min(self.every or max(1, math.ceil(math.sqrt(T))), T)
        where = f"revlearn.train(method=Checkpointed(every={k}))"
        step, init, xs, finish = _parts(p, where)
        m, r = divmod(T, k)

        @jax.checkpoint
        def segment(carry, seg_xs):
            carry, _ = jax.lax.scan(step, carry, seg_xs)
            return carry, None

        head = jax.tree_util.tree_map(lambda a: a[:m * k].reshape((m, k) + a.shape[1:]), xs)
        carry, _ = jax.lax.scan(segment, init, head)
        if r:
            tail = jax.tree_util.tree_map(lambda a: a[m * k:], xs)
            carry, _ = segment(carry, tail)
        w, state, path, fault = finish(carry)
        _raise(p, fault, where)
        return w, state, path
