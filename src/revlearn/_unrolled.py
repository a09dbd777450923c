"""Storing methods: reverse-mode autodiff through the training loop.

`Unrolled` is the reference: a `lax.scan` of the plain floating-point update

    v_{t+1} = gamma_t v_t - (1 - gamma_t) grad_w L(w_t, theta, t)
    w_{t+1} = w_t + alpha_t v_{t+1}

differentiated by JAX, which stores every step: memory O(T P).
`Checkpointed(every=k)` stores every k-th state and recomputes the segments
in the backward pass (`jax.checkpoint`): memory O((T/k + k) P), one extra
forward pass of compute. Both apply momentum rounded to n/2^16 like
`Reversible`, with the derivative of the unrounded value, so all three methods
compute the same function.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from . import _faults, _schedules
from ._problem import Problem


def _float_step(problem: Problem, lr, momentum, theta):
    """One step of the update in each leaf's own dtype, with fault checks."""

    def step(carry, xs):
        w, v, path, fault = carry
        t, lr_slices, mom_slices = xs
        alphas = _schedules.values(lr, lr_slices, problem.shapes, problem.dtypes)
        gammas_raw = _schedules.values(momentum, mom_slices, problem.shapes, problem.dtypes)
        gammas = [_schedules.rounded_momentum(g) for g in gammas_raw]
        n_bad = jnp.zeros((), bool)
        for g in gammas_raw:
            n = _schedules.numerators(g)
            n_bad |= jnp.any((n < 2) | (n > 65535))
        fault = fault.record(n_bad, _faults.MOMENTUM_RANGE, t)
        lr_bad = jnp.zeros((), bool)
        for a in alphas:
            lr_bad |= ~jnp.all(jnp.isfinite(a))
        fault = fault.record(lr_bad, _faults.NONFINITE_LR, t)
        grads, path_t = problem.gradient(problem.treedef.unflatten(w), theta, t)
        g_leaves = jax.tree_util.tree_leaves(grads)
        g_bad = jnp.zeros((), bool)
        for g in g_leaves:
            g_bad |= ~jnp.all(jnp.isfinite(g))
        fault = fault.record(g_bad, _faults.NONFINITE_GRADIENT, t)
        v = [(gm * vi - (1 - gm) * gi).astype(vi.dtype) for gm, vi, gi in zip(gammas, v, g_leaves)]
        w = [(wi + a * vi).astype(wi.dtype) for wi, a, vi in zip(w, alphas, v)]
        return (w, v, path + path_t, fault), None

    return step


def _initial_carry(params0, v0):
    w = jax.tree_util.tree_leaves(params0)
    v = jax.tree_util.tree_leaves(v0)
    return (w, v, jnp.zeros((), jnp.result_type(float)), _faults.Fault.none())


@dataclasses.dataclass(frozen=True)
class Unrolled:
    """Reverse-mode autodiff through a scan that stores every step (the reference).

    Memory grows as O(steps * params); use it to check the other methods.
    """

    def solve(self, problem: Problem, params0, v0, theta, lr, momentum):
        step = _float_step(problem, lr, momentum, theta)
        xs = (jnp.arange(problem.steps, dtype=jnp.int32),
              lr.stepwise, momentum.stepwise)
        (w, v, path, fault), _ = jax.lax.scan(step, _initial_carry(params0, v0), xs)
        _faults.raise_if_fault(fault, "revlearn.sgd(method=Unrolled())")
        return problem.treedef.unflatten(w), path


@dataclasses.dataclass(frozen=True)
class Checkpointed:
    """Store every `every`-th state; recompute the steps between them backwards.

    `every=None` picks ceil(sqrt(steps)), the memory-optimal single level.
    """

    every: int | None = None

    def __post_init__(self):
        if self.every is not None and (not isinstance(self.every, int) or self.every < 1):
            raise ValueError(f"Checkpointed(every={self.every!r}): every must be a positive "
                             "integer (steps between stored states), or None for sqrt(steps).")

    def solve(self, problem: Problem, params0, v0, theta, lr, momentum):
        T = problem.steps
        k = self.every or max(1, math.ceil(math.sqrt(T)))
        k = min(k, T)
        step = _float_step(problem, lr, momentum, theta)
        xs = (jnp.arange(T, dtype=jnp.int32),
              lr.stepwise, momentum.stepwise)
        m, r = divmod(T, k)

        @jax.checkpoint
        def segment(carry, seg_xs):
            carry, _ = jax.lax.scan(step, carry, seg_xs)
            return carry, None

        head = jax.tree_util.tree_map(lambda a: a[:m * k].reshape((m, k) + a.shape[1:]), xs)
        carry, _ = jax.lax.scan(segment, _initial_carry(params0, v0), head)
        if r:
            tail = jax.tree_util.tree_map(lambda a: a[m * k:], xs)
            carry, _ = segment(carry, tail)
        w, v, path, fault = carry
        _faults.raise_if_fault(fault, f"revlearn.sgd(method=Checkpointed(every={k}))")
        return problem.treedef.unflatten(w), path
