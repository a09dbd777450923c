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
    """((grad_w loss, path term), VJP of (params, theta_f) -> (grad, path)), fenced.

    The gradient *and* the residuals its VJP (the Hessian-vector product) needs
    are computed as one subgraph between `lax.optimization_barrier`s. The
    forward pass of `Reversible` calls this too and ignores the residuals, so
    both passes compile the same fenced subgraph; only the VJP's backward
    half, outside the fence, fuses freely. One gradient evaluation per reverse
    step, not two. On the shipped models (and Himmelblau's function, where an
    unfenced gradient drifts) the gradient then has the same bits in both
    passes; XLA can still round some elementwise losses differently in the two
    loops (Rosenbrock's, on CPU), which the final check detects and raises.
    """
    params, theta_f, theta_o, step = jax.lax.optimization_barrier((params, theta_f, theta_o, step))
    out, vjp = jax.vjp(lambda p, th: problem.gradient(p, merge(th, theta_o), step), params, theta_f)
    return jax.lax.optimization_barrier((out, vjp))


def split_inexact(tree):
    """Split a pytree into (floating leaves or None, other leaves or None)."""
    is_f = lambda x: jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    f = jax.tree_util.tree_map(lambda x: x if is_f(x) else None, tree)
    o = jax.tree_util.tree_map(lambda x: None if is_f(x) else x, tree)
    return f, o


def merge(f, o):
    return jax.tree_util.tree_map(lambda a, b: a if b is None else b, f, o,
                                  is_leaf=lambda x: x is None)
