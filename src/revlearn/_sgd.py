"""`sgd`: SGD with momentum as a differentiable function of everything it reads.

    v_{t+1} = gamma_t v_t - (1 - gamma_t) grad_w loss_fn(w_t, hypers, t)
    w_{t+1} = w_t + alpha_t v_{t+1},        t = 0 .. steps - 1

How the derivative is computed is a strategy argument (`method=`), as diffrax
does with `adjoint=`: `Reversible()` (exact reversal, O(P) memory),
`Unrolled()` (store every step) or `Checkpointed()` (store every k-th step).
All three compute the same function and the same derivatives.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from . import _schedules
from ._problem import Problem
from ._reversible import Reversible
from ._unrolled import Checkpointed, Unrolled

Method = Reversible | Unrolled | Checkpointed


def _check_params(params0) -> None:
    leaves = jax.tree_util.tree_leaves_with_path(params0)
    if not leaves:
        raise ValueError("params0 has no array leaves: pass a pytree of float arrays.")
    for path, leaf in leaves:
        dt = jnp.result_type(leaf)
        if not jnp.issubdtype(dt, jnp.floating):
            raise ValueError(
                f"params0{jax.tree_util.keystr(path)} has dtype {dt}; every leaf of params0 is "
                "trained, so it must be a float array. Move integer or key leaves into hypers.")


def sgd(loss_fn: Callable, params0: Any, hypers: Any = None, *, lr: Any, momentum: Any,
        steps: int, method: Method | None = None, v0: Any = None,
        path_fn: Callable | None = None):
    """Run `steps` steps of SGD with momentum; differentiable w.r.t. all array inputs.

    Args:
      loss_fn: `loss_fn(params, hypers, step) -> scalar`; `step` is an int32
        array, so the loss picks its minibatch (and any noise) from it.
      params0: pytree of float arrays (float32 or float64), the initial weights.
      hypers: any pytree read by the loss (L2 strengths, data, ...). Float
        leaves get hypergradients; other leaves (keys, ints) are passed along.
      lr, momentum: alpha_t and gamma_t: a scalar, a [steps] array, or a pytree
        prefix of params0 whose leaves are scalars, [steps] schedules,
        per-weight arrays or [steps, *shape] arrays. Momentum is applied as
        round(gamma * 2^16) / 2^16 (its derivative is taken w.r.t. gamma).
      steps: T, a Python int >= 1.
      method: `Reversible()` (default), `Unrolled()` or `Checkpointed()`.
      v0: initial velocity (pytree like params0); zeros if None.
      path_fn: optional `path_fn(params, hypers, step) -> scalar`; if given, the
        sum over t = 0 .. T-1 of path_fn(w_t, hypers, t) (e.g. the area under
        the training curve) is returned too and is differentiable.

    Returns:
      The final parameters w_T (pytree like params0), or (w_T, path_sum) if
      path_fn is given.
    """
    if method is None:
        method = Reversible()
    if not isinstance(method, (Reversible, Unrolled, Checkpointed)):
        raise TypeError(f"method={method!r} is not a revlearn method: use revlearn.Reversible(), "
                        "revlearn.Unrolled() or revlearn.Checkpointed().")
    p = prepare(loss_fn, params0, hypers, lr=lr, momentum=momentum, steps=steps, v0=v0,
                path_fn=path_fn)
    params_T, path = method.solve(p.problem, p.params0, p.v0, p.theta, p.lr, p.momentum)
    return (params_T, path) if path_fn is not None else params_T


class Prepared(NamedTuple):
    """What every method solves: the problem, flat-ready inputs and normalised schedules."""

    problem: Problem
    params0: Any
    v0: Any
    theta: Any
    lr: _schedules.Schedule
    momentum: _schedules.Schedule


def prepare(loss_fn, params0, hypers, *, lr, momentum, steps, v0=None, path_fn=None) -> Prepared:
    """Validate the arguments of `sgd` and build the `Problem` (shared with the checker)."""
    if not callable(loss_fn):
        raise TypeError(f"loss_fn={loss_fn!r} is not callable: pass loss_fn(params, hypers, step).")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r}: steps must be a Python int >= 1 (it fixes the "
                         "length of the compiled loop), e.g. steps=100.")
    _check_params(params0)
    if v0 is None:
        v0 = jax.tree_util.tree_map(jnp.zeros_like, params0)
    elif jax.tree_util.tree_structure(v0) != jax.tree_util.tree_structure(params0) or any(
            jnp.shape(a) != jnp.shape(b) for a, b in zip(jax.tree_util.tree_leaves(v0),
                                                        jax.tree_util.tree_leaves(params0))):
        raise ValueError("v0 must have the same structure and leaf shapes as params0 "
                         f"(got {jax.tree_util.tree_structure(v0)}).")
    lr_s = _schedules.normalise("lr", lr, params0, steps)
    mom_s = _schedules.normalise("momentum", momentum, params0, steps)
    _schedules.check_concrete("lr", lr_s, momentum=False)
    _schedules.check_concrete("momentum", mom_s, momentum=True)

    def objective(params, hypers, step):
        loss = loss_fn(params, hypers, step)
        if jnp.shape(loss) != ():
            raise ValueError(f"loss_fn must return a scalar, got shape {jnp.shape(loss)}.")
        path = path_fn(params, hypers, step) if path_fn is not None else jnp.zeros((), jnp.result_type(float))
        if jnp.shape(path) != ():
            raise ValueError(f"path_fn must return a scalar, got shape {jnp.shape(path)}.")
        return loss, jnp.asarray(path, jnp.result_type(float))

    converted, consts = jax.closure_convert(objective, params0, hypers, jnp.int32(0))
    leaves, treedef = jax.tree_util.tree_flatten(params0)
    problem = Problem(objective=converted, treedef=treedef,
                      shapes=tuple(tuple(jnp.shape(l)) for l in leaves),
                      dtypes=tuple(jnp.result_type(l) for l in leaves),
                      steps=steps)
    v0 = jax.tree_util.tree_map(lambda v, p: jnp.asarray(v, jnp.result_type(p)), v0, params0)
    return Prepared(problem, params0, v0, (hypers, tuple(consts)), lr_s, mom_s)
