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


def isolated_gradient(problem: Problem, params, theta_f, theta_o, step, cotangent=None):
    """(grad_w loss, path term) at (params, theta, step), isolated; with `cotangent`
    = (ct_grad [like params], ct_path []), also the VJP of (params, theta_f) ->
    (grad, path) at it (the Hessian-vector product and its theta part).

    Exact reversal needs the gradient recomputed in the reverse pass to have
    the same bits as in the forward pass. Inlined into each pass, XLA fuses it
    with different neighbours and may then round it differently (on CPU, e.g.
    contracting a*b + c into a fused multiply-add in one loop and not the
    other: seen with Rosenbrock's function and the per-leaf state of an
    earlier core). Here it is computed inside a `lax.cond` whose two branches
    are this same function: XLA compiles a conditional's branches as separate
    computations and cannot fuse across them (`optimization_barrier` is no
    fence on CPU: it is removed before fusion).

    With `cotangent` (`Reversible(vjp_in_branch=True)`, the CPU default) the
    reverse pass applies the VJP inside the branch, so its residuals
    (activations, the minibatch) never leave it: one gradient evaluation per
    reverse step. Returning them from the conditional and applying the VJP
    outside made T steps of gradient+VJP cost 0.39-0.47x plain training more
    on the benchmark MLP; the whole hypergradient took 1.03x the time on 2
    cores (1.10x on 1).
    The forward pass's branch then computes the gradient alone, so the two
    passes do not run one computation: their bits agreed on every CPU test,
    but not on an H200 GPU (also with deterministic ops: presumably XLA fuses
    the gradient with its VJP there). Without
    `cotangent` (`vjp_in_branch=False`, the default off CPU) both passes run
    this branch identically, and the reverse pass computes the VJP beside it
    at the cost of one more evaluation of the loss and its gradient. Any
    disagreement is detected and raised.
    The predicate depends on `step` only, so under `vmap` the conditional
    stays a conditional.
    """
    def branch(operands):
        params, theta_f, step, ct = operands
        f = lambda p, th: problem.gradient(p, merge(th, theta_o), step)
        if ct is None:
            return f(params, theta_f), None
        out, vjp = jax.vjp(f, params, theta_f)
        return out, vjp(ct)

    return jax.lax.cond(step >= 0, branch, branch, (params, theta_f, step, cotangent))


def split_inexact(tree):
    """Split a pytree into (floating leaves or None, other leaves or None)."""
    is_f = lambda x: jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    f = jax.tree_util.tree_map(lambda x: x if is_f(x) else None, tree)
    o = jax.tree_util.tree_map(lambda x: None if is_f(x) else x, tree)
    return f, o


def merge(f, o):
    return jax.tree_util.tree_map(lambda a, b: a if b is None else b, f, o,
                                  is_leaf=lambda x: x is None)
