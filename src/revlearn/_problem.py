"""The inner problem shared by every method: loss, flattening, one gradient.

`sgd` closure-converts the user's `loss_fn` (and optional `path_fn`) once, so
that values it closes over that could carry a derivative become explicit
arguments (`consts`) and get hypergradients like `hypers` do. `theta` below is
the pair (hypers, consts).
"""

from __future__ import annotations

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
    has_path: bool

    @property
    def sizes(self) -> list[int]:
        out = []
        for s in self.shapes:
            n = 1
            for d in s:
                n *= d
            out.append(n)
        return out

    def flatten(self, tree) -> jax.Array:
        """Pytree like params0 -> flat [P] float64."""
        leaves = jax.tree_util.tree_leaves(tree)
        if not leaves:
            return jnp.zeros((0,), jnp.float64)
        return jnp.concatenate([jnp.ravel(l).astype(jnp.float64) for l in leaves])

    def unflatten(self, flat: jax.Array, dtypes=None):
        """Flat [P] -> pytree like params0, each leaf cast to its own dtype."""
        dtypes = self.dtypes if dtypes is None else dtypes
        leaves, start = [], 0
        for shape, size, dt in zip(self.shapes, self.sizes, dtypes):
            leaves.append(flat[start:start + size].reshape(shape).astype(dt))
            start += size
        return jax.tree_util.tree_unflatten(self.treedef, leaves)

    def gradient(self, params, theta, step):
        """(grad_w loss [pytree like params], path term) at (params, theta, step)."""
        hypers, consts = theta

        def loss(p):
            l, path = self.objective(p, hypers, step, *consts)
            return l, path

        return jax.grad(loss, has_aux=True)(params)

    def isolated_gradient(self, params, theta, step):
        """`gradient` fenced by `lax.optimization_barrier` on its inputs and outputs.

        Exact reversal needs the gradient recomputed in the reverse pass to be
        bit-identical to the forward one. Unfenced, XLA fuses it with its
        neighbours, which differ between the passes (the Hessian-vector product
        reuses its intermediates backwards), and may then contract a*b + c into a
        fused multiply-add in one program and not the other. Fenced, both passes
        compile the same isolated subgraph.
        """
        params, theta, step = jax.lax.optimization_barrier((params, theta, step))
        return jax.lax.optimization_barrier(self.gradient(params, theta, step))


def linearized_gradient(problem: Problem, params, theta_f, theta_o, step):
    """((grad_w loss, path term), VJP of (params, theta_f) -> (grad, path)), fenced.

    The gradient *and* the residuals its VJP (the Hessian-vector product) needs
    are computed as one subgraph between `lax.optimization_barrier`s. The
    forward pass of `Reversible` calls this too and ignores the residuals, so
    both passes compile the same fenced subgraph and the gradient has the same
    bits in both; only the VJP's backward half, outside the fence, fuses
    freely. One gradient evaluation per reverse step, not two.
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
