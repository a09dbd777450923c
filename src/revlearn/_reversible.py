"""Exact reversal of SGD with momentum (Maclaurin et al. 2015, Algorithms 1-3).

State, per params leaf (shape S): W, V [*S] int64 fixed point (see
`_fixed_point`) and an information buffer (`_buffer`). Forward step t
(g_t = grad_w L(w_t, theta, t), gamma_t = n_t / 2^16, Q(x) = round(x 2^k)):

    V <- V * gamma_t                      (exact: the lost bits go to the buffer)
    V <- V - Q((1 - gamma_t) g_t)
    W <- W + round(alpha_t V)             (= Q(alpha_t v_{t+1}))

Reverse step t, from (W_{t+1}, V_{t+1}) and adjoints dw, dv (d_theta accumulated):

    d_alpha_t = dw * v_{t+1}
    W <- W - round(alpha_t V)             (= W_t exactly)
    g_t = grad_w L(w_t, theta, t)         (recomputed, bit-identical)
    V <- (V + Q((1 - gamma_t) g_t)) / gamma_t   (= V_t exactly, bits from the buffer)
    dv += alpha_t dw
    d_gamma_t = dv * (v_t + g_t)
    (dw, d_theta) += VJP of (w, theta) -> grad_w L(w, theta, t) at cotangent -(1 - gamma_t) dv
    dv *= gamma_t

A per-step meta-objective term l(w_t) adds its gradient in the same VJP. At the
end the recovered W_0, V_0 and buffers must equal the initial ones bit-for-bit;
anything else raises `ReversibleError` rather than return a wrong gradient.
Memory: O(P) plus the buffer, about log2(1/gamma) bits per weight per step.

The state stays a list of per-leaf arrays (no flat concatenation), and each
step folds its checks into one bitwise-or reduction per leaf.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import _buffer, _faults, _fixed_point as fp, _schedules
from ._problem import Problem, linearized_gradient, merge, split_inexact


class Forward(NamedTuple):
    """End of the forward pass (lists over params leaves)."""

    W: list
    V: list
    buffers: list
    path: jax.Array
    fault: _faults.Fault
    W0: list
    V0: list
    coding: _schedules.Schedule      # of `_buffer.Coding`, shaped like the momentum schedule


class Backward(NamedTuple):
    """Adjoints d(w0), d(v0) (lists, float64), d(theta_f), d(lr), d(momentum), recovered state."""

    dw: list
    dv: list
    dtheta: object
    dlr: _schedules.Schedule
    dmomentum: _schedules.Schedule
    W: list
    V: list
    buffers: list
    fault: _faults.Fault


def require_x64(where: str) -> None:
    if jnp.zeros((), jnp.int64).dtype != jnp.int64:
        raise RuntimeError(
            f"{where} needs 64-bit integers for its fixed-point state, but JAX's 64-bit mode is "
            "off. Call jax.config.update('jax_enable_x64', True) once at the start of your "
            "program, before creating arrays (models may still compute in float32), or use "
            "revlearn.Unrolled().")


def _coding(momentum: _schedules.Schedule) -> _schedules.Schedule:
    """The buffer's tables per schedule entry (not per weight and step). Out-of-range
    momentum is clipped here and reported by `_schedule_faults`."""
    def table(a):
        return None if a is None else _buffer.coding(_schedules.numerators(a))
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
        return (n < _buffer.MIN_NUMERATOR) | (n > 65535)
    bad, step = _first_bad_step(momentum, bad_n, steps)
    fault = fault.record(bad, _faults.MOMENTUM_RANGE, step)
    bad, step = _first_bad_step(lr, lambda a: ~jnp.isfinite(a), steps)
    return fault.record(bad, _faults.NONFINITE_LR, step)


def _at_step(schedule: _schedules.Schedule, slices) -> list:
    """Per leaf, the schedule's entry at this step (shape B_i, broadcastable to the leaf)."""
    return [c if c is not None else s for c, s in zip(schedule.constant, slices)]


def _sum_to(x: jax.Array, shape: tuple) -> jax.Array:
    """Sum x [*S] down to `shape` (broadcastable to S): the adjoint of broadcasting."""
    lead = x.ndim - len(shape)
    x = jnp.sum(x, axis=tuple(range(lead))) if lead else x
    ones = tuple(i for i, (a, b) in enumerate(zip(shape, x.shape)) if a == 1 and b != 1)
    return jnp.sum(x, axis=ones, keepdims=True) if ones else x


def _any_bits(*conds) -> jax.Array:
    """One pass over a leaf: bit j of the int32 result is set iff any(conds[j])."""
    code = sum(c.astype(jnp.int32) << j for j, c in enumerate(conds))
    return jax.lax.reduce(code, np.int32(0), jax.lax.bitwise_or, tuple(range(code.ndim)))


def _dv(g, gq, k):
    """Q((1 - gamma) g) [*S] int64 and the float it rounds (for range checks)."""
    y = (1.0 - gq) * g.astype(jnp.float64) * (2.0 ** k)
    ok = jnp.abs(y) < fp.INT_LIMIT
    return jnp.round(jnp.where(ok, y, 0.0)).astype(jnp.int64), ok


def _dw(alpha, V):
    """round(alpha V) = Q(alpha v) [*S] int64 (V int64 fixed point; scaling by 2^+-k is exact)."""
    y = alpha.astype(jnp.float64) * V.astype(jnp.float64)
    ok = jnp.abs(y) < fp.INT_LIMIT
    return jnp.round(jnp.where(ok, y, 0.0)).astype(jnp.int64), ok


def _params(problem: Problem, W: list, k: int):
    return problem.treedef.unflatten([fp.to_float(w, k).astype(dt)
                                      for w, dt in zip(W, problem.dtypes)])


def _xs(problem, lr, coding):
    return (jnp.arange(problem.steps, dtype=jnp.int32), lr.stepwise, coding.stepwise)


def _entry_shapes(momentum: _schedules.Schedule) -> list:
    return [np.shape(c) if c is not None else np.shape(s)[1:]
            for c, s in zip(momentum.constant, momentum.stepwise)]


def forward(problem: Problem, method: "Reversible", capacity: tuple, w0: list, v0: list, theta,
            lr, momentum) -> Forward:
    """Train `problem.steps` steps in fixed point from the float leaves w0, v0."""
    k = method.frac_bits
    fault = _faults.Fault.none()
    W0, V0 = [], []
    for w, v in zip(w0, v0):
        Wq, bad_w = fp.quantize(w, k)
        Vq, bad_v = fp.quantize(v, k)
        fault = fault.record(bad_w, _faults.WEIGHT_OVERFLOW, 0)
        fault = fault.record(bad_v, _faults.VELOCITY_OVERFLOW, 0)
        W0.append(Wq)
        V0.append(Vq)
    fault = _schedule_faults(fault, lr, momentum, problem.steps)
    coding = _coding(momentum)
    theta_f, theta_o = split_inexact(theta)

    def grad_fn(params, t):
        if method.isolate_gradient:
            return linearized_gradient(problem, params, theta_f, theta_o, t)[0]
        return problem.gradient(params, theta, t)

    def step(carry, xs):
        W, V, bufs, path, fault = carry
        t, lr_sl, code_sl = xs
        g_tree, path_t = grad_fn(_params(problem, W, k), t)
        bits = jnp.int32(0)
        W_new, V_new, bufs_new = [], [], []
        for Wi, Vi, bi, gi, alpha, c in zip(W, V, bufs, jax.tree_util.tree_leaves(g_tree),
                                            _at_step(lr, lr_sl), _at_step(coding, code_sl)):
            Vi, bi, full = _buffer.multiply(Vi, c, bi)
            dV, ok_v = _dv(gi, c.n.astype(jnp.float64) / 65536.0, k)
            Vi = Vi - dV
            dW, ok_w = _dw(alpha, Vi)
            Wi = Wi + dW
            bits |= _any_bits(~jnp.isfinite(gi), ~ok_v | ~ok_w | fp.out_of_range_mask(Vi),
                              fp.out_of_range_mask(Wi)) | (full.astype(jnp.int32) << 3)
            W_new.append(Wi)
            V_new.append(Vi)
            bufs_new.append(bi)
        for bit, code in ((0, _faults.NONFINITE_GRADIENT), (3, _faults.BUFFER_EXHAUSTED),
                          (1, _faults.VELOCITY_OVERFLOW), (2, _faults.WEIGHT_OVERFLOW)):
            fault = fault.record((bits >> bit) & 1 == 1, code, t)
        return (W_new, V_new, bufs_new, path + path_t, fault), None

    bufs = [_buffer.empty(shape, entry, cap)
            for shape, entry, cap in zip(problem.shapes, _entry_shapes(momentum), capacity)]
    init = (W0, V0, bufs, jnp.zeros((), jnp.float64), fault)
    (W, V, bufs, path, fault), _ = jax.lax.scan(step, init, _xs(problem, lr, coding))
    return Forward(W, V, bufs, path, fault, W0, V0, coding)


def backward(problem: Problem, method: "Reversible", fw: Forward, theta_f, theta_o, lr, momentum,
             ct_w: list, ct_path) -> Backward:
    """Run the training backwards from `fw`, accumulating the hypergradients."""
    k = method.frac_bits
    zeros = lambda tree: jax.tree_util.tree_map(jnp.zeros_like, tree)
    lr_shapes = [np.shape(c) if c is not None else np.shape(s)[1:]
                 for c, s in zip(lr.constant, lr.stepwise)]
    mom_shapes = _entry_shapes(momentum)

    def grad_at(t):
        return lambda p, thf: problem.gradient(p, merge(thf, theta_o), t)

    def step(carry, xs):
        W, V, bufs, dw, dv, dth, dlr_c, dmom_c, fault = carry
        t, lr_sl, code_sl = xs
        alphas, codes = _at_step(lr, lr_sl), _at_step(fw.coding, code_sl)
        d_alpha, W_prev = [], []
        for Wi, Vi, dwi, alpha in zip(W, V, dw, alphas):
            d_alpha.append(dwi * fp.to_float(Vi, k))
            W_prev.append(Wi - _dw(alpha, Vi)[0])
        params = _params(problem, W_prev, k)
        if method.isolate_gradient:
            (g_tree, path_t), vjp = linearized_gradient(problem, params, theta_f, theta_o, t)
        else:
            (g_tree, path_t), vjp = jax.vjp(grad_at(t), params, theta_f)
        under = jnp.zeros((), bool)
        V_prev, bufs_new, dv_new, d_gamma, ct_g = [], [], [], [], []
        # the reverse pass only reads the stacks: they stay loop constants, not carry
        bufs = [_buffer.Buffer(x, m, h, stack) for (x, m, h), stack in zip(bufs, stacks)]
        for Vi, bi, gi, dwi, dvi, alpha, c in zip(V, bufs, jax.tree_util.tree_leaves(g_tree), dw,
                                                  dv, alphas, codes):
            gq = c.n.astype(jnp.float64) / 65536.0
            Vi, bi, empty = _buffer.divide(Vi + _dv(gi, gq, k)[0], c, bi)
            under |= empty
            dvi = dvi + alpha * dwi
            d_gamma.append(dvi * (fp.to_float(Vi, k) + gi.astype(jnp.float64)))
            ct_g.append(-(1.0 - gq) * dvi)
            V_prev.append(Vi)
            bufs_new.append((bi.x, bi.m, bi.head))
            dv_new.append(dvi * gq)
        ct_tree = problem.treedef.unflatten([c.astype(dt) for c, dt in zip(ct_g, problem.dtypes)])
        hw, hth = vjp((ct_tree, jnp.asarray(ct_path, path_t.dtype)))
        dw_new = [a + h.astype(jnp.float64) for a, h in zip(dw, jax.tree_util.tree_leaves(hw))]
        dth = jax.tree_util.tree_map(lambda a, b: a + b.astype(a.dtype), dth, hth)
        nonfinite = jnp.zeros((), bool)
        for a in dw_new:
            nonfinite |= _any_bits(~jnp.isfinite(a)) == 1
        fault = fault.record(under, _faults.BUFFER_UNDERFLOW, t)
        fault = fault.record(nonfinite, _faults.NONFINITE_COTANGENT, t)
        dlr_t = [_sum_to(a, s) for a, s in zip(d_alpha, lr_shapes)]
        dmom_t = [_sum_to(a, s) for a, s in zip(d_gamma, mom_shapes)]
        dlr_c = tuple(None if c is None else a + d.astype(a.dtype)
                      for c, a, d in zip(lr.constant, dlr_c, dlr_t))
        dmom_c = tuple(None if c is None else a + d.astype(a.dtype)
                       for c, a, d in zip(momentum.constant, dmom_c, dmom_t))
        ys = (tuple(None if s is None else d.astype(s.dtype) for s, d in zip(lr.stepwise, dlr_t)),
              tuple(None if s is None else d.astype(s.dtype) for s, d in zip(momentum.stepwise, dmom_t)))
        return (W_prev, V_prev, bufs_new, dw_new, dv_new, dth, dlr_c, dmom_c, fault), ys

    stacks = [b.stack for b in fw.buffers]
    init = (fw.W, fw.V, [(b.x, b.m, b.head) for b in fw.buffers],
            [jnp.asarray(c, jnp.float64) for c in ct_w],
            [jnp.zeros(jnp.shape(c), jnp.float64) for c in ct_w], zeros(theta_f),
            zeros(lr.constant), zeros(momentum.constant), _faults.Fault.none())
    carry, (dlr_s, dmom_s) = jax.lax.scan(step, init, _xs(problem, lr, fw.coding), reverse=True)
    W, V, bufs, dw, dv, dth, dlr_c, dmom_c, fault = carry
    bufs = [_buffer.Buffer(x, m, h, stack) for (x, m, h), stack in zip(bufs, stacks)]
    exact = jnp.bool_(True)
    for a, b in zip(W, fw.W0):
        exact &= jnp.all(a == b)
    for a, b in zip(V, fw.V0):
        exact &= jnp.all(a == b)
    for b in bufs:
        exact &= _buffer.is_empty(b)
    fault = fault.record(~exact, _faults.REVERSAL_DRIFT, 0)
    return Backward(dw, dv, dth, _schedules.Schedule(dlr_c, dlr_s),
                    _schedules.Schedule(dmom_c, dmom_s), W, V, bufs, fault)


@dataclasses.dataclass(frozen=True)
class Reversible:
    """Exact reversal in fixed point with an information buffer.

    Args:
      frac_bits: fractional bits k of the fixed-point state; values must stay
        within |x| < 2^(62 - k) (1024 for the default 52).
      min_momentum: a lower bound on every momentum value, used to size the
        buffer when momentum is traced (under `jax.grad` w.r.t. momentum, or
        `jax.jit` with momentum as an argument). When momentum is a concrete
        array the size is derived from its values and this may be None.
      extra_words: slack 16-bit words per weight on top of the size the
        schedule needs (that size is exact, so 0 suffices).
      isolate_gradient: compute grad_w L and the residuals of its VJP in both
        passes as the same isolated computation (the branch of a `lax.cond`,
        see `_problem.linearized_gradient`), so the compiler cannot fuse it
        with its neighbours differently backwards (e.g. contract a*b + c into
        an FMA in one pass only), which would break the reversal. With False
        both passes inline the plain gradient and its VJP. Drift is always
        detected and raised, never returned.

    Memory: W, V and the buffer's x (24 bytes per weight) plus 2 bytes per
    16-bit word, sum_t log2(1/gamma_t) / 16 words per weight.
    """

    frac_bits: int = 52
    min_momentum: float | None = None
    extra_words: int = 0
    isolate_gradient: bool = True

    def __post_init__(self):
        if not isinstance(self.frac_bits, int) or not 8 <= self.frac_bits <= 60:
            raise ValueError(f"Reversible(frac_bits={self.frac_bits!r}): frac_bits must be an "
                             "integer in [8, 60] (52 gives range |x| < 1024 and step 2^-52).")
        if self.min_momentum is not None and not (0 < float(self.min_momentum) < 1):
            raise ValueError(f"Reversible(min_momentum={self.min_momentum!r}): must lie in (0, 1).")
        if not isinstance(self.extra_words, int) or self.extra_words < 0:
            raise ValueError(f"Reversible(extra_words={self.extra_words!r}): must be an integer >= 0.")

    def capacity(self, momentum: _schedules.Schedule, steps: int) -> tuple:
        """Static stack rows (16-bit words per weight), one number per params leaf."""
        if self.min_momentum is not None:
            n = max(_buffer.MIN_NUMERATOR, round(float(self.min_momentum) * 65536))
            total = steps * int(_buffer.increments_np(n))
            return tuple(_buffer.capacity_words(total) + self.extra_words
                         for _ in momentum.constant)
        if not _schedules.is_concrete(momentum):
            raise ValueError(
                "Reversible() cannot size its information buffer: momentum is traced (under "
                "jax.grad/jax.jit/jax.vmap), so its values are unknown when the program is "
                "built. Pass a lower bound on every momentum value, e.g. "
                "revlearn.Reversible(min_momentum=0.5).")
        out = []
        for c, s in zip(momentum.constant, momentum.stepwise):
            if c is not None:
                inc = _buffer.increments_np(np.round(np.asarray(c, np.float64) * 65536))
                total = steps * int(np.max(inc))
            else:
                inc = _buffer.increments_np(np.round(np.asarray(s, np.float64) * 65536))
                total = int(np.sum(inc.reshape(steps, -1).max(axis=1)))
            out.append(_buffer.capacity_words(total) + self.extra_words)
        return tuple(out)

    def solve(self, problem: Problem, params0, v0, theta, lr, momentum):
        require_x64("revlearn.Reversible")
        capacity = self.capacity(momentum, problem.steps)
        theta_f, theta_o = split_inexact(theta)
        where = "revlearn.sgd(method=Reversible())"
        info = dict(frac_bits=self.frac_bits, capacity=max(capacity),
                    min_momentum=self.min_momentum if self.min_momentum is not None else "its values")

        def final(fw):
            return [fp.to_float(W, self.frac_bits).astype(dt) for W, dt in zip(fw.W, problem.dtypes)]

        @jax.custom_vjp
        def run(w0, v0, theta_f, theta_o, lr, momentum):
            fw = forward(problem, self, capacity, w0, v0, merge(theta_f, theta_o), lr, momentum)
            _faults.raise_if_fault(fw.fault, where, **info)
            return final(fw), fw.path

        def run_fwd(w0, v0, theta_f, theta_o, lr, momentum):
            fw = forward(problem, self, capacity, w0, v0, merge(theta_f, theta_o), lr, momentum)
            _faults.raise_if_fault(fw.fault, where, **info)
            return (final(fw), fw.path), (fw, theta_f, theta_o, lr, momentum)

        def run_bwd(res, cts):
            fw, theta_f, theta_o, lr, momentum = res
            ct_w, ct_path = cts
            bw = backward(problem, self, fw, theta_f, theta_o, lr, momentum, ct_w, ct_path)
            _faults.raise_if_fault(bw.fault, where + " (reverse pass)", **info)
            d_o = jax.tree_util.tree_map(
                lambda x: np.zeros(np.shape(x), jax.dtypes.float0), theta_o)
            dw0 = [d.astype(dt) for d, dt in zip(bw.dw, problem.dtypes)]
            dv0 = [d.astype(dt) for d, dt in zip(bw.dv, problem.dtypes)]
            return dw0, dv0, bw.dtheta, d_o, bw.dlr, bw.dmomentum

        run.defvjp(run_fwd, run_bwd)
        leaves = lambda tree: [jnp.asarray(l) for l in jax.tree_util.tree_leaves(tree)]
        wT, path = run(leaves(params0), leaves(v0), theta_f, theta_o, lr, momentum)
        return problem.treedef.unflatten(wT), path
