"""Exact reversal of an update rule (Maclaurin et al. 2015, Algorithms 1-3, for any
`revlearn.optim` rule).

State: the weights W and each moment X (momentum's velocity, Adam's m and s)
as int64 fixed point (`exact._fixed_point`), one packed array [nblocks, BLOCK]
each for all params leaves (`exact._layout`), and per decay an information
buffer (`exact._buffer`): x packed, and per leaf its bound, head and word
stack. With Q_j(x) = round(x 2^(k + scale_j)), forward step t
(g_t = grad_w L(w_t, theta, t)):

    for each moment X_j, in order:
        X_j <- X_j * d_j                  (exact: the lost bits go to decay d_j's buffer)
        X_j <- X_j + Q_j(increment_j(g_t, moments so far))
    W <- W * d_w                          (if the rule decays the weights, e.g. AdamW)
    W <- W + Q(update(moments))

e.g. momentum: V <- V gamma; V <- V - Q((1 - gamma) g); W <- W + Q(alpha v).
Reverse step t, from (W_{t+1}, X_{t+1}) and the adjoints (dw, dX; d_theta
and the hyperparameters' adjoints accumulated):

    W <- (W - Q(update(moments))) / d_w   (= W_t exactly)
    g_t = grad_w L(w_t, theta, t)         (recomputed, bit-identical)
    (dw, dX, dg, dh) = VJP of the rule's float step at (w_t, moments_t, g_t, h_t)
    (dw, d_theta) += VJP of (w, theta) -> grad_w L(w, theta, t) at dg
    for each moment, in reverse order: X_j <- (X_j - Q_j(increment_j)) / d_j  (= X_j,t exactly)

The adjoint of the step is JAX's VJP of `Rule.float_step` (so a new rule needs
no hand-written adjoint), at the moments before the step recovered in float
from the moments after it. A per-step meta-objective term l(w_t) adds its
gradient in the same VJP. At the end the recovered W_0, X_0 and buffers must
equal the initial ones bit-for-bit; anything else raises `ReversibleError`
rather than return a wrong gradient. Memory: O(P) plus the buffers, about
sum_j log2(1 / d_j) bits per weight per step.

Kept steps (`Reversible(budget=...)`): the last S steps' forward pass also keeps
g_t and the residuals of the VJP of (w, theta) -> grad_w L(w, theta, t) (those
computed from w: `_kept_residuals`); their reverse steps undo the state with the kept
g_t and apply the kept VJP, so the reversal stays exact and the gradient is not
recomputed. Memory then grows by S times one step's residuals.

Cost. On CPU each array a step writes is one XLA kernel, so the packed layout
makes each elementwise stage one kernel for the whole model, and the few
intermediates that several kernels read (the buffer's decoded symbol, the
packed gradient) are computed once (`_buffer._kept`, `_ones`). The forward
step folds its checks into one bitwise-or reduction; the reverse step checks
dw through a sum.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import NamedTuple

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

from .. import _faults, _schedules, _sharding
from .._problem import Prepared, Problem, decay_values, isolated, isolated_gradient, merge, split_inexact
from ..exact import _buffer, _determinism, _fixed_point as fp, _grid, _wide
from ..exact._layout import BLOCK, Layout


class Forward(NamedTuple):
    """End of the forward pass. W and the moments X (a tuple in the rule's order): packed
    [nblocks, BLOCK] int64 (see `_layout`); per decay (a tuple in the rule's order) its
    buffer's x (packed) and its bound, head and stack per params leaf; the codings."""

    W: jax.Array
    X: tuple
    x: tuple
    m: tuple
    head: tuple
    stacks: tuple
    path: jax.Array
    fault: _faults.Fault
    W0: jax.Array
    X0: tuple
    coding: tuple                     # per decay, a Schedule of `_buffer.Coding`
    stored: tuple = ()                # the last steps' (gradient leaves, VJP residual leaves),
                                      # each stacked [S, ...] (`Reversible.budget`), or ()


class Backward(NamedTuple):
    """Adjoints d(w0), d(moments0) (lists of leaves, float64), d(theta_f), the adjoints of the
    hyperparameters and decays (dicts of Schedules), and the recovered state."""

    dw: list
    dX: dict
    dtheta: object
    dh: dict
    dd: dict
    W: jax.Array
    X: tuple
    x: tuple
    m: tuple
    head: tuple
    fault: _faults.Fault

    def buffer_empty(self, rule) -> jax.Array:
        """True iff every buffer is back at its initial state (every word popped, x and m restored)."""
        out = jnp.ones((), bool)
        for j, dec in enumerate(rule.decays()):
            out &= _buffer.at_start(self.x[j], self.m[j], self.head[j], dec.grid)
        return out


def require_x64(where: str) -> None:
    if jnp.zeros((), jnp.int64).dtype != jnp.int64:
        raise RuntimeError(
            f"{where} needs 64-bit integers for its fixed-point state, but JAX's 64-bit mode is "
            "off. Call jax.config.update('jax_enable_x64', True) once at the start of your "
            "program, before creating arrays (models may still compute in float32), or use "
            "revlearn.Unrolled().")


def layout(p: Prepared) -> Layout:
    """The packed layout of `p`'s params, split into as many row blocks as the mesh has
    devices (`_sharding`)."""
    return Layout.of(p.problem.shapes, _sharding.shards(p.mesh))


def _map_schedule(fn, s: _schedules.Schedule) -> _schedules.Schedule:
    return _schedules.Schedule(tuple(None if a is None else fn(a) for a in s.constant),
                               tuple(None if a is None else fn(a) for a in s.stepwise))


def _codings(rule, decays: dict) -> tuple:
    """Per decay, the buffer's tables per schedule entry (not per weight and step). Values
    off the grid are clipped here and reported by `_faults.schedule_faults`."""
    return tuple(_map_schedule(lambda a, g=dec.grid: _buffer.coding(_grid.numerators(a, g), g),
                               decays[dec.name]) for dec in rule.decays())


def _any_bits(*conds, sharded: bool = False) -> jax.Array:
    """Bit j of the int32 result is set iff any(conds[j]): one bitwise-or reduction, or,
    when the state is `sharded` (XLA's CPU all-reduce has no bitwise or), one max each."""
    if sharded:
        return sum(jnp.max(c.astype(jnp.int32), initial=0) << j for j, c in enumerate(conds))
    code = sum(c.astype(jnp.int32) << j for j, c in enumerate(conds))
    return jax.lax.reduce(code, np.int32(0), jax.lax.bitwise_or, tuple(range(code.ndim)))


def _ones(w: jax.Array) -> jax.Array:
    """An array of 1.0 like the packed state that the compiler cannot prove constant
    (see `_buffer._kept`): made from the packed initial weights `w`, and read by
    the loops as a loop constant. Where w is not finite (a fault) it holds 2.0."""
    return jnp.where(jnp.isfinite(w), 1.0, 2.0)


def _scale(k: int) -> float:
    return 2.0 ** k


def gradient(method: "Reversible", problem: Problem, params, theta_f, theta_o, step, ct_fn=None):
    """((grad_w L, path term), VJP or None, extra or None): the gradient at `step` as `method`
    computes it in both passes; given `ct_fn` (the gradient -> ((ct_grad, ct_path), extra)),
    also the VJP of (params, theta_f) -> (grad, path) at that cotangent, (d params,
    d theta_f), as the reverse pass does.

    Isolated (`isolate_gradient`): the gradient inside `_problem.isolated_gradient`'s
    branch, with the cotangent and the VJP in it (`vjp_in_branch`) or beside it, where it
    recomputes the loss; else all inline."""
    f = lambda p, th: problem.gradient(p, merge(th, theta_o), step)
    if method.isolate_gradient and (ct_fn is None or not method._vjp_in_branch()):
        out = isolated_gradient(problem, params, theta_f, theta_o, step)
        if ct_fn is None:
            return out, None, None
        ct, extra = ct_fn(out)
        return out, jax.vjp(f, params, theta_f)[1](ct), extra
    if method.isolate_gradient:
        return isolated_gradient(problem, params, theta_f, theta_o, step, ct_fn)
    if ct_fn is None:
        return f(params, theta_f), None, None
    out, vjp = jax.vjp(f, params, theta_f)
    ct, extra = ct_fn(out)
    return out, vjp(ct), extra


def _params(problem: Problem, lay: Layout, W: jax.Array, k: int):
    return problem.treedef.unflatten([l.astype(dt) for l, dt in
                                      zip(lay.unpack(fp.to_float(W, k)), problem.dtypes)])


def _entry_shapes(schedule: _schedules.Schedule) -> list:
    return [np.shape(c) if c is not None else np.shape(s)[1:]
            for c, s in zip(schedule.constant, schedule.stepwise)]


def _spread_coding(lay: Layout, codes: list) -> _buffer.Coding:
    return _buffer.Coding(*(lay.spread([getattr(c, f) for c in codes])
                            for f in _buffer.Coding._fields))


def empty_buffer(lay: Layout, decay: _schedules.Schedule, capacity: tuple, grid: _grid.Grid):
    """x [nblocks, BLOCK], and per leaf m, head (shape () or [nb_i, BLOCK]) and stack."""
    x = jnp.full(lay.shape, _buffer.x0(grid), jnp.int64)
    m, head, stacks = [], [], []
    for i, (entry, cap) in enumerate(zip(_entry_shapes(decay), capacity)):
        shape = jnp.shape(lay.entry_rows(np.zeros(entry), i))    # the same choice as the steps'
        m.append(jnp.full(shape, _buffer.m0(grid), jnp.int64))
        head.append(jnp.zeros(shape, jnp.int32))
        stacks.append(jnp.zeros((cap + 1, lay.rows[i], BLOCK), grid.word_dtype))
    return x, tuple(m), tuple(head), tuple(stacks)


class _Step(NamedTuple):
    """A step's hyperparameters and decays: per name the per-leaf entries and their packed
    spread (float64), and k (the step count, float64)."""

    h_entries: dict
    d_entries: dict
    h: dict
    d: dict
    c: dict
    k: jax.Array


def _step_values(lay: Layout, hypers: dict, decays: dict, h_sl: dict, d_sl: dict, k) -> _Step:
    he = {n: _schedules.at_step(hypers[n], h_sl[n]) for n in hypers}
    de = {n: _schedules.at_step(decays[n], d_sl[n]) for n in decays}
    h = {n: lay.spread(e, jnp.float64) for n, e in he.items()}
    d = {n: lay.spread(e, jnp.float64) for n, e in de.items()}
    return _Step(he, de, h, d, {n: 1.0 - v for n, v in d.items()}, k)


def _update(rule, method, new: dict, sv: _Step, t, k: int):
    """Q(update(moments)) int64 and whether it is in range: the weights' increment, computed
    isolated (the same bits in both passes) when the rule asks for it (Adam's bias
    corrections use pow)."""
    def fn(ops):
        new, h, d, c, kk = ops
        return fp.round_checked(rule.update(new, h, d, c, kk) * _scale(k))
    ops = (new, sv.h, sv.d, sv.c, sv.k)
    return isolated(fn, t, ops) if rule.isolate_update else fn(ops)


def _multiply(lay, X, x, m, head, stacks, codes, grid, ones, wide=False):
    """X * d exactly on the packed state (`wide`: a `_wide.Wide`), with the decay's buffer:
    (X, x, m, head, stacks, full)."""
    spill_l, m_new = [], []
    for i, (mi, c) in enumerate(zip(m, codes)):
        spill_i, mi = _buffer.advance(mi, lay.entry_rows(c.inc, i), grid)
        spill_l.append(spill_i)
        m_new.append(mi)
    c = _spread_coding(lay, codes)
    if wide:
        X, x, word = _wide.encode(X, x, lay.join(spill_l), c, grid, ones)
    else:
        X, x, word = _buffer.encode(X, x, lay.join(spill_l), c, ones, grid)
    stacks_new, head_new, full = [], [], jnp.zeros((), bool)
    for i, (st, h, sp) in enumerate(zip(stacks, head, spill_l)):
        st, h, f = _buffer.push(st, h, sp, lay.rows_of(word, i))
        stacks_new.append(st)
        head_new.append(h)
        full |= f
    return X, x, tuple(m_new), tuple(head_new), tuple(stacks_new), full


def _divide(lay, X, x, m, head, stacks, codes, grid, ones, wide=False):
    """Exact inverse of `_multiply`: (X, x, m, head, ran empty)."""
    spill_l, m_new, head_new, words = [], [], [], []
    under = jnp.zeros((), bool)
    for i, (mi, h, c) in enumerate(zip(m, head, codes)):
        spill_i, mi = _buffer.retreat(mi, lay.entry_rows(c.inc, i), grid)
        word, h, e = _buffer.pop(stacks[i], h, spill_i)
        spill_l.append(spill_i)
        m_new.append(mi)
        head_new.append(h)
        words.append(word)
        under |= e
    c = _spread_coding(lay, codes)
    if wide:
        X, x = _wide.decode(X, x, lay.join(spill_l), lay.join(words), c, grid, ones)
    else:
        X, x = _buffer.decode(X, x, lay.join(spill_l), lay.join(words), c, ones, grid)
    return X, x, tuple(m_new), tuple(head_new), under


def _quantize(mo, x, k: int):
    """Q(x) in the moment's fixed point, and elementwise whether x was in range."""
    if mo.wide:
        return _wide.quantize(x, k)
    q, ok = fp.round_checked(jnp.asarray(x, jnp.float64) * _scale(k + mo.scale))
    return q, ok


def _to_float(mo, X, k: int):
    return _wide.to_float(X, k) if mo.wide else fp.to_float(X, k + mo.scale)


def _add(mo, X, dX):
    return _wide.add(X, dX) if mo.wide else X + dX


def _sub(mo, X, dX):
    return _wide.sub(X, dX) if mo.wide else X - dX


def _out_of_range(mo, X):
    return _wide.out_of_range_mask(X) if mo.wide else fp.out_of_range_mask(X)


def _equal(mo, a, b):
    return _wide.equal(a, b) if mo.wide else jnp.all(a == b)


def _xs(problem, hypers, decays, coding):
    return (jnp.arange(problem.steps, dtype=jnp.int32), {n: s.stepwise for n, s in hypers.items()},
            {n: s.stepwise for n, s in decays.items()}, tuple(c.stepwise for c in coding))


def forward(p: Prepared, method: "Reversible", capacity: dict, w0: list, s0: dict, count0,
            theta_f, theta_o, hypers: dict, decays: dict, store: int = 0) -> Forward:
    """Train `steps` steps in fixed point from the float leaves w0 and moments s0 (theta split
    into float leaves `theta_f` and the others `theta_o`, see `_problem.split_inexact`);
    `decays`: the decay schedules on their grids. The last `store` steps keep their
    gradient and its VJP's residuals (`Forward.stored`, those `_kept_residuals` selects) for
    `backward` to use instead of recomputing them."""
    problem, rule, k = p.problem, p.rule, method.frac_bits
    lay, place = layout(p), _sharding.placer(p.mesh)
    decs = rule.decays()
    di = {d.name: j for j, d in enumerate(decs)}
    fault = _faults.Fault.none()
    w0 = place(lay.pack(w0, jnp.float64))
    ones = _ones(w0)
    W0, bad = fp.quantize(w0, k)
    fault = fault.record(bad, _faults.WEIGHT_OVERFLOW, 0)
    fault = _faults.state0_faults(fault, rule, s0)
    X0 = []
    for j, mo in enumerate(rule.moments):
        x0 = lay.pack(s0[mo.name], jnp.float64)
        Xj, ok = _quantize(mo, x0, k)
        fault = fault.record(~jnp.all(ok), _faults.STATE_OVERFLOW, 0, j)
        X0.append(Xj)
    fault = _faults.schedule_faults(fault, rule, hypers, decays, problem.steps)
    coding = _codings(rule, decays)
    wd = rule.weight_decay_name

    def step(carry, xs, keep=False):
        W, X, x, m, head, stacks, path, fault = carry
        t, h_sl, d_sl, code_sl = xs
        x, m, head, stacks = list(x), list(m), list(head), list(stacks)
        codes = [_schedules.at_step(coding[j], code_sl[j]) for j in range(len(decs))]
        sv = _step_values(lay, hypers, decays, h_sl, d_sl, (count0 + t + 1).astype(jnp.float64))
        params = _params(problem, lay, W, k)
        if keep:
            # a kept step: the gradient beside its VJP's residuals, not isolated (the reverse
            # pass does not recompute it, so its bits need not match a second evaluation)
            (g_tree, path_t), vjp = _gradient_vjp(problem, theta_o, params, theta_f, t)
            kept = (jax.tree_util.tree_leaves(g_tree),
                    [r for r, stored in zip(jax.tree_util.tree_leaves(vjp), mask) if stored])
        else:
            (g_tree, path_t), _, _ = gradient(method, problem, params, theta_f, theta_o, t)
            kept = None
        g = place(lay.pack(jax.tree_util.tree_leaves(g_tree), jnp.float64)) / ones   # one kernel
        new, X_new, conds, full = {}, [], [~jnp.isfinite(g)], [jnp.zeros((), bool)] * len(decs)
        for j, mo in enumerate(rule.moments):
            Xj = X[j]
            if mo.decay is not None:
                q = di[mo.decay]
                Xj, x[q], m[q], head[q], stacks[q], full[q] = _multiply(
                    lay, Xj, x[q], m[q], head[q], stacks[q], codes[q], decs[q].grid, ones, mo.wide)
            dX, ok = _quantize(mo, rule.increment(mo.name, g, dict(new), sv.h, sv.d, sv.c, sv.k), k)
            Xj = _add(mo, Xj, dX)
            conds.append(~ok | _out_of_range(mo, Xj))
            new[mo.name] = _to_float(mo, Xj, k)
            X_new.append(Xj)
        if wd is not None:
            q = di[wd]
            W, x[q], m[q], head[q], stacks[q], full[q] = _multiply(
                lay, W, x[q], m[q], head[q], stacks[q], codes[q], decs[q].grid, ones)
        dW, ok_w = _update(rule, method, new, sv, t, k)
        W = W + dW
        conds.append(~ok_w | fp.out_of_range_mask(W))
        bits = _any_bits(*conds, sharded=lay.shards > 1)
        fault = fault.record((bits & 1) == 1, _faults.NONFINITE_GRADIENT, t)
        for j in range(len(rule.moments)):
            fault = fault.record((bits >> (j + 1)) & 1 == 1, _faults.STATE_OVERFLOW, t, j)
        fault = fault.record((bits >> (len(rule.moments) + 1)) & 1 == 1, _faults.WEIGHT_OVERFLOW, t)
        for q in range(len(decs)):
            fault = fault.record(full[q], _faults.BUFFER_EXHAUSTED, t, q)
        return place((W, tuple(X_new), tuple(x), tuple(m), tuple(head), tuple(stacks))) + (
            path + path_t, fault), kept

    bufs = [empty_buffer(lay, decays[d.name], capacity[d.name], d.grid) for d in decs]
    init = place((W0, tuple(X0), tuple(b[0] for b in bufs), tuple(b[1] for b in bufs),
                  tuple(b[2] for b in bufs), tuple(b[3] for b in bufs))) + (
        jnp.zeros((), jnp.float64), fault)
    first, last = _split_xs(_xs(problem, hypers, decays, coding), problem.steps - store)
    mask = [kept for kept, _ in _kept_residuals(problem, theta_o, _params(problem, lay, W0, k),
                                           theta_f)] if store else ()
    carry = init
    if problem.steps > store:
        carry, _ = jax.lax.scan(step, carry, first)
    stored = ()
    if store:
        carry, stored = jax.lax.scan(lambda c, xs: step(c, xs, keep=True), carry, last)
    W, X, x, m, head, stacks, path, fault = carry
    return Forward(W, X, x, m, head, stacks, path, fault, W0, tuple(X0), coding, stored)


def _gradient_vjp(problem: Problem, theta_o, params, theta_f, t):
    """((grad_w L, path term), its VJP w.r.t. (params, theta_f)) at step t, for a kept step:
    the VJP's residuals are the outputs of the gradient's matrix products and convolutions
    (`jax.checkpoint_policies.dots_saveable`) and what it reads; the elementwise work
    between them is redone when the VJP is applied."""
    f = jax.checkpoint(lambda pp, th: problem.gradient(pp, merge(th, theta_o), t),
                       policy=jax.checkpoint_policies.dots_saveable)
    return jax.vjp(f, params, theta_f)


def _kept_residuals(problem: Problem, theta_o, params, theta_f) -> tuple:
    """Per leaf of the gradient's VJP (its residuals), (whether a kept step stores it, its
    shape and dtype). Stored: those computed from the params. The others (the params
    themselves, the minibatch, functions of theta alone) the reverse pass recomputes beside
    the stored ones from the recovered params and the step index, where the compiler keeps
    only their own computation."""
    def residuals(params, theta_f, t):
        return jax.tree_util.tree_leaves(_gradient_vjp(problem, theta_o, params, theta_f, t)[1])

    jaxpr = jax.make_jaxpr(residuals)(params, theta_f, jnp.int32(0)).jaxpr
    inputs = set(jaxpr.invars[:len(jax.tree_util.tree_leaves(params))])
    dep = set(inputs)
    for eqn in jaxpr.eqns:               # any equation reading the params, transitively
        if any(isinstance(v, jax.extend.core.Var) and v in dep for v in eqn.invars):
            dep.update(eqn.outvars)
    return tuple((isinstance(v, jax.extend.core.Var) and v in dep and v not in inputs, v.aval)
                 for v in jaxpr.outvars)


def _split_xs(xs, at: int):
    """The scan inputs of steps [0, at) and [at, T)."""
    return (jax.tree_util.tree_map(lambda a: a[:at], xs),
            jax.tree_util.tree_map(lambda a: a[at:], xs))


def _entry_adjoints(lay: Layout, cts: dict, entries: dict) -> dict:
    """Per name, the adjoints of the per-leaf entries from the adjoint of their packed spread
    (each broadcastable to [nblocks, BLOCK]): the single-value entries of every name through
    one reduction of their stack and one segment sum, the others summed over their leaf to
    their shape."""
    names = list(cts)
    single = {n: [np.size(e) == 1 for e in entries[n]] for n in names}
    full = {n: jnp.broadcast_to(cts[n], lay.shape) for n in names}
    sums = lay.sums(jnp.stack([full[n] for n in names])) if names else None   # [names, L]
    out = {}
    for j, n in enumerate(names):
        out[n] = [sums[j, i].reshape(np.shape(e)) if single[n][i]
                  else _sum_to(lay.leaf(full[n], i), np.shape(e)) for i, e in enumerate(entries[n])]
    return out


def _sum_to(x: jax.Array, shape: tuple) -> jax.Array:
    """Sum x [*S] down to `shape` (broadcastable to S): the adjoint of broadcasting."""
    lead = x.ndim - len(shape)
    x = jnp.sum(x, axis=tuple(range(lead))) if lead else x
    ones = tuple(i for i, (a, b) in enumerate(zip(shape, x.shape)) if a == 1 and b != 1)
    return jnp.sum(x, axis=ones, keepdims=True) if ones else x


def _before(rule, new: dict, g, sv: _Step) -> dict:
    """The moments before a step, in float, from those after it and the gradient (for the
    adjoint only; the exact state is recovered in fixed point)."""
    prev = {}
    for mo in reversed(rule.moments):
        prefix = {m.name: new[m.name] for m in rule.moments[:rule.moments.index(mo)]}
        x = new[mo.name] - rule.increment(mo.name, g, prefix, sv.h, sv.d, sv.c, sv.k)
        prev[mo.name] = x / sv.d[mo.decay] if mo.decay is not None else x
    return prev


def backward(p: Prepared, method: "Reversible", fw: Forward, theta_f, theta_o, hypers: dict,
             decays: dict, count0, ct_w: list, ct_s: dict, ct_path) -> Backward:
    """Run the training backwards from `fw`, accumulating the hypergradients; the steps
    `fw.stored` kept use their gradient and VJP residuals instead of recomputing them."""
    problem, rule, k = p.problem, p.rule, method.frac_bits
    lay, place = layout(p), _sharding.placer(p.mesh)
    decs = rule.decays()
    di = {d.name: j for j, d in enumerate(decs)}
    zeros = lambda tree: jax.tree_util.tree_map(jnp.zeros_like, tree)
    wd = rule.weight_decay_name
    names = [mo.name for mo in rule.moments]

    def step(carry, xs, kept=None):
        W, X, x, m, head, dw, dX, dth, dh_c, dd_c, fault = carry
        t, h_sl, d_sl, code_sl = xs
        x, m, head = list(x), list(m), list(head)
        codes = [_schedules.at_step(fw.coding[j], code_sl[j]) for j in range(len(decs))]
        sv = _step_values(lay, hypers, decays, h_sl, d_sl, (count0 + t + 1).astype(jnp.float64))
        new = {mo.name: _to_float(mo, X[j], k) for j, mo in enumerate(rule.moments)}
        W = W - _update(rule, method, new, sv, t, k)[0]
        under = jnp.zeros((), bool)
        if wd is not None:
            q = di[wd]
            W, x[q], m[q], head[q], e = _divide(lay, W, x[q], m[q], head[q], fw.stacks[q],
                                                codes[q], decs[q].grid, ones)
            under |= e
        w_t = fp.to_float(W, k)
        params = problem.treedef.unflatten([l.astype(dt) for l, dt in
                                            zip(lay.unpack(w_t), problem.dtypes)])

        def adjoint(prev, g):
            """The VJP of the rule's float step at (w_t, prev, g): (dw, dmoments, dg, and the
            adjoints of the hyperparameters' and decays' entries)."""
            # hyperparameters and decays enter at full shape, so their adjoints come out as
            # elementwise products (no reduction per name inside the VJP) and
            # `_entry_adjoints` reduces them all in one pass
            full = lambda a: jnp.broadcast_to(a, lay.shape)
            reads = {n: full(sv.h[n]) for n in (rule.step_reads or sv.h)}
            _, vjp = jax.vjp(lambda w, s, g, h, d: rule.float_step(w, s, g, h, d, sv.k),
                             w_t, prev, g, reads, {n: full(a) for n, a in sv.d.items()})
            dw_p, ds, dg, dh, dd = vjp((dw, dict(zip(names, dX))))
            adj = _entry_adjoints(lay, {**{("h", n): a for n, a in dh.items()},
                                        **{("d", n): a for n, a in dd.items()}},
                                  {**{("h", n): sv.h_entries[n] for n in dh},
                                   **{("d", n): e for n, e in sv.d_entries.items()}})
            # hyperparameters the step reads only through its decays: their adjoint comes
            # from the decays' (outside the reversal, by JAX)
            zero = {n: [jnp.zeros(np.shape(e), jnp.float64) for e in sv.h_entries[n]]
                    for n in sv.h_entries if n not in dh}
            return (dw_p, ds, dg, {**{n: adj[("h", n)] for n in dh}, **zero},
                    {n: adj[("d", n)] for n in dd})

        def cotangent(dg):
            return (problem.treedef.unflatten([c.astype(dt) for c, dt in
                                               zip(lay.unpack(dg), problem.dtypes)]),
                    jnp.asarray(ct_path, path_dtype))

        if rule.affine_in_gradient:
            # g's cotangent reads neither g nor the state: form it before g is recomputed, and
            # take the rest of the adjoint after the exact state is recovered
            ct = cotangent(adjoint(new, jnp.zeros_like(w_t))[2])
            ct_fn = lambda out: (ct, None)
        else:
            def ct_fn(out):
                g = lay.pack(jax.tree_util.tree_leaves(out[0]), jnp.float64)
                dw_p, ds, dg, dhe, dde = adjoint(_before(rule, new, g, sv), g)
                return cotangent(dg), (dw_p, ds, dhe, dde)

        if kept is None:
            (g_tree, _), (hw, hth), extra = gradient(method, problem, params, theta_f, theta_o,
                                                     t, ct_fn)
        else:
            # a kept step: the forward pass's gradient (the same bits, so the state below is
            # recovered exactly) and its VJP at the residuals the forward pass kept
            g_leaves, stored = kept
            g_tree = problem.treedef.unflatten(g_leaves)
            ct, extra = ct_fn((g_tree, None))
            res, tree = jax.tree_util.tree_flatten(
                _gradient_vjp(problem, theta_o, params, theta_f, t)[1])
            stored = iter(stored)
            res = [next(stored) if kept_leaf else r for r, kept_leaf in zip(res, mask)]
            hw, hth = jax.tree_util.tree_unflatten(tree, res)(ct)
        g = place(lay.pack(jax.tree_util.tree_leaves(g_tree), jnp.float64)) / ones   # one kernel
        X = list(X)
        for j in reversed(range(len(rule.moments))):
            mo = rule.moments[j]
            prefix = {mm.name: new[mm.name] for mm in rule.moments[:j]}
            dXj, _ = _quantize(mo, rule.increment(mo.name, g, prefix, sv.h, sv.d, sv.c, sv.k), k)
            X[j] = _sub(mo, X[j], dXj)
            if mo.decay is not None:
                q = di[mo.decay]
                X[j], x[q], m[q], head[q], e = _divide(lay, X[j], x[q], m[q], head[q],
                                                       fw.stacks[q], codes[q], decs[q].grid, ones,
                                                       mo.wide)
                under |= e
        if rule.affine_in_gradient:
            prev = {mo.name: _to_float(mo, X[j], k) for j, mo in enumerate(rule.moments)}
            dw_p, ds, _, dhe, dde = adjoint(prev, g)
        else:
            dw_p, ds, dhe, dde = extra
        dw = dw_p + lay.pack(jax.tree_util.tree_leaves(hw), jnp.float64)
        dX = tuple(ds[n] for n in names)
        dth = jax.tree_util.tree_map(lambda a, b: a + b.astype(a.dtype), dth, hth)
        fault = fault.record(under, _faults.BUFFER_UNDERFLOW, t)
        # every weight's dw enters the adjoints of the hyperparameters (through the update,
        # which reads one: lr), so their sum, made from values computed anyway, tells whether
        # the step's VJP left dw non-finite (inf * 0 is nan)
        total = sum(jnp.sum(e) for e in jax.tree_util.tree_leaves((dhe, dde)))
        fault = fault.record(~jnp.isfinite(total), _faults.NONFINITE_COTANGENT, t + 1)
        dh_c = {n: tuple(None if c is None else a + e.astype(a.dtype) for c, a, e in
                         zip(hypers[n].constant, dh_c[n], dhe[n])) for n in hypers}
        dd_c = {n: tuple(None if c is None else a + e.astype(a.dtype) for c, a, e in
                         zip(decays[n].constant, dd_c[n], dde[n])) for n in decays}
        ys = ({n: tuple(None if s is None else e.astype(s.dtype) for s, e in
                        zip(hypers[n].stepwise, dhe[n])) for n in hypers},
              {n: tuple(None if s is None else e.astype(s.dtype) for s, e in
                        zip(decays[n].stepwise, dde[n])) for n in decays})
        W, X, x, m, head, dw, dX = place((W, tuple(X), tuple(x), tuple(m), tuple(head), dw, dX))
        return (W, X, x, m, head, dw, dX, dth, dh_c, dd_c, fault), ys

    path_dtype = jax.eval_shape(lambda pp: problem.gradient(pp, merge(theta_f, theta_o), jnp.int32(0)),
                                _params(problem, lay, fw.W, k))[1].dtype
    ones = _ones(fp.to_float(fw.W0, k))
    ct = lay.pack([jnp.asarray(c, jnp.float64) for c in ct_w])
    dX0 = tuple(lay.pack([jnp.asarray(c, jnp.float64) for c in ct_s[n]]) for n in names)
    init = place((fw.W, fw.X, fw.x, fw.m, fw.head, ct, dX0)) + (
        zeros(theta_f), {n: zeros(s.constant) for n, s in hypers.items()},
        {n: zeros(s.constant) for n, s in decays.items()}, _faults.Fault.none())
    store = fw.stored[0][0].shape[0] if fw.stored else 0
    mask = [kept for kept, _ in _kept_residuals(problem, theta_o, _params(problem, lay, fw.W0, k),
                                           theta_f)] if store else ()
    first, last = _split_xs(_xs(problem, hypers, decays, fw.coding), problem.steps - store)
    carry, ys = init, []
    if store:
        carry, ys_last = jax.lax.scan(lambda c, xs: step(c, xs[0], xs[1]), carry,
                                      (last, fw.stored), reverse=True)
        ys.append(ys_last)
    if problem.steps > store:
        carry, ys_first = jax.lax.scan(step, carry, first, reverse=True)
        ys.insert(0, ys_first)
    dh_s, dd_s = ys[0] if len(ys) == 1 else jax.tree_util.tree_map(
        lambda a, b: jnp.concatenate([a, b]), ys[0], ys[1])
    W, X, x, m, head, dw, dX, dth, dh_c, dd_c, fault = carry
    fault = fault.record(~jnp.all(jnp.isfinite(dw)), _faults.NONFINITE_COTANGENT, 0)
    exact = jnp.all(W == fw.W0)
    for mo, a, b in zip(rule.moments, X, fw.X0):
        exact &= _equal(mo, a, b)
    for j, dec in enumerate(decs):
        exact &= _buffer.at_start(x[j], m[j], head[j], dec.grid)
    fault = fault.record(~exact, _faults.REVERSAL_DRIFT, 0)
    dh = {n: _schedules.Schedule(dh_c[n], dh_s[n]) for n in hypers}
    dd = {n: _schedules.Schedule(dd_c[n], dd_s[n]) for n in decays}
    return Backward(lay.unpack(dw), {n: lay.unpack(a) for n, a in zip(names, dX)}, dth, dh, dd,
                    W, X, x, m, head, fault)


_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def _budget_bytes(budget) -> int | None:
    """A string budget ("512MiB", "2GB", "100000B") in bytes; None for a step count."""
    fix = ("budget must be a number of steps (an int >= 0) or a size in bytes as a string "
           "with a unit, e.g. 500, '512MiB' or '2GB'")
    if budget is None or (isinstance(budget, int) and not isinstance(budget, bool)
                          and budget >= 0):
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([KMGT]i?B|B)\s*", budget, re.IGNORECASE) \
        if isinstance(budget, str) else None
    if m is None:
        raise ValueError(f"Reversible(budget={budget!r}): {fix}.")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def _batched(p: Prepared) -> bool:
    """Whether `train` is being traced under `jax.vmap` (an input is a batch tracer)."""
    def batched(x, depth=0):
        # a tracer of grad or jvp under vmap wraps the batch tracer (its primal)
        if not isinstance(x, jax.core.Tracer) or depth > 8:
            return False
        if type(x).__name__ == "BatchTracer":
            return True
        return any(batched(getattr(x, a, None), depth + 1) for a in ("primal", "val"))

    trees = (p.params0, p.state0, p.theta, p.hypers, p.decays)
    return any(batched(l) for l in jax.tree_util.tree_leaves(trees))


@dataclasses.dataclass(frozen=True)
class Reversible:
    """Exact reversal in fixed point with an information buffer per decay.

    Args:
      frac_bits: fractional bits k of the weights' fixed point (and of the moments', plus
        each moment's `scale`, e.g. 2 for Adam's s); weights must stay within
        |w| < 2^(62 - k) (1024 for the default 52).
      min_decay: lower bounds on decays that are traced (under `jax.grad` w.r.t. them, or
        `jax.jit` with them as arguments), used to size their buffers: a number for every
        decay, or a dict by decay name (momentum: "momentum"; Adam: "b1", "b2",
        "decoupled_decay" for 1 - lr * weight_decay; RMSProp: "decay", "momentum"). A
        decay whose values are concrete is sized from them and needs no bound.
      min_momentum: `min_decay={"momentum": min_momentum}` (revlearn 0.1's spelling).
      extra_words: slack words per weight on top of the size the schedule needs (that
        size is exact, so 0 suffices).
      isolate_gradient: compute grad_w L in both passes as an isolated computation (the
        branch of a `lax.cond`, see `_problem.isolated_gradient`), so the compiler cannot
        fuse it with its neighbours differently backwards (e.g. contract a*b + c into an
        FMA in one pass only), which would break the reversal. With False both passes
        inline the plain gradient and its VJP. Drift is always detected and raised, never
        returned.
      vjp_in_branch: with `isolate_gradient`, apply the gradient's VJP (the Hessian-vector
        product) inside the reverse pass's isolated branch (True), or beside it (False: the
        branch is then the forward pass's computation exactly, and the VJP recomputes the
        loss's forward and backward pass, one more gradient's work per step). None
        (default): True on CPU, False on GPU and other accelerators (on a GPU the gradient
        compiled beside its VJP rounded differently from the forward pass's; see
        `benchmarks/results/exactness_gpu.md`) and under `jax.vmap` (where it did on CPU
        for Adam and RMSProp; a vmap applied outside a `jax.jit` of train cannot be seen, so
        pass False there if the reversal reports drift; so did the toy experiment's
        elementwise 2-D loss on CPU). Convolutions on GPU also need
        XLA_FLAGS=--xla_gpu_deterministic_ops=true.
      budget: memory that buys speed: the forward pass keeps the gradient and its VJP's
        residuals (the outputs of its matrix products computed from the weights; the
        weights, the minibatch and the rest are recomputed) for as many of the last steps
        as fit, and the reverse pass applies those VJPs instead
        of recomputing the gradient (still exact: the kept gradient is the one the forward
        pass applied). A number of steps (int >= 0, at most T is used), or a size in
        bytes as a string, e.g. "512MiB" or "2GB" (`revlearn.buffer_usage(...)
        .kept_step_bytes` is the cost of one step; under `jax.vmap` it is per vmapped
        problem). None or 0 (default):
        nothing kept, every gradient recomputed. With all T steps kept, memory grows
        like `Unrolled`'s, O(T P), but less per step. Kept steps compute the
        gradient beside its residuals instead of isolated, so w_T may differ from the
        budget-0 run's in the last bits (the reversal is exact either way).

    Memory per weight: W, each moment, each decay's x and the loops' array of ones (8 bytes
    each, each leaf padded to whole rows of 64), plus the words, sum_t log2(1/d_t) /
    word_bits per decay; with a budget, the kept steps' gradients and residuals on top.

    Raises:
      ValueError: (at construction) a field out of range, e.g. frac_bits outside [8, 60]
        or a bound outside (0, 1); (in `train`) a traced decay without a bound.
      RuntimeError: (in `train`) JAX's 64-bit mode is off.
      ReversibleError: (in `train`) a fault while training or reversing.

    Example:
        ```python
        # the momentum is differentiated, so it is traced: bound it to size the buffer
        d_m = jax.grad(lambda m: meta_fn(revlearn.sgd(
            loss_fn, params0, hypers, lr=0.1, momentum=m, steps=1000,
            method=revlearn.Reversible(min_momentum=0.5))))(0.9)
        ```
    """

    frac_bits: int = 52
    min_momentum: float | None = None
    extra_words: int = 0
    isolate_gradient: bool = True
    vjp_in_branch: bool | None = None
    min_decay: float | dict | None = None
    budget: int | str | None = None

    def __post_init__(self):
        if isinstance(self.frac_bits, bool) or not isinstance(self.frac_bits, int) \
                or not 8 <= self.frac_bits <= 60:
            raise ValueError(f"Reversible(frac_bits={self.frac_bits!r}): frac_bits must be an "
                             "integer in [8, 60] (52 gives range |x| < 1024 and step 2^-52).")
        if self.min_momentum is not None and not (0 < float(self.min_momentum) < 1):
            raise ValueError(f"Reversible(min_momentum={self.min_momentum!r}): must lie in (0, 1).")
        bounds = (self.min_decay.values() if isinstance(self.min_decay, dict)
                  else [] if self.min_decay is None else [self.min_decay])
        for b in bounds:
            if not isinstance(b, (int, float)) or not 0 < float(b) < 1:
                raise ValueError(f"Reversible(min_decay={self.min_decay!r}): every bound must be a "
                                 "number in (0, 1), e.g. min_decay=0.5 or {'b1': 0.5}.")
        if isinstance(self.extra_words, bool) or not isinstance(self.extra_words, int) \
                or self.extra_words < 0:
            raise ValueError(f"Reversible(extra_words={self.extra_words!r}): must be an integer >= 0.")
        if not isinstance(self.isolate_gradient, bool):
            raise ValueError(f"Reversible(isolate_gradient={self.isolate_gradient!r}): must be True "
                             "or False.")
        if self.vjp_in_branch is not None and not isinstance(self.vjp_in_branch, bool):
            raise ValueError(f"Reversible(vjp_in_branch={self.vjp_in_branch!r}): must be True, "
                             "False or None (None: True on CPU, False on accelerators).")
        _budget_bytes(self.budget)                  # raises on a malformed budget

    def step_bytes(self, p: Prepared, theta_f, theta_o) -> int:
        """Bytes one kept step takes (`budget`): its gradient and its VJP's residuals."""
        problem = p.problem
        gradient = [jax.ShapeDtypeStruct(s, dt) for s, dt in zip(problem.shapes, problem.dtypes)]
        params = problem.treedef.unflatten(gradient)
        stored = [a for kept, a in _kept_residuals(problem, theta_o, params, theta_f) if kept]
        return sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in stored + gradient)

    def kept_steps(self, p: Prepared, theta_f=None, theta_o=None) -> int:
        """How many of the last steps the forward pass keeps for the reverse pass (`budget`)."""
        steps = p.problem.steps
        if isinstance(self.budget, str):
            if theta_f is None:
                theta_f, theta_o = split_inexact(p.theta)
            per = self.step_bytes(p, theta_f, theta_o)
            return min(steps, _budget_bytes(self.budget) // max(per, 1))
        return min(steps, self.budget or 0)

    def _vjp_in_branch(self) -> bool:
        """Whether the reverse pass applies the VJP inside the isolated branch (see the field)."""
        if self.vjp_in_branch is not None:
            return bool(self.vjp_in_branch)
        return jax.default_backend() == "cpu"

    def bound(self, decay: str):
        """The declared lower bound of a decay, or None."""
        if isinstance(self.min_decay, dict) and decay in self.min_decay:
            return float(self.min_decay[decay])
        if decay == "momentum" and self.min_momentum is not None:
            return float(self.min_momentum)
        if isinstance(self.min_decay, (int, float)) and not isinstance(self.min_decay, bool):
            return float(self.min_decay)
        return None

    def capacity(self, p: Prepared) -> dict:
        """Static stack rows (words per weight) per decay, one number per params leaf."""
        steps, out = p.problem.steps, {}
        for dec in p.rule.decays():
            sched, g, bound = p.decays[dec.name], dec.grid, self.bound(dec.name)
            if bound is not None:
                n = max(g.min_numerator, round(bound * g.denominator))
                total = steps * int(_buffer.increments_np(n, g))
                out[dec.name] = tuple(_buffer.capacity_words(total, g) + self.extra_words
                                      for _ in sched.constant)
                continue
            if not _schedules.is_concrete(sched):
                hint = ("revlearn.Reversible(min_momentum=0.5)" if dec.name == "momentum"
                        and p.rule.name == "momentum" else
                        f"revlearn.Reversible(min_decay={{'{dec.name}': 0.999}}) (which covers "
                        "lr * weight_decay <= 1e-3)" if dec.allow_one else
                        f"revlearn.Reversible(min_decay={{'{dec.name}': 0.5}})")
                raise ValueError(
                    f"Reversible() cannot size the information buffer of {dec.describe or dec.name}: "
                    "it is traced (under jax.grad/jax.jit/jax.vmap), so its values are unknown "
                    "when the program is built. Pass a lower bound on every value it takes, e.g. "
                    f"{hint}.")
            caps = []
            for c, s in zip(sched.constant, sched.stepwise):
                if c is not None:
                    inc = _buffer.increments_np(_grid.numerators_np(c, g), g)
                    total = steps * int(np.max(inc, initial=0))       # an empty leaf needs none
                else:
                    inc = _buffer.increments_np(_grid.numerators_np(s, g), g)
                    total = int(np.sum(inc.reshape(steps, -1).max(axis=1, initial=0)))
                caps.append(_buffer.capacity_words(total, g) + self.extra_words)
            out[dec.name] = tuple(caps)
        return out

    def info(self, p: Prepared, capacity: dict) -> dict:
        """What fault messages need: frac_bits, names, capacities and bounds per decay."""
        return dict(frac_bits=self.frac_bits, names=_faults.names(p.rule, self.frac_bits),
                    capacity={n: max(c, default=0) for n, c in capacity.items()},
                    bounds={d.name: (self.bound(d.name) if self.bound(d.name) is not None
                                     else "its values") for d in p.rule.decays()})

    def solve(self, p: Prepared):
        """Train; returns (w_T, state_T, path sum), differentiable by exact reversal."""
        require_x64("revlearn.Reversible")
        if p.rule is None:
            raise TypeError("Reversible() needs a revlearn.optim rule (got an optax transform).")
        if self.vjp_in_branch is None and _batched(p):
            # Under jax.vmap the batched gradient compiled beside its VJP in one branch
            # rounded differently from the forward pass's (Adam, RMSProp on CPU): take the
            # VJP beside the branch, which then is the forward pass's computation exactly.
            return dataclasses.replace(self, vjp_in_branch=False).solve(p)
        rule, problem = p.rule, p.problem
        capacity = self.capacity(p)
        theta_f, theta_o = split_inexact(p.theta)
        where = f"revlearn.train(optimizer=optim.{rule.name}, method=Reversible())"
        _determinism.warn_if_nondeterministic(problem, p.params0, p.theta, where)
        _determinism.warn_if_sharded_nondeterministic(p.mesh, where)
        info = self.info(p, capacity)
        lay = layout(p)
        names = [mo.name for mo in rule.moments]
        count0 = p.state0.get("count", jnp.int32(0))

        def final(fw):
            k = self.frac_bits
            unpack = lambda x: [a.astype(dt) for a, dt in zip(lay.unpack(x), problem.dtypes)]
            return (unpack(fp.to_float(fw.W, k)),
                    {n: unpack(_to_float(mo, X, k)) for n, X, mo in zip(names, fw.X, rule.moments)})

        def fwd_pass(w0, s0, count0, theta_f, theta_o, hypers, decays, store=0):
            fw = forward(p, self, capacity, w0, s0, count0, theta_f, theta_o, hypers, decays,
                         store)
            _faults.raise_if_fault(fw.fault, where, **info)
            return fw

        @jax.custom_vjp
        def run(w0, s0, count0, theta_f, theta_o, hypers, decays):
            fw = fwd_pass(w0, s0, count0, theta_f, theta_o, hypers, decays)
            return final(fw) + (fw.path,)

        def run_fwd(w0, s0, count0, theta_f, theta_o, hypers, decays):
            fw = fwd_pass(w0, s0, count0, theta_f, theta_o, hypers, decays,
                          self.kept_steps(p, theta_f, theta_o))
            return final(fw) + (fw.path,), (fw, count0, theta_f, theta_o, hypers, decays)

        def run_bwd(res, cts):
            fw, count0, theta_f, theta_o, hypers, decays = res
            ct_w, ct_s, ct_path = cts
            bw = backward(p, self, fw, theta_f, theta_o, hypers, decays, count0, ct_w, ct_s, ct_path)
            _faults.raise_if_fault(bw.fault, where + " (reverse pass)", **info)
            float0 = lambda tree: jax.tree_util.tree_map(
                lambda x: np.zeros(np.shape(x), jax.dtypes.float0), tree)
            dw0 = [d.astype(dt) for d, dt in zip(bw.dw, problem.dtypes)]
            ds0 = {n: [d.astype(dt) for d, dt in zip(bw.dX[n], problem.dtypes)] for n in names}
            return dw0, ds0, float0(count0), bw.dtheta, float0(theta_o), bw.dh, bw.dd

        run.defvjp(run_fwd, run_bwd)
        leaves = lambda tree: [jnp.asarray(l) for l in jax.tree_util.tree_leaves(tree)]
        s0 = {n: leaves(p.state0[n]) for n in names}
        # Sharded: w_T and state_T keep params0's shardings where they are known (see
        # `revlearn.train` for explicit meshes)
        shardings = _sharding.known_shardings(jax.tree_util.tree_leaves(p.params0))
        wT, sT, path = run(leaves(p.params0), s0, count0, theta_f, theta_o, p.hypers,
                           decay_values(p))
        wT = _sharding.constrain(wT, shardings)
        sT = {n: _sharding.constrain(sT[n], shardings) for n in names}
        state = {n: problem.treedef.unflatten(sT[n]) for n in names}
        if rule.counted:
            state["count"] = count0 + problem.steps
        return problem.treedef.unflatten(wT), rule.State(**state), path
