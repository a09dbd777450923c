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


def linearized_gradient(problem: Problem, params, theta_f, theta_o, step):
    """((grad_w loss, path term), VJP of (params, theta_f) -> (grad, path)), isolated.

    Exact reversal needs the gradient recomputed in the reverse pass to have
    the same bits as in the forward pass. Inlined into each pass, XLA fuses it
    with different neighbours and may then round it differently (on CPU, e.g.
    contracting a*b + c into a fused multiply-add in one loop and not the
    other: seen with Rosenbrock's function and the per-leaf state of an
    earlier core). Here the gradient *and* the
    residuals its VJP (the Hessian-vector product) needs are computed inside
    a `lax.cond` whose two branches are this same function: XLA compiles a
    conditional's branches as separate computations and cannot fuse across
    them (`optimization_barrier` is no fence on CPU: it is removed before
    fusion). The forward pass of `Reversible` calls this too and ignores the
    residuals; XLA then drops those outputs from its branch, so the two
    branches are not literally one computation, but neither fuses with its
    surroundings, and the gradient's bits have agreed on every loss tested
    (`tests/test_reversal.py`); a disagreement is detected and raised. Only
    the VJP's backward half fuses freely. One gradient evaluation per reverse
    step, not two. The predicate depends on `step` only, so under `vmap` the
    conditional stays a conditional.
    """
    treedef = []

    def branch(operands):
        params, theta_f, step = operands
        out, vjp = jax.vjp(lambda p, th: problem.gradient(p, merge(th, theta_o), step),
                           params, theta_f)
        leaves, tdef = jax.tree_util.tree_flatten(vjp)
        treedef[:] = [tdef]
        return out, leaves

    out, leaves = jax.lax.cond(step >= 0, branch, branch, (params, theta_f, step))
    return out, jax.tree_util.tree_unflatten(treedef[0], leaves)


def split_inexact(tree):
    """Split a pytree into (floating leaves or None, other leaves or None)."""
    is_f = lambda x: jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    f = jax.tree_util.tree_map(lambda x: x if is_f(x) else None, tree)
    o = jax.tree_util.tree_map(lambda x: None if is_f(x) else x, tree)
    return f, o


def merge(f, o):
    return jax.tree_util.tree_map(lambda a, b: a if b is None else b, f, o,
                                  is_leaf=lambda x: x is None)
