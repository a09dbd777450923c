"""Exact reversal of SGD with momentum (Maclaurin et al. 2015, Algorithms 1-3).

State: W, V int64 fixed point (see `_fixed_point`) and the information
buffer's x (`_buffer`), each one packed array [nblocks, BLOCK] for all params
leaves (`_layout`), plus the buffer's bound, head and stack per leaf (one
16-bit row per spill). Forward step t
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

Cost. On CPU each array a step writes is one XLA kernel, so the packed layout
makes each elementwise stage one kernel for the whole model, and the few
intermediates that several kernels read (the buffer's decoded symbol, the
packed gradient, dv + alpha dw) are computed once (`_buffer._kept`, `_ones`).
The forward step folds its checks into one bitwise-or reduction; the reverse
step checks dw through the sums it makes for the lr adjoint anyway.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import _buffer, _determinism, _faults, _fixed_point as fp, _schedules
from ._layout import BLOCK, Layout
from ._problem import Problem, isolated_gradient, merge, split_inexact


class Forward(NamedTuple):
    """End of the forward pass. W, V, x: packed [nblocks, BLOCK] (see `_layout`);
    m, head, stacks: the buffer's bound, head and stack per params leaf."""

    W: jax.Array
    V: jax.Array
    x: jax.Array
    m: tuple
    head: tuple
    stacks: tuple
    path: jax.Array
    fault: _faults.Fault
    W0: jax.Array
    V0: jax.Array
    coding: _schedules.Schedule      # of `_buffer.Coding`, shaped like the momentum schedule


class Backward(NamedTuple):
    """Adjoints d(w0), d(v0) (lists, float64), d(theta_f), d(lr), d(momentum), recovered state."""

    dw: list
    dv: list
    dtheta: object
    dlr: _schedules.Schedule
    dmomentum: _schedules.Schedule
    W: jax.Array
    V: jax.Array
    x: jax.Array
    m: tuple
    head: tuple
    fault: _faults.Fault

    def buffer_empty(self) -> jax.Array:
        """True iff the buffer is back at its initial state (every word popped, x and m restored)."""
        return _buffer.at_start(self.x, self.m, self.head)


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
    """Q((1 - gamma) g) int64 and whether it is in range (g non-finite counts as out of range)."""
    return fp.round_checked((1.0 - gq) * g.astype(jnp.float64) * (2.0 ** k))


def _dw(alpha, V):
    """round(alpha V) = Q(alpha v) int64 (V int64 fixed point; scaling by 2^+-k is exact)."""
    return fp.round_checked(alpha.astype(jnp.float64) * V.astype(jnp.float64))


def _ones(w: jax.Array) -> jax.Array:
    """An array of 1.0 like the packed state that the compiler cannot prove constant
    (see `_buffer._kept`): made from the packed initial weights `w`, and read by
    the loops as a loop constant. Where w is not finite (a fault) it holds 2.0."""
    return jnp.where(jnp.isfinite(w), 1.0, 2.0)


def gradient(method: "Reversible", problem: Problem, params, theta_f, theta_o, step, ct=None):
    """((grad_w L, path term), VJP or None): the gradient at `step` as `method` computes it in
    both passes, and given the cotangent `ct` = (ct_grad, ct_path) also the VJP of
    (params, theta_f) -> (grad, path) at it, (d params, d theta_f), as the reverse pass does.

    Isolated (`isolate_gradient`): the gradient inside `_problem.isolated_gradient`'s
    branch, with the VJP in it (`vjp_in_branch`) or beside it, where it recomputes the
    loss; else both inline."""
    f = lambda p, th: problem.gradient(p, merge(th, theta_o), step)
    if method.isolate_gradient and (ct is None or not method._vjp_in_branch()):
        out = isolated_gradient(problem, params, theta_f, theta_o, step)[0]
        return out, None if ct is None else jax.vjp(f, params, theta_f)[1](ct)
    if method.isolate_gradient:
        return isolated_gradient(problem, params, theta_f, theta_o, step, ct)
    if ct is None:
        return f(params, theta_f), None
    out, vjp = jax.vjp(f, params, theta_f)
    return out, vjp(ct)


def _params(problem: Problem, lay: Layout, W: jax.Array, k: int):
    return problem.treedef.unflatten([l.astype(dt) for l, dt in
                                      zip(lay.unpack(fp.to_float(W, k)), problem.dtypes)])


def _xs(problem, lr, coding):
    return (jnp.arange(problem.steps, dtype=jnp.int32), lr.stepwise, coding.stepwise)


def _entry_shapes(schedule: _schedules.Schedule) -> list:
    return [np.shape(c) if c is not None else np.shape(s)[1:]
            for c, s in zip(schedule.constant, schedule.stepwise)]


def _spread_coding(lay: Layout, codes: list) -> _buffer.Coding:
    return _buffer.Coding(*(lay.spread([getattr(c, f) for c in codes])
                            for f in _buffer.Coding._fields))


def empty_buffer(lay: Layout, momentum: _schedules.Schedule, capacity: tuple):
    """x [nblocks, BLOCK], and per leaf m, head (shape () or [nb_i, BLOCK]) and stack."""
    x = jnp.full(lay.shape, _buffer.X0, jnp.int64)
    m, head, stacks = [], [], []
    for i, (entry, cap) in enumerate(zip(_entry_shapes(momentum), capacity)):
        shape = jnp.shape(lay.entry_rows(np.zeros(entry), i))    # the same choice as the steps'
        m.append(jnp.full(shape, _buffer.M0, jnp.int64))
        head.append(jnp.zeros(shape, jnp.int32))
        stacks.append(jnp.zeros((cap + 1, lay.rows[i], BLOCK), jnp.uint16))
    return x, tuple(m), tuple(head), tuple(stacks)


def forward(problem: Problem, method: "Reversible", capacity: tuple, w0: list, v0: list, theta_f,
            theta_o, lr, momentum) -> Forward:
    """Train `problem.steps` steps in fixed point from the float leaves w0, v0 (theta split
    into float leaves `theta_f` and the others `theta_o`, see `_problem.split_inexact`)."""
    k = method.frac_bits
    lay = Layout.of(problem.shapes)
    fault = _faults.Fault.none()
    w0 = lay.pack(w0, jnp.float64)
    ones = _ones(w0)
    W0, bad_w = fp.quantize(w0, k)
    V0, bad_v = fp.quantize(lay.pack(v0, jnp.float64), k)
    fault = fault.record(bad_w, _faults.WEIGHT_OVERFLOW, 0)
    fault = fault.record(bad_v, _faults.VELOCITY_OVERFLOW, 0)
    fault = _schedule_faults(fault, lr, momentum, problem.steps)
    coding = _coding(momentum)

    def step(carry, xs):
        W, V, x, m, head, stacks, path, fault = carry
        t, lr_sl, code_sl = xs
        codes = _at_step(coding, code_sl)
        (g_tree, path_t), _ = gradient(method, problem, _params(problem, lay, W, k), theta_f,
                                       theta_o, t)
        g = lay.pack(jax.tree_util.tree_leaves(g_tree), jnp.float64) / ones   # one kernel (`_ones`)
        spill_l, m_new = [], []
        for i, (mi, c) in enumerate(zip(m, codes)):
            spill_i, mi = _buffer.advance(mi, lay.entry_rows(c.inc, i))
            spill_l.append(spill_i)
            m_new.append(mi)
        c = _spread_coding(lay, codes)
        V, x, word = _buffer.encode(V, x, lay.join(spill_l), c, ones)
        stacks_new, head_new, full = [], [], jnp.zeros((), bool)
        for i, (st, h, sp) in enumerate(zip(stacks, head, spill_l)):
            st, h, f = _buffer.push(st, h, sp, lay.rows_of(word, i))
            stacks_new.append(st)
            head_new.append(h)
            full |= f
        dV, ok_v = _dv(g, c.n.astype(jnp.float64) / 65536.0, k)
        V = V - dV
        dW, ok_w = _dw(lay.spread(_at_step(lr, lr_sl)), V)
        W = W + dW
        bits = _any_bits(~jnp.isfinite(g), ~ok_v | ~ok_w | fp.out_of_range_mask(V),
                         fp.out_of_range_mask(W))
        for bit, code in ((0, _faults.NONFINITE_GRADIENT), (1, _faults.VELOCITY_OVERFLOW),
                          (2, _faults.WEIGHT_OVERFLOW)):
            fault = fault.record((bits >> bit) & 1 == 1, code, t)
        fault = fault.record(full, _faults.BUFFER_EXHAUSTED, t)
        return (W, V, x, tuple(m_new), tuple(head_new), tuple(stacks_new), path + path_t,
                fault), None

    x, m, head, stacks = empty_buffer(lay, momentum, capacity)
    init = (W0, V0, x, m, head, stacks, jnp.zeros((), jnp.float64), fault)
    (W, V, x, m, head, stacks, path, fault), _ = jax.lax.scan(step, init, _xs(problem, lr, coding))
    return Forward(W, V, x, m, head, stacks, path, fault, W0, V0, coding)


def _reduce_to(lay: Layout, flat: jax.Array, sums: jax.Array, j: int, i: int, shape: tuple):
    """Leaf i's adjoint of an entry of `shape` from a packed product: the per-leaf sum
    `sums[j, i]` for single-value entries, else the leaf's part summed to `shape`."""
    if math.prod(shape) == 1:
        return sums[j, i].reshape(shape)
    return _sum_to(lay.leaf(flat, i), shape)


def backward(problem: Problem, method: "Reversible", fw: Forward, theta_f, theta_o, lr, momentum,
             ct_w: list, ct_path) -> Backward:
    """Run the training backwards from `fw`, accumulating the hypergradients."""
    k = method.frac_bits
    lay = Layout.of(problem.shapes)
    zeros = lambda tree: jax.tree_util.tree_map(jnp.zeros_like, tree)
    lr_shapes, mom_shapes = _entry_shapes(lr), _entry_shapes(momentum)

    def step(carry, xs):
        W, V, x, m, head, dw, dv, dth, dlr_c, dmom_c, fault = carry
        t, lr_sl, code_sl = xs
        codes = _at_step(fw.coding, code_sl)
        alpha = lay.spread(_at_step(lr, lr_sl), jnp.float64)
        W = W - _dw(alpha, V)[0]
        params = _params(problem, lay, W, k)
        dv = (dv + alpha * dw) / ones          # read by several kernels: computed once
        c = _spread_coding(lay, codes)
        gq = c.n.astype(jnp.float64) / 65536.0
        ct = (problem.treedef.unflatten([c_.astype(dt) for c_, dt in
                                         zip(lay.unpack(-(1.0 - gq) * dv), problem.dtypes)]),
              jnp.asarray(ct_path, path_dtype))
        (g_tree, path_t), (hw, hth) = gradient(method, problem, params, theta_f, theta_o, t, ct)
        g = lay.pack(jax.tree_util.tree_leaves(g_tree), jnp.float64) / ones   # one kernel (`_ones`)
        spill_l, m_new, head_new, words = [], [], [], []
        under = jnp.zeros((), bool)
        for i, (mi, h, c_) in enumerate(zip(m, head, codes)):
            spill_i, mi = _buffer.retreat(mi, lay.entry_rows(c_.inc, i))
            word, h, e = _buffer.pop(stacks[i], h, spill_i)
            spill_l.append(spill_i)
            m_new.append(mi)
            head_new.append(h)
            words.append(word)
            under |= e
        V_next = V
        V, x = _buffer.decode(V + _dv(g, gq, k)[0], x, lay.join(spill_l), lay.join(words), c, ones)
        prods = jnp.stack([dw * fp.to_float(V_next, k), dv * (fp.to_float(V, k) + g)])
        sums = lay.sums(prods)
        dv = dv * gq
        dw = dw + lay.pack(jax.tree_util.tree_leaves(hw), jnp.float64)
        dth = jax.tree_util.tree_map(lambda a, b: a + b.astype(a.dtype), dth, hth)
        fault = fault.record(under, _faults.BUFFER_UNDERFLOW, t)
        # every weight's dw enters sum(dw v) (inf * 0 is nan), so the sums already made for
        # the lr adjoint tell whether the VJP of step t + 1 left dw non-finite
        fault = fault.record(~jnp.isfinite(jnp.sum(sums)), _faults.NONFINITE_COTANGENT, t + 1)
        dlr_t = [_reduce_to(lay, prods[0], sums, 0, i, s) for i, s in enumerate(lr_shapes)]
        dmom_t = [_reduce_to(lay, prods[1], sums, 1, i, s) for i, s in enumerate(mom_shapes)]
        dlr_c = tuple(None if c_ is None else a + d.astype(a.dtype)
                      for c_, a, d in zip(lr.constant, dlr_c, dlr_t))
        dmom_c = tuple(None if c_ is None else a + d.astype(a.dtype)
                       for c_, a, d in zip(momentum.constant, dmom_c, dmom_t))
        ys = (tuple(None if s is None else d.astype(s.dtype) for s, d in zip(lr.stepwise, dlr_t)),
              tuple(None if s is None else d.astype(s.dtype) for s, d in zip(momentum.stepwise, dmom_t)))
        return (W, V, x, tuple(m_new), tuple(head_new), dw, dv, dth, dlr_c, dmom_c, fault), ys

    path_dtype = jax.eval_shape(lambda p: problem.gradient(p, merge(theta_f, theta_o), jnp.int32(0)),
                                _params(problem, lay, fw.W, k))[1].dtype
    # the reverse pass only reads the stacks: they stay loop constants, not carry
    stacks = fw.stacks
    ones = _ones(fp.to_float(fw.W0, k))
    ct = lay.pack([jnp.asarray(c, jnp.float64) for c in ct_w])
    init = (fw.W, fw.V, fw.x, fw.m, fw.head, ct, jnp.zeros_like(ct), zeros(theta_f),
            zeros(lr.constant), zeros(momentum.constant), _faults.Fault.none())
    carry, (dlr_s, dmom_s) = jax.lax.scan(step, init, _xs(problem, lr, fw.coding), reverse=True)
    W, V, x, m, head, dw, dv, dth, dlr_c, dmom_c, fault = carry
    fault = fault.record(~jnp.all(jnp.isfinite(dw)), _faults.NONFINITE_COTANGENT, 0)
    exact = jnp.all(W == fw.W0) & jnp.all(V == fw.V0) & _buffer.at_start(x, m, head)
    fault = fault.record(~exact, _faults.REVERSAL_DRIFT, 0)
    return Backward(lay.unpack(dw), lay.unpack(dv), dth, _schedules.Schedule(dlr_c, dlr_s),
                    _schedules.Schedule(dmom_c, dmom_s), W, V, x, m, head, fault)


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
      isolate_gradient: compute grad_w L in both passes as an isolated
        computation (the branch of a `lax.cond`, see
        `_problem.isolated_gradient`), so the compiler cannot fuse it
        with its neighbours differently backwards (e.g. contract a*b + c into
        an FMA in one pass only), which would break the reversal. With False
        both passes inline the plain gradient and its VJP. Drift is always
        detected and raised, never returned.
      vjp_in_branch: with `isolate_gradient`, apply the gradient's VJP (the
        Hessian-vector product) inside the reverse pass's isolated branch
        (True), or beside it (False: the branch is then the forward pass's
        computation exactly, and the VJP recomputes the loss's forward and
        backward pass, one more gradient's work per step). None (default):
        True on CPU, False on GPU and other accelerators. On CPU both reverse
        exactly on every test and True is cheaper. On an H200 GPU the gradient
        compiled beside its VJP rounded differently from the forward pass's
        (the tests' tanh MLP drifted in every run, also with deterministic
        ops, and the 987,210-weight benchmark net at T = 10^4); with False
        both were exact. Convolutions there also need
        XLA_FLAGS=--xla_gpu_deterministic_ops=true (see
        `benchmarks/results/exactness_gpu.md`).

    Memory: W, V, the buffer's x and the loops' array of ones (32 bytes per
    weight, each leaf padded to whole rows of 64) plus 2 bytes per 16-bit
    word, sum_t log2(1/gamma_t) / 16 words per weight.
    """

    frac_bits: int = 52
    min_momentum: float | None = None
    extra_words: int = 0
    isolate_gradient: bool = True
    vjp_in_branch: bool | None = None

    def __post_init__(self):
        if not isinstance(self.frac_bits, int) or not 8 <= self.frac_bits <= 60:
            raise ValueError(f"Reversible(frac_bits={self.frac_bits!r}): frac_bits must be an "
                             "integer in [8, 60] (52 gives range |x| < 1024 and step 2^-52).")
        if self.min_momentum is not None and not (0 < float(self.min_momentum) < 1):
            raise ValueError(f"Reversible(min_momentum={self.min_momentum!r}): must lie in (0, 1).")
        if not isinstance(self.extra_words, int) or self.extra_words < 0:
            raise ValueError(f"Reversible(extra_words={self.extra_words!r}): must be an integer >= 0.")
        if not isinstance(self.isolate_gradient, bool):
            raise ValueError(f"Reversible(isolate_gradient={self.isolate_gradient!r}): must be True "
                             "or False.")
        if self.vjp_in_branch is not None and not isinstance(self.vjp_in_branch, bool):
            raise ValueError(f"Reversible(vjp_in_branch={self.vjp_in_branch!r}): must be True, "
                             "False or None (None: True on CPU, False on accelerators).")

    def _vjp_in_branch(self) -> bool:
        """Whether the reverse pass applies the VJP inside the isolated branch (see the field)."""
        if self.vjp_in_branch is not None:
            return bool(self.vjp_in_branch)
        return jax.default_backend() == "cpu"

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
                total = steps * int(np.max(inc, initial=0))       # an empty leaf needs none
            else:
                inc = _buffer.increments_np(np.round(np.asarray(s, np.float64) * 65536))
                total = int(np.sum(inc.reshape(steps, -1).max(axis=1, initial=0)))
            out.append(_buffer.capacity_words(total) + self.extra_words)
        return tuple(out)

    def solve(self, problem: Problem, params0, v0, theta, lr, momentum):
        require_x64("revlearn.Reversible")
        capacity = self.capacity(momentum, problem.steps)
        theta_f, theta_o = split_inexact(theta)
        where = "revlearn.sgd(method=Reversible())"
        _determinism.warn_if_nondeterministic(problem, params0, theta, where)
        info = dict(frac_bits=self.frac_bits, capacity=max(capacity),
                    min_momentum=self.min_momentum if self.min_momentum is not None else "its values")

        lay = Layout.of(problem.shapes)

        def final(fw):
            return [w.astype(dt) for w, dt in
                    zip(lay.unpack(fp.to_float(fw.W, self.frac_bits)), problem.dtypes)]

        @jax.custom_vjp
        def run(w0, v0, theta_f, theta_o, lr, momentum):
            fw = forward(problem, self, capacity, w0, v0, theta_f, theta_o, lr, momentum)
            _faults.raise_if_fault(fw.fault, where, **info)
            return final(fw), fw.path

        def run_fwd(w0, v0, theta_f, theta_o, lr, momentum):
            fw = forward(problem, self, capacity, w0, v0, theta_f, theta_o, lr, momentum)
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
