"""Exact reversal of SGD with momentum (Maclaurin et al. 2015, Algorithms 1-3).

State: W, V [P] int64 fixed point (see `_fixed_point`), plus the rANS buffer
(`_rans`). Forward step t (g_t = grad_w L(w_t, theta, t), gamma_t = n_t / 2^16):

    V <- V * gamma_t                      (exact, remainder bits pushed to the buffer)
    V <- V - Q((1 - gamma_t) g_t)
    W <- W + Q(alpha_t v_{t+1})

Reverse step t, from (W_{t+1}, V_{t+1}) and adjoints dw, dv (d_theta accumulated):

    d_alpha_t = dw * v_{t+1}
    W <- W - Q(alpha_t v_{t+1})           (= W_t exactly)
    g_t = grad_w L(w_t, theta, t)         (recomputed, bit-identical)
    V <- (V + Q((1 - gamma_t) g_t)) / gamma_t   (= V_t exactly, bits popped from the buffer)
    dv += alpha_t dw
    d_gamma_t = dv * (v_t + g_t)
    (dw, d_theta) += VJP of (w, theta) -> grad_w L(w, theta, t) at cotangent -(1 - gamma_t) dv
    dv *= gamma_t

A per-step meta-objective term l(w_t) adds its gradient in the same VJP. At the
end the recovered W_0, V_0 and buffer must equal the initial ones bit-for-bit;
anything else raises `ReversibleError` rather than return a wrong gradient.
Memory: O(P) plus the buffer, about log2(1/gamma) bits per weight per step.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import _faults, _fixed_point as fp, _rans, _schedules
from ._problem import Problem, merge, split_inexact


class Forward(NamedTuple):
    """End of the forward pass: final W, V [P] int64, buffer, path term, fault, and W_0, V_0."""

    W: jax.Array
    V: jax.Array
    buffer: _rans.Buffer
    path: jax.Array
    fault: _faults.Fault
    W0: jax.Array
    V0: jax.Array


class Backward(NamedTuple):
    """Adjoints d(w0), d(v0) [P], d(theta_f), d(lr), d(momentum), and the recovered state."""

    dw: jax.Array
    dv: jax.Array
    dtheta: object
    dlr: _schedules.Schedule
    dmomentum: _schedules.Schedule
    W: jax.Array
    V: jax.Array
    buffer: _rans.Buffer
    fault: _faults.Fault


def require_x64(where: str) -> None:
    if jnp.zeros((), jnp.int64).dtype != jnp.int64:
        raise RuntimeError(
            f"{where} needs 64-bit integers for its fixed-point state, but JAX's 64-bit mode is "
            "off. Call jax.config.update('jax_enable_x64', True) once at the start of your "
            "program, before creating arrays (models may still compute in float32), or use "
            "revlearn.Unrolled().")


def _row(schedule: _schedules.Schedule, shapes):
    def row(constant, slices):
        return _schedules.flat(_schedules.Schedule(constant, schedule.stepwise), slices, shapes)
    return row


def _tables(momentum: _schedules.Schedule) -> _schedules.Schedule:
    """Per schedule entry, the coding table of U[0, n) with n = round(gamma 2^16) in [1, 65535].

    Built once per call on the schedule's own shapes (usually a scalar per layer),
    not per weight and step. Out-of-range values are clipped here and reported
    by `_schedule_faults`."""
    def table(a):
        return None if a is None else _rans.uniform(jnp.clip(_schedules.numerators(a), 1, 65535))
    return _schedules.Schedule(tuple(table(c) for c in momentum.constant),
                               tuple(table(s) for s in momentum.stepwise))


def _first_bad_step(schedule: _schedules.Schedule, bad_fn, steps: int):
    """(any entry bad, first step with a bad entry) over a schedule's arrays."""
    first = jnp.int32(steps)
    for c in schedule.constant:
        if c is not None:
            first = jnp.where(jnp.any(bad_fn(c)), 0, first)
    for s in schedule.stepwise:
        if s is not None:
            per_step = jnp.any(bad_fn(s).reshape(steps, -1), axis=1)
            first = jnp.minimum(first, jnp.where(jnp.any(per_step), jnp.argmax(per_step), steps))
    return first < steps, first


def _schedule_faults(fault, lr, momentum, steps):
    def bad_n(a):
        n = _schedules.numerators(a)
        return (n < 1) | (n > 65535)
    bad, step = _first_bad_step(momentum, bad_n, steps)
    fault = fault.record(bad, _faults.MOMENTUM_RANGE, step)
    bad, step = _first_bad_step(lr, lambda a: ~jnp.isfinite(a), steps)
    return fault.record(bad, _faults.NONFINITE_LR, step)


def _uniform_row(tables: _schedules.Schedule, slices, shapes) -> _rans.Uniform:
    """The flat [P] coding tables at one step."""
    parts = []
    for c, s, shape in zip(tables.constant, slices, shapes):
        u = c if c is not None else s
        parts.append([jnp.broadcast_to(a, shape).ravel() for a in u])
    return _rans.Uniform(*(jnp.concatenate(col) for col in zip(*parts)))


def _step_hypers(problem, lr, tables, lr_slices, table_slices):
    alpha = _row(lr, problem.shapes)(lr.constant, lr_slices)
    u = _uniform_row(tables, table_slices, problem.shapes)
    return alpha, u, u.n.astype(jnp.float64) / 65536.0


def _xs(problem, lr, momentum, tables):
    return (jnp.arange(problem.steps, dtype=jnp.int32), _schedules.step_slices(lr),
            _schedules.step_slices(momentum), _schedules.step_slices(tables))


def forward(problem: Problem, method: "Reversible", capacity: int, w0, v0, theta, lr, momentum) -> Forward:
    """Train `problem.steps` steps in fixed point from flat float w0, v0 [P]."""
    k = method.frac_bits
    W0, bad_w = fp.quantize(w0, k)
    V0, bad_v = fp.quantize(v0, k)
    fault = _faults.Fault.none()
    fault = fault.record(bad_w, _faults.WEIGHT_OVERFLOW, 0)
    fault = fault.record(bad_v, _faults.VELOCITY_OVERFLOW, 0)
    fault = _schedule_faults(fault, lr, momentum, problem.steps)
    tables = _tables(momentum)

    def step(carry, xs):
        W, V, buf, path, fault = carry
        t, lr_sl, _, table_sl = xs
        alpha, u, gq = _step_hypers(problem, lr, tables, lr_sl, table_sl)
        grad_fn = problem.isolated_gradient if method.isolate_gradient else problem.gradient
        g_tree, path_t = grad_fn(problem.unflatten(fp.to_float(W, k)), theta, t)
        g = problem.flatten(g_tree)
        fault = fault.record(~jnp.all(jnp.isfinite(g)), _faults.NONFINITE_GRADIENT, t)
        V, buf, flags = _rans.multiply_by_gamma(V, u, buf)
        fault = fault.record(flags.overflow, _faults.BUFFER_EXHAUSTED, t)
        fault = fault.record(flags.underflow, _faults.BUFFER_UNDERFLOW, t)
        dV, bad = fp.quantize((1.0 - gq) * g, k)
        V = V - dV
        fault = fault.record(bad | fp.out_of_range(V), _faults.VELOCITY_OVERFLOW, t)
        dW, bad = fp.quantize(alpha * fp.to_float(V, k), k)
        fault = fault.record(bad, _faults.VELOCITY_OVERFLOW, t)
        W = W + dW
        fault = fault.record(fp.out_of_range(W), _faults.WEIGHT_OVERFLOW, t)
        return (W, V, buf, path + path_t, fault), None

    init = (W0, V0, _rans.empty(W0.shape[0], capacity), jnp.zeros((), jnp.float64), fault)
    (W, V, buf, path, fault), _ = jax.lax.scan(step, init, _xs(problem, lr, momentum, tables))
    return Forward(W, V, buf, path, fault, W0, V0)


def backward(problem: Problem, method: "Reversible", fw: Forward, theta_f, theta_o, lr, momentum,
             ct_w, ct_path) -> Backward:
    """Run the training backwards from `fw`, accumulating the hypergradients."""
    k = method.frac_bits
    row_lr, row_mom = _row(lr, problem.shapes), _row(momentum, problem.shapes)
    zeros = lambda tree: jax.tree_util.tree_map(jnp.zeros_like, tree)
    tables = _tables(momentum)

    def step(carry, xs):
        W, V, buf, dw, dv, dth, dlr_c, dmom_c, fault = carry
        t, lr_sl, mom_sl, table_sl = xs
        alpha, u, gq = _step_hypers(problem, lr, tables, lr_sl, table_sl)
        v_next = fp.to_float(V, k)
        d_alpha = dw * v_next
        dW, _ = fp.quantize(alpha * v_next, k)
        W = W - dW

        def grad_at(p, thf):
            return problem.gradient(p, merge(thf, theta_o), t)

        params = problem.unflatten(fp.to_float(W, k))
        if method.isolate_gradient:
            # the reversal uses the fenced gradient (bit-identical to the forward
            # pass); the VJP (Hessian-vector product) may fuse freely
            g_tree, path_t = problem.isolated_gradient(params, merge(theta_f, theta_o), t)
            _, vjp = jax.vjp(grad_at, params, theta_f)
        else:
            (g_tree, path_t), vjp = jax.vjp(grad_at, params, theta_f)
        g = problem.flatten(g_tree)
        dV, _ = fp.quantize((1.0 - gq) * g, k)
        V, buf, flags = _rans.divide_by_gamma(V + dV, u, buf)
        fault = fault.record(flags.underflow | flags.overflow, _faults.BUFFER_UNDERFLOW, t)
        dv = dv + alpha * dw
        d_gamma = dv * (fp.to_float(V, k) + g)
        ct_g = problem.unflatten(-(1.0 - gq) * dv)
        hw, hth = vjp((ct_g, jnp.asarray(ct_path, path_t.dtype)))
        dw = dw + problem.flatten(hw)
        dth = jax.tree_util.tree_map(lambda a, b: a + b.astype(a.dtype), dth, hth)
        fault = fault.record(~jnp.all(jnp.isfinite(dw)), _faults.NONFINITE_COTANGENT, t)
        dv = dv * gq
        dlr_c_t, dlr_s_t = jax.vjp(row_lr, lr.constant, lr_sl)[1](d_alpha)
        dmom_c_t, dmom_s_t = jax.vjp(row_mom, momentum.constant, mom_sl)[1](d_gamma)
        add = lambda a, b: jax.tree_util.tree_map(jnp.add, a, b)
        carry = (W, V, buf, dw, dv, dth, add(dlr_c, dlr_c_t), add(dmom_c, dmom_c_t), fault)
        return carry, (dlr_s_t, dmom_s_t)

    init = (fw.W, fw.V, fw.buffer, jnp.asarray(ct_w, jnp.float64), jnp.zeros_like(ct_w, jnp.float64),
            zeros(theta_f), zeros(lr.constant), zeros(momentum.constant), _faults.Fault.none())
    carry, (dlr_s, dmom_s) = jax.lax.scan(step, init, _xs(problem, lr, momentum, tables),
                                          reverse=True)
    W, V, buf, dw, dv, dth, dlr_c, dmom_c, fault = carry
    exact = jnp.all(W == fw.W0) & jnp.all(V == fw.V0) & _rans.is_empty(buf)
    fault = fault.record(~exact, _faults.REVERSAL_DRIFT, 0)
    return Backward(dw, dv, dth, _schedules.Schedule(dlr_c, dlr_s),
                    _schedules.Schedule(dmom_c, dmom_s), W, V, buf, fault)


@dataclasses.dataclass(frozen=True)
class Reversible:
    """Exact reversal in fixed point with an rANS information buffer.

    Args:
      frac_bits: fractional bits k of the fixed-point state; values must stay
        within |x| < 2^(62 - k) (1024 for the default 52).
      min_momentum: a lower bound on every momentum value, used to size the
        buffer when momentum is traced (under `jax.grad` w.r.t. momentum, or
        `jax.jit` with momentum as an argument). When momentum is a concrete
        array the size is derived from its values and this may be None.
      extra_words: slack 32-bit words per weight on top of the bound.
      isolate_gradient: compute grad_w L in both passes as the same fenced
        subgraph (`lax.optimization_barrier`), so the compiler cannot fuse it
        differently backwards (e.g. contract a*b + c into an FMA in one pass
        only), which would break the reversal. Costs one more gradient per
        reverse step. With False the backward pass takes the gradient from the
        Hessian-vector product's own forward pass: faster, and exact on the
        shipped MLP and convnet models, but an elementwise loss may then drift;
        drift is always detected and raised, never returned.

    Memory: W, V (16 bytes per weight) plus about
    ceil(sum_t log2(1/gamma_t) / 32) + extra_words words per weight.
    """

    frac_bits: int = 52
    min_momentum: float | None = None
    extra_words: int = 4
    isolate_gradient: bool = True

    def __post_init__(self):
        if not isinstance(self.frac_bits, int) or not 8 <= self.frac_bits <= 60:
            raise ValueError(f"Reversible(frac_bits={self.frac_bits!r}): frac_bits must be an "
                             "integer in [8, 60] (52 gives range |x| < 1024 and step 2^-52).")
        if self.min_momentum is not None and not (0 < float(self.min_momentum) < 1):
            raise ValueError(f"Reversible(min_momentum={self.min_momentum!r}): must lie in (0, 1).")
        if not isinstance(self.extra_words, int) or self.extra_words < 2:
            raise ValueError(f"Reversible(extra_words={self.extra_words!r}): must be an integer >= 2.")

    def capacity(self, momentum: _schedules.Schedule, steps: int) -> int:
        """Static buffer capacity, in 32-bit words per weight."""
        if self.min_momentum is not None:
            n = max(1, round(float(self.min_momentum) * 65536))
            bits = steps * math.log2(65536 / n)
        elif _schedules.is_concrete(momentum):
            n_min = np.full((steps,), 65535.0)
            for c, s in zip(momentum.constant, momentum.stepwise):
                if c is not None:
                    n_min = np.minimum(n_min, np.min(np.round(np.asarray(c, np.float64) * 65536)))
                if s is not None:
                    a = np.round(np.asarray(s, np.float64) * 65536).reshape(steps, -1)
                    n_min = np.minimum(n_min, a.min(axis=1))
            bits = float(np.sum(np.log2(65536 / np.clip(n_min, 1, 65535))))
        else:
            raise ValueError(
                "Reversible() cannot size its information buffer: momentum is traced (under "
                "jax.grad/jax.jit/jax.vmap), so its values are unknown when the program is "
                "built. Pass a lower bound on every momentum value, e.g. "
                "revlearn.Reversible(min_momentum=0.5).")
        return int(math.ceil(bits / 32)) + self.extra_words

    def solve(self, problem: Problem, params0, v0, theta, lr, momentum):
        require_x64("revlearn.Reversible")
        capacity = self.capacity(momentum, problem.steps)
        theta_f, theta_o = split_inexact(theta)
        where = "revlearn.sgd(method=Reversible())"
        info = dict(frac_bits=self.frac_bits, capacity=capacity,
                    min_momentum=self.min_momentum if self.min_momentum is not None else "its values")

        @jax.custom_vjp
        def run(w0, v0, theta_f, theta_o, lr, momentum):
            fw = forward(problem, self, capacity, w0, v0, merge(theta_f, theta_o), lr, momentum)
            _faults.raise_if_fault(fw.fault, where, **info)
            return fp.to_float(fw.W, self.frac_bits), fw.path

        def run_fwd(w0, v0, theta_f, theta_o, lr, momentum):
            fw = forward(problem, self, capacity, w0, v0, merge(theta_f, theta_o), lr, momentum)
            _faults.raise_if_fault(fw.fault, where, **info)
            out = (fp.to_float(fw.W, self.frac_bits), fw.path)
            return out, (fw, theta_f, theta_o, lr, momentum)

        def run_bwd(res, cts):
            fw, theta_f, theta_o, lr, momentum = res
            ct_w, ct_path = cts
            bw = backward(problem, self, fw, theta_f, theta_o, lr, momentum, ct_w, ct_path)
            _faults.raise_if_fault(bw.fault, where + " (reverse pass)", **info)
            d_o = jax.tree_util.tree_map(
                lambda x: np.zeros(np.shape(x), jax.dtypes.float0), theta_o)
            return bw.dw, bw.dv, bw.dtheta, d_o, bw.dlr, bw.dmomentum

        run.defvjp(run_fwd, run_bwd)
        wT, path = run(problem.flatten(params0), problem.flatten(v0), theta_f, theta_o, lr, momentum)
        return problem.unflatten(wT), path
