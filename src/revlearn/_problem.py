"""The inner problem shared by every method: the loss and its gradient.

`sgd` closure-converts the user's `loss_fn` (and optional `path_fn`) once, so
that values it closes over that could carry a derivative become explicit
arguments (`consts`) and get hypergradients like `hypers` do. `theta` below is
the pair (hypers, consts).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from . import _schedules
from .exact import _grid


class Problem(NamedTuple):
    """Static description of the inner problem.

    `objective(params, hypers, step, *consts) -> (loss, path_term)` (scalars);
    `treedef`, `shapes`, `dtypes` describe params0's leaves; `steps` is T.
    """

    objective: Callable
    treedef: Any
    shapes: tuple
    dtypes: tuple
    steps: int

    @property
    def sizes(self) -> list[int]:
        """Number of weights in each params leaf."""
        return [math.prod(s) for s in self.shapes]

    def gradient(self, params, theta, step):
        """(grad_w loss [pytree like params], path term) at (params, theta, step)."""
        hypers, consts = theta

        def loss(p):
            l, path = self.objective(p, hypers, step, *consts)
            return l, path

        return jax.grad(loss, has_aux=True)(params)


def isolated_gradient(problem: Problem, params, theta_f, theta_o, step, ct_fn=None):
    """(grad_w loss, path term) at (params, theta, step), isolated; with `ct_fn`, a function
    of that output returning ((ct_grad [like params], ct_path []), extra), also the VJP of
    (params, theta_f) -> (grad, path) at that cotangent (the Hessian-vector product and its
    theta part) and `extra`: returns (out, vjp, extra).

    Exact reversal needs the gradient recomputed in the reverse pass to have
    the same bits as in the forward pass. Inlined into each pass, XLA fuses it
    with different neighbours and may then round it differently (on CPU, e.g.
    contracting a*b + c into a fused multiply-add in one loop and not the
    other: seen with Rosenbrock's function). Here it is computed inside a
    `lax.cond` whose two branches are this same function: XLA compiles a
    conditional's branches as separate computations and cannot fuse across
    them (`optimization_barrier` is no fence on CPU: it is removed before
    fusion).

    With `ct_fn` (`Reversible(vjp_in_branch=True)`, the CPU default) the
    reverse pass computes its cotangent (which may depend on the gradient, as
    Adam's does) and applies the VJP inside the branch, so the VJP's residuals
    (activations, the minibatch) never leave it: one gradient evaluation per
    reverse step. The forward pass's branch computes the gradient alone, so
    the two passes do not run one computation: their bits agreed on the CPU
    tests' models (MLPs, convnets), but not on a GPU (`Reversible.vjp_in_branch`)
    nor on CPU for the toy experiment's elementwise 2-D loss (drift in 3 of 6
    schedules). Without `ct_fn` both
    passes run this branch identically, and the reverse pass computes the VJP
    beside it, at the cost of one more evaluation of the loss and its
    gradient. Any disagreement is detected and raised. The predicate depends
    on `step` only, so under `vmap` the conditional stays a conditional.
    """
    def branch(operands):
        params, theta_f, step = operands
        f = lambda p, th: problem.gradient(p, merge(th, theta_o), step)
        if ct_fn is None:
            return f(params, theta_f)
        out, vjp = jax.vjp(f, params, theta_f)
        ct, extra = ct_fn(out)
        return out, vjp(ct), extra

    return isolated(branch, step, (params, theta_f, step))


def isolated(fn, step, operands):
    """fn(operands) as the branch of a `lax.cond` on `step >= 0` (always true, not known to
    the compiler): a computation XLA compiles on its own, with the same bits wherever it is
    called (see `isolated_gradient`)."""
    # the barrier keeps the compiler from folding a constant predicate (a loop of one step
    # is unrolled, its step index known) and then inlining the branch into its neighbours
    return jax.lax.cond(jax.lax.optimization_barrier(step) >= 0, fn, fn, operands)


def split_inexact(tree):
    """Split a pytree into (floating leaves or None, other leaves or None)."""
    is_f = lambda x: jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    f = jax.tree_util.tree_map(lambda x: x if is_f(x) else None, tree)
    o = jax.tree_util.tree_map(lambda x: None if is_f(x) else x, tree)
    return f, o


def merge(f, o):
    return jax.tree_util.tree_map(lambda a, b: a if b is None else b, f, o,
                                  is_leaf=lambda x: x is None)


class Prepared(NamedTuple):
    """What every method solves (built and validated by `revlearn.train`): the problem, the
    optimizer (a `revlearn.optim` rule or an optax transform), the initial params and state,
    theta = (hypers, consts), and for a rule the normalised schedules of its
    hyperparameters and of its decays (before rounding to their grids)."""

    problem: Problem
    optimizer: Any
    params0: Any
    state0: Any            # rule: {moment name: pytree like params0, "count": int32}; optax: its state
    theta: Any
    hypers: dict | None    # name -> _schedules.Schedule
    decays: dict | None    # name -> _schedules.Schedule
    mesh: Any = None       # the mesh params0 is sharded over (`_sharding.mesh_of`), or None

    @property
    def rule(self):
        return None if self.hypers is None else self.optimizer


def decay_values(p: Prepared) -> dict:
    """Per decay, its schedule on its grid (float64, straight-through: differentiable as the
    unrounded value): the values every method applies."""
    out = {}
    for d in p.rule.decays():
        s = p.decays[d.name]
        f = lambda a, g=d.grid: None if a is None else _grid.on_grid(a, g)
        out[d.name] = _schedules.Schedule(tuple(f(a) for a in s.constant),
                                          tuple(f(a) for a in s.stepwise))
    return out
