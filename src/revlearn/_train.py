"""`train`: an update rule's training loop as a differentiable function of everything it reads.

    w_{t+1}, state_{t+1} = rule step(w_t, state_t, grad_w loss_fn(w_t, hypers, t)),  t = 0 .. T-1

*What* is trained is the `optimizer` (`revlearn.optim.momentum`, `adam`,
`rmsprop_momentum`, or for the storing methods any optax
`GradientTransformation`); *how* its derivative is taken is the `method`
(`Reversible()`: exact reversal, O(P) memory; `Unrolled()`: store every step;
`Checkpointed()`: store every k-th step), chosen independently, as diffrax
separates solver and adjoint. All methods compute the same function and the
same derivatives. Arguments are validated here, once, before any method runs.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from . import _pytrees, _schedules, _sharding
from .exact import _grid
from .methods._reversible import Reversible
from .methods._unrolled import Checkpointed, Unrolled
from .optim import _base
from .optim._momentum import MomentumState, momentum as momentum_rule
from ._problem import Prepared, Problem

Method = Reversible | Unrolled | Checkpointed
METHODS = "revlearn.Reversible(), revlearn.Unrolled() or revlearn.Checkpointed()"
RULES = "revlearn.optim.momentum, revlearn.optim.adam or revlearn.optim.rmsprop_momentum"


def _check_params(params0) -> None:
    leaves = jax.tree_util.tree_leaves_with_path(params0)
    if not leaves:
        raise ValueError("params0 has no array leaves: pass a pytree of float arrays.")
    for path, leaf in leaves:
        dt = jnp.result_type(leaf)
        if not jnp.issubdtype(dt, jnp.floating):
            raise ValueError(
                f"params0{jax.tree_util.keystr(path)} has dtype {dt}; every leaf of params0 is "
                "trained, so it must be a float array. " + (
                    "For a flax.nnx model, train its parameters: graphdef, params, rest = "
                    "nnx.split(model, nnx.Param, ...), and nnx.merge(graphdef, params, rest) "
                    "in loss_fn." if _pytrees.is_nnx(params0) else
                    "Move integer or key leaves into hypers."))


def _check_hypers(hypers) -> None:
    """Every leaf of hypers must be something JAX can trace: an array, a number, a key."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(hypers):
        if isinstance(leaf, (jax.Array, jax.core.Tracer)):
            continue  # JAX's own (typed keys included)
        if isinstance(leaf, (np.ndarray, np.generic, bool, int, float, complex)):
            dt = np.asarray(leaf).dtype
            if dt.kind not in "OSUV":
                continue
            kind = f"{dt.name} array"
        else:
            kind = type(leaf).__name__
        raise TypeError(f"hypers{jax.tree_util.keystr(path)} is a {kind} ({leaf!r:.40}); every "
                        "leaf of hypers must be an array or a number. Keep other values out of "
                        "hypers (close over them in loss_fn).")


def is_optax(opt) -> bool:
    """An optax `GradientTransformation` (duck-typed: optax is not needed to run revlearn)."""
    return (not isinstance(opt, _base.Rule) and callable(getattr(opt, "init", None))
            and callable(getattr(opt, "update", None)))


def train(loss_fn: Callable, params0: Any, hypers: Any = None, *, optimizer, steps: int,
          method: Method | None = None, state0: Any = None, path_fn: Callable | None = None,
          return_state: bool = False):
    """Train `steps` steps of `optimizer`; differentiable w.r.t. every array input.

        g_t = grad_w loss_fn(w_t, hypers, t)
        w_{t+1}, state_{t+1} = optimizer step(w_t, state_t, g_t),   t = 0 .. steps - 1

    Differentiate the result with `jax.grad` (w.r.t. params0, hypers, the optimizer's
    hyperparameters, state0, or anything the loss closes over); `method` decides how that
    derivative is computed, not its value.

    Args:
      loss_fn: `loss_fn(params, hypers, step) -> scalar`; `step` is an int32 array, so the
        loss picks its minibatch (and any noise) from it. It must be a pure function of
        its arguments (the reversal recomputes it).
      params0: the initial weights: a pytree of float arrays (float32 or float64): a dict,
        a list of layers, a Flax `params` dict, an `nnx.State`. An Equinox module may be
        passed as it is: its inexact arrays are trained and its other leaves (functions,
        Python numbers, integer arrays) carried unchanged, the `eqx.filter(...,
        eqx.is_inexact_array)` convention.
      hypers: any pytree read by the loss (L2 strengths, data, ...). Float leaves get
        hypergradients; other leaves (keys, ints) are passed along. In an Equinox module
        the same convention as params0 holds.
      optimizer: an update rule, `revlearn.optim.momentum(lr, momentum)`,
        `revlearn.optim.adam(lr, ...)` or `revlearn.optim.rmsprop_momentum(lr, ...)`, whose
        hyperparameters are differentiable (each a scalar, a [steps] schedule, or a pytree
        prefix of params0 with per-weight or [steps, *shape] leaves); with `Unrolled` or
        `Checkpointed` also any optax `GradientTransformation`.
      steps: T, a Python int >= 1.
      method: `Reversible()` (default), `Unrolled()` or `Checkpointed()`.
      state0: the optimiser state to start from (the rule's `State`, e.g. the one a previous
        call returned with `return_state=True`, or an optax state); the rule's zero state
        (optax: `optimizer.init(params0)`) if None. Its moments are shaped like params0
        (for an Equinox module, like its trained part). Differentiable.
      path_fn: optional `path_fn(params, hypers, step) -> scalar`; if given, the sum over
        t = 0 .. T-1 of path_fn(w_t, hypers, t) (e.g. the area under the training curve)
        is returned too and is differentiable.
      return_state: also return the final optimiser state.

    Returns:
      w_T, a pytree like params0 (an Equinox module comes back as a module of the same
      type); with `return_state`, (w_T, state_T); with `path_fn`, (w_T, path_sum); with
      both, (w_T, state_T, path_sum).

    Raises:
      ValueError: a bad argument (a non-float params0 leaf, a hyperparameter of the wrong
        shape or off its grid, a state0 of the wrong structure, steps < 1), before
        anything runs, in one line naming the argument and the fix.
      TypeError: an argument of the wrong kind (a method or optimizer that is not one, a
        hypers leaf that is not an array or number, an optax transform with
        `Reversible()`).
      ReversibleError: a fault while training or reversing (non-finite gradient,
        fixed-point overflow, exhausted buffer, decay off its grid, drift), naming the step;
        under `jax.jit` it arrives as a `JaxRuntimeError` carrying the message.

    Example:
        ```python
        import jax
        jax.config.update("jax_enable_x64", True)
        import revlearn

        def validation_loss(lr, hypers):
            w_T = revlearn.train(loss_fn, params0, hypers, steps=100,
                                 optimizer=revlearn.optim.adam(lr))
            return meta_fn(w_T)

        d_lr, d_hypers = jax.grad(validation_loss, argnums=(0, 1))(1e-3, hypers)
        ```
    """
    method = Reversible() if method is None else method
    if not isinstance(method, (Reversible, Unrolled, Checkpointed)):
        raise TypeError(f"method={method!r} is not a revlearn method: use {METHODS}.")
    if not isinstance(return_state, bool):
        raise TypeError(f"return_state={return_state!r} is not a bool: pass True or False.")
    params0, hypers, carried = _pytrees.split(params0, hypers)
    if carried is not None:
        # an Equinox module: train its inexact arrays, carry the rest around loss_fn and w_T
        out = train(carried.wrap(loss_fn), params0, hypers, optimizer=optimizer, steps=steps,
                    method=method, state0=state0, path_fn=carried.wrap(path_fn),
                    return_state=return_state)
        if not return_state and path_fn is None:
            return carried.rebuild(out)
        return (carried.rebuild(out[0]),) + out[1:]
    if is_optax(optimizer) and isinstance(method, Reversible):
        raise TypeError(
            f"optimizer={optimizer!r} is an optax GradientTransformation, which Reversible() "
            f"cannot reverse exactly. Use a reversible rule ({RULES}), or method="
            "revlearn.Unrolled() / revlearn.Checkpointed(), which store the trajectory.")
    if isinstance(method, Reversible) and isinstance(optimizer, _base.Rule):
        mesh = _sharding.mesh_of(params0, hypers)
        if mesh is not None and _sharding.explicit(mesh):
            # The fixed-point core packs and reshapes the state freely: it runs with the
            # mesh's axes auto (XLA places it, `_sharding.placer`), and hands back w_T and
            # the state with params0's shardings.
            # (the rule's concrete numbers stay static: they size the buffers)
            leaves, tdef = jax.tree_util.tree_flatten(optimizer)
            dyn = [i for i, l in enumerate(leaves) if isinstance(l, jax.Array)]

            def inner(params0, hypers, dynamic, state0):
                full = list(leaves)
                for i, v in zip(dyn, dynamic):
                    full[i] = v
                return train(loss_fn, params0, hypers, optimizer=tdef.unflatten(full),
                             steps=steps, method=method, state0=state0, path_fn=path_fn,
                             return_state=return_state)
            out = _sharding.auto_out_shardings(mesh, params0, optimizer, return_state,
                                               path_fn is not None)
            return jax.sharding.auto_axes(inner, out_sharding=out)(
                params0, hypers, [leaves[i] for i in dyn], state0)
    p = prepare(loss_fn, params0, hypers, optimizer=optimizer, steps=steps, state0=state0,
                path_fn=path_fn)
    params_T, state_T, path = method.solve(p)
    out = (params_T,) + ((state_T,) if return_state else ()) + ((path,) if path_fn else ())
    return out[0] if len(out) == 1 else out


def sgd(loss_fn: Callable, params0: Any, hypers: Any = None, *, lr: Any, momentum: Any,
        steps: int, method: Method | None = None, v0: Any = None,
        path_fn: Callable | None = None):
    """SGD with momentum (the paper's rule): `train(..., optimizer=optim.momentum(lr, momentum))`.

        v_{t+1} = gamma_t v_t - (1 - gamma_t) grad_w loss_fn(w_t, hypers, t)
        w_{t+1} = w_t + alpha_t v_{t+1}

    Args:
      loss_fn: `loss_fn(params, hypers, step) -> scalar`, as for `train`.
      params0: the initial weights, as for `train`.
      hypers: any pytree read by the loss, as for `train`.
      lr: alpha, the learning rate: a scalar, a [steps] schedule, or a pytree prefix of
        params0 with per-weight or [steps, *shape] leaves.
      momentum: gamma in (0, 1), the same shapes; applied as round(gamma 2^16) / 2^16.
      steps: T, a Python int >= 1.
      method: `Reversible()` (default), `Unrolled()` or `Checkpointed()`.
      v0: the initial velocity, shaped like params0 (zeros if None).
      path_fn: optional per-step term, as for `train`.

    Returns:
      w_T, or (w_T, path_sum) if path_fn is given.

    Raises:
      ValueError, TypeError, ReversibleError: as `train`.

    Example:
        ```python
        w_T = revlearn.sgd(loss_fn, params0, hypers, lr=jnp.full(100, 0.1),
                           momentum=0.9, steps=100)
        ```
    """
    state0 = None if v0 is None else MomentumState(v0)
    return train(loss_fn, params0, hypers, optimizer=momentum_rule(lr, momentum), steps=steps,
                 method=method, state0=state0, path_fn=path_fn)


def _check_state0(rule: _base.Rule, state0, params0) -> dict:
    fields = ((("count",) if rule.counted else ()) + tuple(m.name for m in rule.moments))
    if state0 is None:
        return dict(rule.init(params0)._asdict())
    if not (isinstance(state0, tuple) and hasattr(state0, "_fields")
            and tuple(state0._fields) == tuple(rule.State._fields)):
        raise ValueError(f"state0 must be a {rule.State.__name__}{fields} for "
                         f"revlearn.optim.{rule.name} (got {type(state0).__name__}); start "
                         f"from optimizer.init(params0) or a state returned by train(..., "
                         "return_state=True).")
    out = {}
    for m in rule.moments:
        x = getattr(state0, m.name)
        if jax.tree_util.tree_structure(x) != jax.tree_util.tree_structure(params0) or any(
                jnp.shape(a) != jnp.shape(b) for a, b in zip(jax.tree_util.tree_leaves(x),
                                                            jax.tree_util.tree_leaves(params0))):
            what = "v0" if rule.name == "momentum" and m.name == "v" else f"state0.{m.name}"
            raise ValueError(f"{what} must have the same structure and leaf shapes as params0 "
                             f"(got {jax.tree_util.tree_structure(x)})" + (
                                 "; for an Equinox module, like its trained part: start from "
                                 "optimizer.init(params0), eqx.filter(params0, "
                                 "eqx.is_inexact_array) or a state returned by train(..., "
                                 "return_state=True)." if _pytrees.has_module(params0) else "."))
        out[m.name] = jax.tree_util.tree_map(lambda a, p: jnp.asarray(a, jnp.result_type(p)),
                                             x, params0)
    if rule.counted:
        c = state0.count
        if jnp.shape(c) != () or not jnp.issubdtype(jnp.result_type(c), jnp.integer):
            raise ValueError(f"state0.count must be an integer scalar (steps already taken), "
                             f"got {c!r}.")
        if not isinstance(c, jax.core.Tracer) and int(c) < 0:
            raise ValueError(f"state0.count={int(c)} must be >= 0.")
        out["count"] = jnp.asarray(c, jnp.int32)
    return out


def _check_hyper(name: str, kind: str, schedule: _schedules.Schedule) -> None:
    """Reject bad hyperparameter values now when they are known (not traced)."""
    for a in _schedules.entries(schedule):
        if isinstance(a, jax.core.Tracer):
            continue
        a = np.asarray(a, np.float64)
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name} contains non-finite values ({a[~np.isfinite(a)][:3]} ...). "
                             f"Pass finite {name} values.")
        if kind == _base.POSITIVE and np.any(a <= 0):
            raise ValueError(f"{name} must be > 0, got {a[a <= 0].ravel()[:3].tolist()}. "
                             f"Pass a positive {name} (e.g. 1e-8).")
        if kind == _base.NONNEGATIVE and np.any(a < 0):
            raise ValueError(f"{name} must be >= 0, got {a[a < 0].ravel()[:3].tolist()}. "
                             f"Pass {name} >= 0 (0 turns it off).")


def _check_decay(dec: _base.Decay, schedule: _schedules.Schedule) -> None:
    for a in _schedules.entries(schedule):
        if isinstance(a, jax.core.Tracer):
            continue
        bad = _grid.off_grid(a, dec.grid, dec.allow_one)
        if np.any(bad):
            vals = np.asarray(a, np.float64)[bad].ravel()[:3].tolist()
            g = dec.grid
            if dec.name == "momentum" and g == _grid.MOMENTUM:
                raise ValueError(
                    f"momentum must lie strictly inside (0, 1) (it is applied as n/65536 with "
                    f"2 <= n <= 65535), got {vals}. Use e.g. 0.9, or a logit "
                    "parameterisation to keep it inside.")
            raise ValueError(
                f"{dec.describe} must lie inside (0, 1) on its grid (it is applied as "
                f"n/2^{g.bits} with {g.min_numerator} <= n <= {g.max_numerator}, i.e. in "
                f"[{g.smallest():.6g}, {g.largest():.10g}]), got {vals}. "
                + ("Lower lr * weight_decay." if len(dec.reads) > 1 else
                   f"Use a value inside that range, or a logit parameterisation of {dec.name}."))


def prepare(loss_fn, params0, hypers=None, *, optimizer=None, steps, state0=None, path_fn=None,
            lr=None, momentum=None, v0=None) -> Prepared:
    """Validate the arguments of `train` and build the `Problem` (shared with the checkers).
    `lr`, `momentum`, `v0`: `sgd`'s spelling of optimizer=optim.momentum(lr, momentum) and
    state0=MomentumState(v0)."""
    if optimizer is None:
        if lr is None and momentum is None:
            raise ValueError(f"optimizer is required: pass e.g. optimizer=revlearn.optim."
                             f"adam(1e-3) ({RULES}).")
        optimizer = momentum_rule(lr, momentum)
        state0 = state0 if v0 is None else MomentumState(v0)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn={loss_fn!r} is not callable: pass loss_fn(params, hypers, step).")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r}: steps must be a Python int >= 1 (it fixes the "
                         "length of the compiled loop), e.g. steps=100.")
    if not isinstance(optimizer, _base.Rule) and not is_optax(optimizer):
        raise TypeError(f"optimizer={optimizer!r} is not an update rule: use {RULES} (or, with "
                        "Unrolled/Checkpointed, an optax GradientTransformation).")
    params0, hypers, carried = _pytrees.split(params0, hypers)
    if carried is not None:  # an Equinox module (the checkers come here directly)
        loss_fn, path_fn = carried.wrap(loss_fn), carried.wrap(path_fn)
    _check_params(params0)
    _check_hypers(hypers)

    if isinstance(optimizer, _base.Rule):
        rule = optimizer
        state = _check_state0(rule, state0, params0)
        hyp = {}
        for name, kind in rule.hyper_kinds.items():
            hyp[name] = _schedules.normalise(name, getattr(rule, name), params0, steps)
            _check_hyper(name, kind, hyp[name])
        dec = {}
        for d in rule.decays():
            dec[d.name] = _schedules.combine(d.value, hyp, d.reads)
            _check_decay(d, dec[d.name])
    else:
        state = optimizer.init(params0) if state0 is None else state0
        hyp = dec = None

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
    mesh = _sharding.mesh_of(params0, hypers)
    return Prepared(problem, optimizer, params0, state, (hypers, tuple(consts)), hyp, dec, mesh)
