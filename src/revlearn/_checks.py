"""Checks users run on their own problems (like autograd's `check_grads`), for every rule.

* `check_reversal`: train forward, run backwards, and compare the recovered
  weights, optimiser state and buffers with the initial ones bit-for-bit.
* `check_hypergradients`: the meta-gradient of `meta_fn(train(...))` by
  `Reversible`, by `Unrolled`, and by central finite differences along a random
  direction per argument (params0, hypers, each hyperparameter of the rule);
  reports the relative errors.
* `buffer_usage`: bits per weight per step the buffers hold after training,
  beside the information-theoretic minimum mean_t sum_j log2(1 / d_j,t).
* `self_check`: all of the above on small built-in problems (`revlearn check`).

Each takes the rule as `optimizer=` (or momentum's `lr=`, `momentum=`, `v0=`)
and faults exactly where `train` does: a run that `train` would stop with a
`ReversibleError` is never reported as exact.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from . import _faults, _pytrees, _sharding, optim
from ._problem import decay_values, merge, split_inexact
from ._train import prepare, train
from .exact import _buffer, _determinism, _grid
from .exact._layout import Layout
from .methods import _reversible
from .methods._reversible import Reversible
from .methods._unrolled import Unrolled


def _leaves(tree) -> list:
    return [jnp.asarray(l) for l in jax.tree_util.tree_leaves(tree)]


def _setup(where, method, loss_fn, params0, hypers, kw):
    """(method, prepared arguments, buffer capacity, fault info): what the forward pass needs."""
    method = method or Reversible()
    _reversible.require_x64(where)
    p = prepare(loss_fn, params0, hypers, **kw)
    if p.rule is None:
        raise TypeError(f"{where} needs a revlearn.optim rule, not an optax transform.")
    _determinism.warn_if_nondeterministic(p.problem, p.params0, p.theta, where)
    capacity = method.capacity(p)
    return method, p, capacity, method.info(p, capacity)


def _forward(p, method, capacity):
    theta_f, theta_o = split_inexact(p.theta)
    names = [m.name for m in p.rule.moments]

    def fw(w0, s0, count0, theta_f, theta_o, hypers, decays):
        return _reversible.forward(p, method, capacity, w0, s0, count0, theta_f, theta_o,
                                   hypers, decays)
    args = (_leaves(p.params0), {n: _leaves(p.state0[n]) for n in names},
            p.state0.get("count", jnp.int32(0)), theta_f, theta_o, p.hypers, decay_values(p))
    return fw, args


@dataclasses.dataclass(frozen=True)
class ReversalCheck:
    """What `check_reversal` returns: whether the reversal recovered the initial state
    bit-for-bit.

    Attributes:
      weights_exact: the weights came back bit-for-bit.
      state_exact: every moment of the optimiser state did.
      buffer_empty: every information buffer is back to its initial (empty) state.
      max_weight_error_ulps: the largest weight error, in units of 2^-frac_bits (0 when
        exact).
      passed: all three hold.
    """

    weights_exact: bool
    state_exact: bool
    buffer_empty: bool
    max_weight_error_ulps: int

    @property
    def velocity_exact(self) -> bool:
        """`state_exact` (revlearn 0.1's name, from momentum's velocity)."""
        return self.state_exact

    @property
    def passed(self) -> bool:
        return self.weights_exact and self.state_exact and self.buffer_empty


@_sharding.with_auto_axes
def check_reversal(loss_fn, params0, hypers=None, *, steps, optimizer=None, lr=None,
                   momentum=None, v0=None, state0=None,
                   method: Reversible | None = None) -> ReversalCheck:
    """Train `steps` steps in fixed point, reverse them, compare with the start bit-for-bit.

    Args:
      loss_fn: `loss_fn(params, hypers, step) -> scalar`, as for `revlearn.train`.
      params0: the initial weights (any pytree of float arrays, or an Equinox module).
      hypers: any pytree read by the loss.
      steps: T, a Python int >= 1.
      optimizer: a `revlearn.optim` rule (optax transforms are refused: they do not
        reverse).
      lr: with `momentum`, the spelling `lr=..., momentum=...` of
        `optimizer=revlearn.optim.momentum(lr, momentum)`.
      momentum: see `lr`.
      v0: momentum's initial velocity (zeros if None).
      state0: the initial optimiser state, as for `train`.
      method: the `Reversible()` to check (its defaults if None).

    Returns:
      A `ReversalCheck`: whether the weights, the optimiser state and the buffers came back
      bit-for-bit (`.passed`), and the largest weight error in units of 2^-frac_bits.

    Raises:
      ReversibleError: where `train` would (a fault in either pass other than the drift
        this check measures, which it reports instead).
      ValueError, TypeError: bad arguments, as `train`; a TypeError for an optax transform.

    Example:
        ```python
        check = revlearn.check_reversal(loss_fn, params0, hypers, steps=100,
                                        optimizer=revlearn.optim.adam(1e-3))
        assert check.passed, check
        ```
    """
    where = "check_reversal"
    method, p, capacity, info = _setup(where, method, loss_fn, params0, hypers, dict(
        optimizer=optimizer, lr=lr, momentum=momentum, v0=v0, state0=state0, steps=steps))
    fw_fn, args = _forward(p, method, capacity)
    names = [m.name for m in p.rule.moments]

    @jax.jit
    def roundtrip(w0, s0, count0, theta_f, theta_o, hypers, decays):
        fw = fw_fn(w0, s0, count0, theta_f, theta_o, hypers, decays)
        zero = [jnp.zeros(jnp.shape(w), jnp.float64) for w in w0]
        bw = _reversible.backward(p, method, fw, theta_f, theta_o, hypers, decays, count0, zero,
                                  {n: zero for n in names}, 0.0)
        err = jnp.max(jnp.abs(bw.W - fw.W0), initial=0)
        state = jnp.ones((), bool)
        for mo, a, b in zip(p.rule.moments, bw.X, fw.X0):
            state &= _reversible._equal(mo, a, b)
        return (fw.fault, bw.fault, jnp.all(bw.W == fw.W0), state, bw.buffer_empty(p.rule), err)

    f_fault, b_fault, w, s, b, err = roundtrip(*args)
    _faults.raise_now(f_fault, where, **info)
    if int(b_fault.code) != _faults.REVERSAL_DRIFT:
        _faults.raise_now(b_fault, where + " (reverse pass)", **info)
    return ReversalCheck(bool(w), bool(s), bool(b), int(err))


@dataclasses.dataclass(frozen=True)
class BufferUsage:
    """What `buffer_usage` returns: the buffers' size after training, per weight per step,
    against the minimum.

    Attributes:
      bits_per_weight_per_step: the bits the buffers hold, summed over decays.
      ideal_bits_per_weight_per_step: the minimum, mean_t sum_decays log2(1 / decay_t).
      capacity_words: the words per weight reserved (the largest over decays and leaves).
      max_words_used: the words per weight used (the largest over decays and leaves).
      per_decay: (name, bits, ideal bits) per weight per step, for each decay.
      kept_step_bytes: the bytes one step kept by `Reversible(budget=...)` takes (its
        gradient and VJP residuals), to size a budget.
      kept_steps: how many of the last steps the method's budget keeps (0 without one).
      ratio: bits / ideal bits.
    """

    bits_per_weight_per_step: float
    ideal_bits_per_weight_per_step: float
    capacity_words: int
    max_words_used: int
    per_decay: tuple = ()
    kept_step_bytes: int = 0
    kept_steps: int = 0

    @property
    def ratio(self) -> float:
        return self.bits_per_weight_per_step / self.ideal_bits_per_weight_per_step


@_sharding.with_auto_axes
def buffer_usage(loss_fn, params0, hypers=None, *, steps, optimizer=None, lr=None, momentum=None,
                 v0=None, state0=None, method: Reversible | None = None) -> BufferUsage:
    """Run the forward pass and measure the information buffers against their minimum.

    Args:
      loss_fn: `loss_fn(params, hypers, step) -> scalar`, as for `revlearn.train`.
      params0: the initial weights (any pytree of float arrays, or an Equinox module).
      hypers: any pytree read by the loss.
      steps: T, a Python int >= 1.
      optimizer: a `revlearn.optim` rule (optax transforms are refused: they do not
        reverse).
      lr: with `momentum`, the spelling `lr=..., momentum=...` of
        `optimizer=revlearn.optim.momentum(lr, momentum)`.
      momentum: see `lr`.
      v0: momentum's initial velocity (zeros if None).
      state0: the initial optimiser state, as for `train`.
      method: the `Reversible()` whose buffers are measured (its defaults if None).

    Returns:
      A `BufferUsage`: bits per weight per step held after training, against the minimum
      mean_t sum_decays log2(1 / decay_t), per decay and in total.

    Raises:
      ReversibleError: where `train` would (e.g. an exhausted buffer).
      ValueError, TypeError: bad arguments, as `train`.

    Example:
        ```python
        usage = revlearn.buffer_usage(loss_fn, params0, hypers, steps=100,
                                      optimizer=revlearn.optim.momentum(0.1, 0.9))
        print(usage.bits_per_weight_per_step, usage.ideal_bits_per_weight_per_step)
        # 0.15207 0.15201: within 0.1% of log2(1 / 0.9)
        print(usage.kept_step_bytes)    # what one step of Reversible(budget=...) takes
        ```
    """
    where = "buffer_usage"
    method, p, capacity, info = _setup(where, method, loss_fn, params0, hypers, dict(
        optimizer=optimizer, lr=lr, momentum=momentum, v0=v0, state0=state0, steps=steps))
    fw_fn, args = _forward(p, method, capacity)
    decs = p.rule.decays()
    lay = Layout.of(p.problem.shapes)
    sizes = lay.sizes

    @jax.jit
    def run(*a):
        fw = fw_fn(*a)
        # bits reserved per weight: a leaf's m and head are one value for all its
        # weights or one per weight on its rows (padding excluded)
        totals, words = [], []
        for j, dec in enumerate(decs):
            total = jnp.zeros((), jnp.float64)
            for i, (m, head) in enumerate(zip(fw.m[j], fw.head[j])):
                bits = _buffer.bits_reserved(head, m, dec.grid)
                total += (bits * sizes[i] if bits.ndim == 0
                          else jnp.sum(bits.reshape(-1)[:sizes[i]]))
            totals.append(total / sum(sizes))
            words.append(jnp.max(jnp.stack([jnp.max(h, initial=0) for h in fw.head[j]])))
        return fw.fault, totals, words

    fault, bits, words = run(*args)
    _faults.raise_now(fault, where, **info)
    # Ideal: mean over weights and steps of log2(2^d / n); broadcasting replicates a
    # schedule entry uniformly, so each leaf's mean equals the mean of its entry.
    per, ideal_total = [], 0.0
    for j, dec in enumerate(decs):
        total, count = 0.0, 0
        sched = p.decays[dec.name]
        for c, s, size in zip(sched.constant, sched.stepwise, sizes):
            if size == 0:
                continue
            a = np.asarray(c if c is not None else s, np.float64)
            n = np.clip(_grid.numerators_np(a, dec.grid), dec.grid.min_numerator,
                        dec.grid.denominator)
            total += size * float(np.mean(np.log2(dec.grid.denominator / n)))
            count += size
        ideal = total / max(count, 1)
        per.append((dec.name, float(bits[j]) / steps, ideal))
        ideal_total += ideal
    cap = max((max(c, default=0) for c in capacity.values()), default=0)
    return BufferUsage(sum(b for _, b, _ in per), ideal_total, cap,
                       int(max((int(w) for w in words), default=0)), tuple(per),
                       method.step_bytes(p, *split_inexact(p.theta)), method.kept_steps(p))


@dataclasses.dataclass(frozen=True)
class GradCheck:
    """What `check_hypergradients` returns: relative errors of the Reversible
    hypergradient, per argument.

    Attributes:
      names: the arguments checked: "params0", "hypers" and the rule's hyperparameters.
      rel_err_unrolled: ||g_rev - g_unrolled|| / ||g_unrolled||, per argument.
      rel_err_fd: |<g_rev, u> - FD_u| / max(|FD_u|, |<g_rev, u>|), per argument.
      fd_step: the finite-difference step used, per argument.
      rtol_unrolled: the tolerance against Unrolled.
      rtol_fd: the tolerance against finite differences.
      passed: every error within its tolerance.
    """

    names: tuple
    rel_err_unrolled: tuple      # ||g_rev - g_unr|| / ||g_unr||
    rel_err_fd: tuple            # |<g_rev, u> - FD_u| / max(|FD_u|, tiny)
    fd_step: tuple
    rtol_unrolled: float
    rtol_fd: float

    @property
    def passed(self) -> bool:
        return (all(e <= self.rtol_unrolled for e in self.rel_err_unrolled)
                and all(e <= self.rtol_fd for e in self.rel_err_fd))

    def __str__(self) -> str:
        lines = [f"{'argument':<14} {'rev vs unrolled':>16} {'rev vs central FD':>18} {'FD step':>9}"]
        for n, a, b, h in zip(self.names, self.rel_err_unrolled, self.rel_err_fd, self.fd_step):
            lines.append(f"{n:<14} {a:>16.2e} {b:>18.2e} {h:>9.1e}")
        lines.append(f"tolerances: {self.rtol_unrolled:.0e} (unrolled), {self.rtol_fd:.0e} (FD) -> "
                     + ("PASS" if self.passed else "FAIL"))
        return "\n".join(lines)


def _norm(tree) -> float:
    leaves = [np.asarray(l, np.float64).ravel() for l in jax.tree_util.tree_leaves(tree)]
    return float(np.sqrt(sum(np.sum(l * l) for l in leaves))) if leaves else 0.0


def _sub(a, b):
    return jax.tree_util.tree_map(lambda x, y: np.asarray(x, np.float64) - np.asarray(y, np.float64), a, b)


def _dot(a, b) -> float:
    return float(sum(np.sum(np.asarray(x, np.float64) * np.asarray(y, np.float64))
                     for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))))


def _bounds(p, fd_units: int) -> dict:
    """Lower bounds for every decay (they are traced under the checker's grad), from their
    concrete values less the finite-difference step."""
    out = {}
    for dec in p.rule.decays():
        vals = [np.asarray(a, np.float64) for a in jax.tree_util.tree_leaves(p.decays[dec.name])]
        if vals and not any(isinstance(a, jax.core.Tracer) for a in
                            jax.tree_util.tree_leaves(p.decays[dec.name])):
            lo = min(float(np.min(v, initial=1.0)) for v in vals)
            out[dec.name] = max(dec.grid.smallest(), lo - 2 * fd_units / dec.grid.denominator)
    return out


def check_hypergradients(loss_fn: Callable, meta_fn: Callable, params0: Any, hypers: Any = None, *,
                         steps: int, optimizer=None, lr: Any = None, momentum: Any = None,
                         method: Reversible | None = None, key: jax.Array | None = None,
                         fd_step: float | None = None, rtol_unrolled: float | None = None,
                         rtol_fd: float | None = None) -> GradCheck:
    """Compare d meta_fn(train(...)) / d(params0, hypers, each rule hyperparameter) three ways.

    By `Reversible`, by `Unrolled`, and by central finite differences along one random
    unit direction per argument (a step of `fd_step`, relative to the value for the
    rule's hyperparameters; for a decay along the all-ones direction with a step of
    whole units of its grid, since decays are applied rounded to it). A weight decay
    that is the Python number 0 (off) is not differentiated. Reversible against
    Unrolled tests the implementation; both against finite differences test that the
    loss is smooth at the scale of the step (a chaotic loss fails that one only).

    Args:
      loss_fn: `loss_fn(params, hypers, step) -> scalar`, as for `revlearn.train`.
      meta_fn: `meta_fn(params_T) -> scalar`, e.g. the validation loss.
      params0: the initial weights (any pytree of float arrays, or an Equinox module,
        whose trained arrays are perturbed).
      hypers: any pytree read by the loss; its float leaves are checked.
      steps: T, a Python int >= 1.
      optimizer: a `revlearn.optim` rule.
      lr: with `momentum`, the spelling `lr=..., momentum=...` of
        `optimizer=revlearn.optim.momentum(lr, momentum)`.
      momentum: see `lr`.
      method: the `Reversible()` to check (default: one whose buffers are sized for the
        finite-difference steps of the decays).
      key: the random directions' key (PRNGKey(0) if None).
      fd_step: the finite-difference step (1e-5 in float64, 1e-2 in float32).
      rtol_unrolled: the tolerance against Unrolled (1e-6 in float64, 1e-3 in float32).
      rtol_fd: the tolerance against finite differences (1e-4, 3e-2).

    Returns:
      A `GradCheck` with the relative errors per argument; `.passed` and `str()` (a
      table).

    Raises:
      ReversibleError: where `train` would.
      ValueError, TypeError: bad arguments, as `train`.

    Example:
        ```python
        print(revlearn.check_hypergradients(loss_fn, meta_fn, params0, hypers, steps=30,
                                            optimizer=revlearn.optim.momentum(0.5, 0.9)))
        # argument        rev vs unrolled  rev vs central FD   FD step
        # params0                4.06e-15           4.52e-10   1.0e-05
        # ...
        # tolerances: 1e-06 (unrolled), 1e-04 (FD) -> PASS
        ```
    """
    p = prepare(loss_fn, params0, hypers, optimizer=optimizer, lr=lr, momentum=momentum,
                steps=steps)
    rule = p.rule
    # an Equinox module: differentiate its inexact arrays (those train trains), carry the rest
    params0, hypers, carried = _pytrees.split(params0, hypers)
    carried = carried or _pytrees.Carried(None, None)
    key = jax.random.PRNGKey(0) if key is None else key
    f32 = any(jnp.result_type(l) == jnp.float32 for l in jax.tree_util.tree_leaves(params0))
    rtol_unrolled = rtol_unrolled if rtol_unrolled is not None else (1e-3 if f32 else 1e-6)
    rtol_fd = rtol_fd if rtol_fd is not None else (3e-2 if f32 else 1e-4)
    h = fd_step if fd_step is not None else (1e-2 if f32 else 1e-5)
    units = 256 if f32 else 16
    if method is None:
        method = Reversible(min_decay=_bounds(p, units))
    # decays that are a hyperparameter exactly on their grids, so FD steps of whole grid units
    # are exact
    grid_of = {d.reads[0]: d.grid for d in rule.decays() if len(d.reads) == 1}
    hyp = {}
    for name in rule.hyper_kinds:
        spec = getattr(rule, name)
        if rule.hyper_kinds[name] == "nonnegative" and isinstance(spec, (int, float)) and spec == 0:
            continue
        if name in grid_of:
            g = grid_of[name]
            spec = jax.tree_util.tree_map(
                lambda m, g=g: jnp.round(jnp.asarray(m, jnp.float64) * g.denominator) / g.denominator,
                spec)
        hyp[name] = spec
    hypers_f, hypers_o = split_inexact(hypers)
    hnames = tuple(hyp)

    def f(p0, hf, hv, m):
        opt = dataclasses.replace(rule, **dict(zip(hnames, hv)))
        h = merge(hf, hypers_o)
        if carried.hypers is not None:
            h = _pytrees.combine(h, carried.hypers)
        return meta_fn(train(loss_fn, carried.rebuild(p0), h, optimizer=opt, steps=steps,
                             method=m))

    args = (params0, hypers_f, tuple(hyp[n] for n in hnames))
    g_rev = jax.jit(jax.grad(lambda *a: f(*a, method), argnums=(0, 1, 2)))(*args)
    g_unr = jax.jit(jax.grad(lambda *a: f(*a, Unrolled()), argnums=(0, 1, 2)))(*args)
    f_jit = jax.jit(lambda *a: f(*a, Unrolled()))
    flat_args = [args[0], args[1]] + list(args[2])
    flat_rev = [g_rev[0], g_rev[1]] + list(g_rev[2])
    flat_unr = [g_unr[0], g_unr[1]] + list(g_unr[2])
    names = ("params0", "hypers") + hnames

    def rebuild(i, value):
        a = [args[0], args[1], list(args[2])]
        if i < 2:
            a[i] = value
        else:
            a[2][i - 2] = value
        return a[0], a[1], tuple(a[2])

    errs_u, errs_fd, steps_used, present = [], [], [], []
    keys = jax.random.split(key, len(names))
    for i, name in enumerate(names):
        if not jax.tree_util.tree_leaves(flat_args[i]):
            continue
        present.append(name)
        errs_u.append(_norm(_sub(flat_rev[i], flat_unr[i])) / max(_norm(flat_unr[i]), 1e-300))
        leaves, tdef = jax.tree_util.tree_flatten(flat_args[i])
        if name in grid_of:
            u = [np.ones(np.shape(l)) for l in leaves]
            step = units / grid_of[name].denominator * (16 if grid_of[name].bits > 16 and f32 else 1)
        else:
            ks = jax.random.split(keys[i], len(leaves))
            u = [np.asarray(jax.random.normal(k, np.shape(l)), np.float64) for k, l in zip(ks, leaves)]
            nrm = math.sqrt(sum(float(np.sum(x * x)) for x in u))
            u = [x / nrm for x in u]
            step = h
            if name in rule.hyper_kinds:
                # relative to the value (eps = 1e-8 must stay positive; an lr of 1e-3 needs a
                # step well below it): h of its size, 100 h for eps and weight decay
                size = max(float(np.max(np.abs(np.asarray(l, np.float64)), initial=0)) for l in leaves)
                kind = rule.hyper_kinds[name]
                step = (100 if kind in ("positive", "nonnegative") else 1) * h * (size or 1.0)
        u_tree = jax.tree_util.tree_unflatten(tdef, u)
        shift = lambda s: jax.tree_util.tree_unflatten(
            tdef, [jnp.asarray(np.asarray(l, np.float64) + s * x, jnp.result_type(l))
                   for l, x in zip(leaves, u)])
        fd = (float(f_jit(*rebuild(i, shift(step)))) - float(f_jit(*rebuild(i, shift(-step))))) / (2 * step)
        dd = _dot(flat_rev[i], u_tree)
        errs_fd.append(abs(dd - fd) / max(abs(fd), abs(dd), 1e-12))
        steps_used.append(step)
    return GradCheck(tuple(present), tuple(errs_u), tuple(errs_fd), tuple(steps_used),
                     rtol_unrolled, rtol_fd)


@dataclasses.dataclass(frozen=True)
class SelfCheck:
    """What `self_check` returns.

    Attributes:
      lines: the report's lines (`str()` joins them, with the verdict).
      passed: every check passed.
    """

    lines: tuple
    passed: bool

    def __str__(self) -> str:
        return "\n".join(self.lines + (("PASS: exact reversal and hypergradients verified on this "
                                        "machine.") if self.passed else "FAIL: see above.",))


def self_check(steps: int = 30) -> SelfCheck:
    """Exactness and agreement on small built-in problems, float64 and float32.

    Runs `check_reversal`, `check_hypergradients` and `buffer_usage` on a small MLP with
    momentum (float64 and float32) and Adam (float64): what `revlearn check` prints.

    Args:
      steps: training steps of each problem.

    Returns:
      A `SelfCheck`: `.passed`, and `str()` the report ending in PASS or FAIL.

    Raises:
      RuntimeError: 64-bit mode is off (`jax.config.update("jax_enable_x64", True)`).

    Example:
        ```python
        result = revlearn.self_check()
        print(result)          # ... PASS: exact reversal and hypergradients verified ...
        ```
    """
    _reversible.require_x64("revlearn.self_check")
    lines, ok = [f"jax {jax.__version__} on {jax.devices()[0].platform} "
                 f"({jax.devices()[0].device_kind})"], True
    kx, ky, kv, kw1, kw2 = jax.random.split(jax.random.PRNGKey(0), 5)
    x = jax.random.normal(kx, (64, 12))
    y = jax.nn.one_hot(jax.random.randint(ky, (64,), 0, 4), 4)
    xv = jax.random.normal(kv, (32, 12))
    yv = jax.nn.one_hot(jnp.arange(32) % 4, 4)

    def apply(p, x):
        h = jnp.tanh(x @ p["w1"] + p["b1"])
        return jax.nn.log_softmax(h @ p["w2"] + p["b2"])

    def loss_fn(p, hyp, t):
        i = (t * 16) % 64
        xb = jax.lax.dynamic_slice_in_dim(x, i, 16).astype(p["w1"].dtype)
        yb = jax.lax.dynamic_slice_in_dim(y, i, 16).astype(p["w1"].dtype)
        l2 = jnp.exp(hyp["log_l2"]).astype(p["w1"].dtype)
        return -jnp.mean(jnp.sum(apply(p, xb) * yb, -1)) + jnp.sum(l2 * p["w1"] ** 2)

    def meta_fn(p):
        return -jnp.mean(jnp.sum(apply(p, xv.astype(p["w1"].dtype)) * yv.astype(p["w1"].dtype), -1))

    def params(dtype):
        return {"w1": (0.3 * jax.random.normal(kw1, (12, 8))).astype(dtype), "b1": jnp.zeros(8, dtype),
                "w2": (0.3 * jax.random.normal(kw2, (8, 4))).astype(dtype), "b2": jnp.zeros(4, dtype)}

    hyp = {"log_l2": jnp.full((12, 8), -5.0)}
    lr = {"w1": jnp.full(steps, 0.5), "b1": 0.5, "w2": jnp.full(steps, 0.5), "b2": 0.5}
    cases = [("momentum", jnp.float64, optim.momentum(lr, 0.9)),
             ("momentum", jnp.float32, optim.momentum(lr, 0.9)),
             ("adam", jnp.float64, optim.adam(jax.tree_util.tree_map(lambda a: 0.02 * a, lr)))]
    for name, dtype, opt in cases:
        p0 = params(dtype)
        tag = f"[{name}, {jnp.dtype(dtype).name}]"
        rc = check_reversal(loss_fn, p0, hyp, optimizer=opt, steps=steps)
        lines.append(f"{tag} bit-exact reversal of w0, optimiser state and buffers: "
                     f"{'yes' if rc.passed else 'NO'}")
        ok &= rc.passed
        gc = check_hypergradients(loss_fn, meta_fn, p0, hyp, optimizer=opt, steps=steps)
        lines.append(f"{tag} hypergradients:")
        lines.extend("  " + l for l in str(gc).splitlines())
        ok &= gc.passed
        if dtype == jnp.float64:
            bu = buffer_usage(loss_fn, p0, hyp, optimizer=opt, steps=steps)
            lines.append(f"{tag} buffer: {bu.bits_per_weight_per_step:.4f} bits/weight/step vs "
                         f"minimum {bu.ideal_bits_per_weight_per_step:.4f} (ratio {bu.ratio:.4f} "
                         f"over {steps} steps)")
    return SelfCheck(tuple(lines), bool(ok))
