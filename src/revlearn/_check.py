"""Checks users run on their own problems (like autograd's `check_grads`).

* `check_reversal`: train forward, run backwards, and compare the recovered
  W_0, V_0 and buffer with the initial ones bit-for-bit.
* `check_hypergradients`: the meta-gradient of `meta_fn(sgd(...))` by
  `Reversible`, by `Unrolled`, and by central finite differences along a random
  direction per argument; reports the relative errors.
* `buffer_usage`: bits per weight per step the buffer holds after training,
  beside the information-theoretic minimum mean_t log2(1 / gamma_t).
* `self_check`: all of the above on small built-in problems (`revlearn check`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from . import _buffer, _determinism, _reversible, _schedules
from ._problem import merge, split_inexact
from ._layout import Layout
from ._reversible import Reversible
from ._sgd import prepare, sgd
from ._unrolled import Unrolled


def _leaves(tree) -> list:
    return [jnp.asarray(l) for l in jax.tree_util.tree_leaves(tree)]


def _setup(where, method, loss_fn, params0, hypers, lr, momentum, steps, v0):
    """(method, prepared arguments, buffer capacity): what the forward pass needs."""
    method = method or Reversible()
    _reversible.require_x64(where)
    p = prepare(loss_fn, params0, hypers, lr=lr, momentum=momentum, steps=steps, v0=v0)
    _determinism.warn_if_nondeterministic(p.problem, p.params0, p.theta, where)
    return method, p, method.capacity(p.momentum, steps)


@dataclasses.dataclass(frozen=True)
class ReversalCheck:
    """Whether the reversal recovered the initial state bit-for-bit."""

    weights_exact: bool
    velocity_exact: bool
    buffer_empty: bool
    max_weight_error_ulps: int

    @property
    def passed(self) -> bool:
        return self.weights_exact and self.velocity_exact and self.buffer_empty


def check_reversal(loss_fn, params0, hypers=None, *, lr, momentum, steps, v0=None,
                   method: Reversible | None = None) -> ReversalCheck:
    """Train `steps` steps in fixed point, reverse them, compare with the start bit-for-bit."""
    method, p, capacity = _setup("check_reversal", method, loss_fn, params0, hypers, lr, momentum,
                                 steps, v0)
    theta_f, theta_o = split_inexact(p.theta)

    @jax.jit
    def roundtrip(w0, v0, theta_f, theta_o, lr, mom):
        fw = _reversible.forward(p.problem, method, capacity, w0, v0, theta_f, theta_o, lr, mom)
        zero = [jnp.zeros(jnp.shape(w), jnp.float64) for w in w0]
        bw = _reversible.backward(p.problem, method, fw, theta_f, theta_o, lr, mom, zero, 0.0)
        err = jnp.max(jnp.abs(bw.W - fw.W0))
        return jnp.all(bw.W == fw.W0), jnp.all(bw.V == fw.V0), bw.buffer_empty(), err

    w, v, b, err = roundtrip(_leaves(p.params0), _leaves(p.v0), theta_f, theta_o, p.lr, p.momentum)
    return ReversalCheck(bool(w), bool(v), bool(b), int(err))


@dataclasses.dataclass(frozen=True)
class BufferUsage:
    """Buffer size after training, per weight per step, against the minimum.

    `capacity_words` and `max_words_used` count 16-bit stack words per weight
    (the largest over params leaves)."""

    bits_per_weight_per_step: float
    ideal_bits_per_weight_per_step: float
    capacity_words: int
    max_words_used: int

    @property
    def ratio(self) -> float:
        return self.bits_per_weight_per_step / self.ideal_bits_per_weight_per_step


def buffer_usage(loss_fn, params0, hypers=None, *, lr, momentum, steps, v0=None,
                 method: Reversible | None = None) -> BufferUsage:
    """Run the forward pass and measure the information buffer."""
    method, p, capacity = _setup("buffer_usage", method, loss_fn, params0, hypers, lr, momentum,
                                 steps, v0)

    theta_f, theta_o = split_inexact(p.theta)

    @jax.jit
    def run(w0, v0, theta_f, theta_o, lr, mom):
        fw = _reversible.forward(p.problem, method, capacity, w0, v0, theta_f, theta_o, lr, mom)
        # bits reserved per weight: a leaf's m and head are one value for all its
        # weights or one per weight on its rows (padding excluded)
        lay = Layout.of(p.problem.shapes)
        total = 0.0
        for i, (m, head) in enumerate(zip(fw.m, fw.head)):
            bits = _buffer.bits_reserved(head, m)
            total += (bits * lay.sizes[i] if bits.ndim == 0
                      else jnp.sum(bits.reshape(-1)[:lay.sizes[i]]))
        words = jnp.max(jnp.stack([jnp.max(h, initial=0) for h in fw.head]))   # a leaf may be empty
        return total / sum(p.problem.sizes), words

    bits, words = run(_leaves(p.params0), _leaves(p.v0), theta_f, theta_o, p.lr, p.momentum)
    # Ideal: mean over weights and steps of log2(2^16 / n); broadcasting replicates a
    # schedule entry uniformly, so each leaf's mean equals the mean of its spec.
    total, count = 0.0, 0
    for c, s, size in zip(p.momentum.constant, p.momentum.stepwise, p.problem.sizes):
        if size == 0:
            continue
        a = np.asarray(c if c is not None else s, np.float64)
        n = np.clip(np.round(a * 65536), _buffer.MIN_NUMERATOR, 65535)
        total += size * float(np.mean(np.log2(65536 / n)))
        count += size
    return BufferUsage(float(bits) / steps, total / count, max(capacity), int(words))


@dataclasses.dataclass(frozen=True)
class GradCheck:
    """Relative errors of the Reversible hypergradient, per argument."""

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
        lines = [f"{'argument':<10} {'rev vs unrolled':>16} {'rev vs central FD':>18} {'FD step':>9}"]
        for n, a, b, h in zip(self.names, self.rel_err_unrolled, self.rel_err_fd, self.fd_step):
            lines.append(f"{n:<10} {a:>16.2e} {b:>18.2e} {h:>9.1e}")
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


def check_hypergradients(loss_fn: Callable, meta_fn: Callable, params0: Any, hypers: Any = None, *,
                         lr: Any, momentum: Any, steps: int, method: Reversible | None = None,
                         key: jax.Array | None = None, fd_step: float | None = None,
                         rtol_unrolled: float | None = None, rtol_fd: float | None = None) -> GradCheck:
    """Compare d meta_fn(sgd(...)) / d(params0, hypers, lr, momentum) three ways.

    `meta_fn(params_T) -> scalar`, e.g. the validation loss. Finite differences
    are central, along one random unit direction per argument (for momentum
    along the all-ones direction with a step that is a multiple of 1/65536, since
    momentum is applied rounded to that grid). Tolerances default to 1e-6 / 1e-4
    in float64 and 1e-3 / 3e-2 when params0 is float32.
    """
    method = method or Reversible()
    key = jax.random.PRNGKey(0) if key is None else key
    f32 = any(jnp.result_type(l) == jnp.float32 for l in jax.tree_util.tree_leaves(params0))
    rtol_unrolled = rtol_unrolled if rtol_unrolled is not None else (1e-3 if f32 else 1e-6)
    rtol_fd = rtol_fd if rtol_fd is not None else (3e-2 if f32 else 1e-4)
    h = fd_step if fd_step is not None else (1e-2 if f32 else 1e-5)
    # momentum exactly on the 1/65536 grid, so FD steps of whole grid units are exact
    momentum = jax.tree_util.tree_map(lambda m: jnp.round(jnp.asarray(m, jnp.float64) * 65536) / 65536,
                                      momentum)
    hypers_f, hypers_o = split_inexact(hypers)

    def f(p0, hf, lr, mom, m):
        return meta_fn(sgd(loss_fn, p0, merge(hf, hypers_o), lr=lr, momentum=mom, steps=steps,
                           method=m))

    args = (params0, hypers_f, lr, momentum)
    names = ("params0", "hypers", "lr", "momentum")
    g_rev = jax.jit(jax.grad(lambda *a: f(*a, method), argnums=(0, 1, 2, 3)))(*args)
    g_unr = jax.jit(jax.grad(lambda *a: f(*a, Unrolled()), argnums=(0, 1, 2, 3)))(*args)
    f_jit = jax.jit(lambda *a: f(*a, Unrolled()))
    errs_u, errs_fd, steps_used = [], [], []
    keys = jax.random.split(key, 4)
    for i, name in enumerate(names):
        if not jax.tree_util.tree_leaves(args[i]):
            continue
        errs_u.append(_norm(_sub(g_rev[i], g_unr[i])) / max(_norm(g_unr[i]), 1e-300))
        leaves, tdef = jax.tree_util.tree_flatten(args[i])
        if name == "momentum":
            u = [np.ones(np.shape(l)) for l in leaves]
            step = (256 if f32 else 16) / 65536
        else:
            ks = jax.random.split(keys[i], len(leaves))
            u = [np.asarray(jax.random.normal(k, np.shape(l)), np.float64) for k, l in zip(ks, leaves)]
            nrm = math.sqrt(sum(float(np.sum(x * x)) for x in u))
            u = [x / nrm for x in u]
            step = h
        u_tree = jax.tree_util.tree_unflatten(tdef, u)
        shift = lambda s: jax.tree_util.tree_unflatten(
            tdef, [jnp.asarray(np.asarray(l, np.float64) + s * x, jnp.result_type(l))
                   for l, x in zip(leaves, u)])
        plus = list(args); plus[i] = shift(step)
        minus = list(args); minus[i] = shift(-step)
        fd = (float(f_jit(*plus)) - float(f_jit(*minus))) / (2 * step)
        dd = _dot(g_rev[i], u_tree)
        errs_fd.append(abs(dd - fd) / max(abs(fd), abs(dd), 1e-12))
        steps_used.append(step)
    present = tuple(n for i, n in enumerate(names) if jax.tree_util.tree_leaves(args[i]))
    return GradCheck(present, tuple(errs_u), tuple(errs_fd), tuple(steps_used),
                     rtol_unrolled, rtol_fd)


@dataclasses.dataclass(frozen=True)
class SelfCheck:
    """Verdict of `self_check`."""

    lines: tuple
    passed: bool

    def __str__(self) -> str:
        return "\n".join(self.lines + (("PASS: exact reversal and hypergradients verified on this "
                                        "machine.") if self.passed else "FAIL: see above.",))


def self_check(steps: int = 30) -> SelfCheck:
    """Exactness and agreement on small built-in problems, float64 and float32."""
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

    for dtype in (jnp.float64, jnp.float32):
        p0 = {"w1": (0.3 * jax.random.normal(kw1, (12, 8))).astype(dtype), "b1": jnp.zeros(8, dtype),
              "w2": (0.3 * jax.random.normal(kw2, (8, 4))).astype(dtype), "b2": jnp.zeros(4, dtype)}
        hyp = {"log_l2": jnp.full((12, 8), -5.0)}
        lr = {"w1": jnp.full(steps, 0.5), "b1": 0.5, "w2": jnp.full(steps, 0.5), "b2": 0.5}
        rc = check_reversal(loss_fn, p0, hyp, lr=lr, momentum=0.9, steps=steps)
        lines.append(f"[{jnp.dtype(dtype).name}] bit-exact reversal of w0, v0 and buffer: "
                     f"{'yes' if rc.passed else 'NO'}")
        ok &= rc.passed
        gc = check_hypergradients(loss_fn, meta_fn, p0, hyp, lr=lr, momentum=0.9, steps=steps,
                                  method=Reversible(min_momentum=0.8))
        lines.append(f"[{jnp.dtype(dtype).name}] hypergradients:")
        lines.extend("  " + l for l in str(gc).splitlines())
        ok &= gc.passed
    bu = buffer_usage(loss_fn, p0, hyp, lr=lr, momentum=0.9, steps=steps)
    lines.append(f"buffer: {bu.bits_per_weight_per_step:.4f} bits/weight/step vs minimum "
                 f"{bu.ideal_bits_per_weight_per_step:.4f} (ratio {bu.ratio:.4f} over {steps} steps)")
    return SelfCheck(tuple(lines), bool(ok))
