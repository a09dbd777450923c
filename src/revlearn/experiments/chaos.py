"""The edge of chaos: the final training loss and its exact hypergradient as
functions of the initial parameter scale and of the learning rate.

Model (the lab notebook's): a [784, 200, 50, 10] tanh MLP with log-softmax
output, trained on n = 1,000 MNIST images by T steps of SGD with momentum
(minibatch 250, alpha = exp(log_lr), gamma = 0.9). The initial weights are one
fixed standard normal draw z (every weight and bias) times a scale:

    w_0 = exp(log_scale) * z
    v_{t+1} = gamma v_t - (1 - gamma) grad NLL(w_t; batch_t),  w_{t+1} = w_t + alpha v_{t+1}
    f(log_scale, log_lr) = NLL(w_T; all n training images)

f and its exact gradient (d f / d log_scale, d f / d log_lr: one reversible
backward pass gives both) are swept over a grid of one hyperparameter, the
other held fixed, for several training lengths T (T = 0 is the loss at w_0).
Grid points are evaluated with `jax.vmap` in chunks of `chunk` points.

The notebook's question (the loss looks smooth while its gradient goes wild:
numerical error or genuine chaos?) is answered at a few points on both sides:
the exact reversible hypergradient is compared with

* central finite differences (f(x + h) - f(x - h)) / 2h of the float64 loss
  for h = 1e-2 .. 1e-8,
* reverse-mode autodiff of the unrolled loop (`revlearn.Unrolled()`) in
  float64 and in float32 (parameters, data and arithmetic in float32).

If the exact gradient is right but huge, float64 autodiff agrees with it and
finite differences converge to it once h is below the length scale of the
wiggles of f; float32, whose rounding errors are amplified like the
perturbations themselves, does not.

Grid-consistency: the gradient is informative at the grid's resolution when the
secant slope between neighbouring grid points, s_i = (f_{i+1} - f_i) / h, matches
the mean of the exact gradients at both ends, gbar_i = (g_i + g_{i+1}) / 2 (the
trapezoid rule):

    |s_i - gbar_i| <= 0.5 max(|s_i|, |gbar_i|, 0.1 mean_j |s_j|)

(the floor keeps flat stretches near a minimum, where both are ~0, from
counting). It is reported per length as the first grid value where it fails.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from pathlib import Path
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import revlearn
from revlearn import data as rdata
from revlearn import models
from revlearn.meta import RunDir, save_figure, split_population

from ._registry import Experiment, register
from ._config import MnistConfig
from ._validate import (
    at_least,
    check_decay,
    check_pool,
    check_range,
    fail,
    positive,
    show,
)

__all__ = ["Config", "run", "plot", "EXPERIMENT", "final_loss"]


@dataclasses.dataclass(frozen=True)
class Config(MnistConfig):
    """Settings of `chaos`. The defaults take a few minutes on 2 CPU cores;
    `full=true` runs the notebook's full sweeps (100 points, up to 400 steps:
    hours on a CPU)."""

    sizes: tuple[int, ...] = (784, 200, 50, 10)
    n_train: int = 1000
    batch_size: int = 250
    momentum: float = 0.9
    lr: float = 1.0  # alpha during the scale sweeps
    log_scale: float = -2.0  # log initial scale during the learning-rate sweeps
    scale_range: tuple[float, float] = (-4.0, 1.0)
    scale_zoom: tuple[float, float] = (-2.0, 1.0)
    lr_range: tuple[float, float] = (-4.0, 3.0)
    lr_zoom: tuple[float, float] = (0.5, 2.5)
    points: int = 16  # grid points of each wide sweep
    zoom_points: int = 20  # grid points of each zoom
    scale_steps: tuple[int, ...] = (0, 1, 5, 10, 20, 50)
    scale_zoom_steps: tuple[int, ...] = (10, 50)
    lr_steps: tuple[int, ...] = (10, 50)
    lr_zoom_steps: tuple[int, ...] = (50,)
    fd_steps: int = 50
    fd_log_scales: tuple[float, ...] = (-2.0, 0.0, 1.0)  # at log_lr = log(lr)
    fd_log_lrs: tuple[float, ...] = (0.0, 2.0, 2.5)  # at log_scale
    fd_h: tuple[float, ...] = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8)
    chunk: int = 8  # grid points per vmapped evaluation
    frac_bits: int = 52
    full: bool = False  # the notebook's full sweeps: 100 points, lengths up to 400

    def check(self):
        if len(self.sizes) < 2 or self.sizes[0] != 784 or self.sizes[-1] != 10 \
                or min(self.sizes) < 1:
            fail("sizes", self.sizes, "must start with 784, end with 10 and hold layer sizes "
                 ">= 1", "pass e.g. sizes=784,200,50,10 (the default)")
        at_least(self, 1, "n_train")
        check_pool(self, "n_train")
        check_range("batch_size", self.batch_size, 1, self.n_train,
                    fix="pass batch_size <= n_train")
        check_decay("momentum", self.momentum)
        positive(self, "lr")
        for name in ("scale_range", "scale_zoom", "lr_range", "lr_zoom"):
            lo, hi = getattr(self, name)
            if not lo < hi:
                fail(name, getattr(self, name), "must be an interval lo,hi with lo < hi",
                     f"pass e.g. {name}={show(_default_of(name))} (the default)")
        at_least(self, 2, "points", "zoom_points")
        at_least(self, 1, "chunk")
        for name in ("scale_steps", "scale_zoom_steps", "lr_steps", "lr_zoom_steps"):
            if any(t < 0 for t in getattr(self, name)):
                fail(name, getattr(self, name), "must hold lengths >= 0",
                     f"pass e.g. {name}={show(_default_of(name))} (the default)")
        at_least(self, 1, "fd_steps")
        if not self.fd_log_scales and not self.fd_log_lrs:
            fail("fd_log_scales", self.fd_log_scales, "and fd_log_lrs=() are both empty",
                 "give at least one point for the finite-difference study")
        if not self.fd_h or any(h <= 0 for h in self.fd_h):
            fail("fd_h", self.fd_h, "must hold positive step sizes",
                 "pass e.g. fd_h=1e-2,1e-4,1e-6")
        check_range("frac_bits", self.frac_bits, 8, 60,
                    fix="pass the fixed point's fractional bits in [8, 60], e.g. frac_bits=52")

    def resolved(self) -> Config:
        """The settings actually run: with `full`, the notebook's full sweeps."""
        if not self.full:
            return self
        return dataclasses.replace(
            self, full=False, points=max(self.points, 100), zoom_points=max(self.zoom_points, 100),
            scale_steps=tuple(sorted(set(self.scale_steps) | {0, 1, 5, 10, 20, 50, 400})),
            scale_zoom_steps=tuple(sorted(set(self.scale_zoom_steps) | {10, 50, 400})),
            lr_steps=tuple(sorted(set(self.lr_steps) | {10, 50, 400})),
            lr_zoom_steps=tuple(sorted(set(self.lr_zoom_steps) | {50, 400})))


def _default_of(name: str):
    return next(f.default for f in dataclasses.fields(Config) if f.name == name)


SMOKE = Config(sizes=(784, 16, 10), n_train=100, batch_size=50, points=4, zoom_points=3,
               scale_steps=(3,), scale_zoom_steps=(3,), lr_steps=(3,), lr_zoom_steps=(3,),
               fd_steps=3, fd_log_scales=(-2.0, 1.0), fd_log_lrs=(0.0,), fd_h=(1e-3, 1e-6),
               chunk=4)


# -- the problem -----------------------------------------------------------------

class _Static(NamedTuple):
    """Settings that fix a compiled program (a hashable jit static argument)."""

    sizes: tuple
    batch_size: int
    momentum: float
    frac_bits: int
    method: str  # "reversible" | "unrolled"
    dtype: str  # "float64" | "float32"


class Problem(NamedTuple):
    """The data and the fixed draws: training images, labels, z and the batch key."""

    x: jax.Array
    y: jax.Array
    z: list
    key: jax.Array


def make_problem(config: Config) -> Problem:
    pool = rdata.load_mnist(config.data, config.data_dir)
    train = rdata.split(pool, {"train": config.n_train}, config.seed)["train"]
    z, key = _draws(config.seed, tuple(config.sizes))
    return Problem(jnp.asarray(train.images, jnp.float64), jnp.asarray(train.onehot, jnp.float64),
                   z, key)


@functools.partial(jax.jit, static_argnums=(1,))
def _draws(seed, sizes):
    """z (every weight and bias ~ N(0, 1)) and the minibatch key, from the seed
    (one compiled program rather than one per random op)."""
    base = jax.random.PRNGKey(seed)
    z = models.mlp_init(jax.random.fold_in(base, 0), list(sizes), scale=1.0, dtype=jnp.float64)
    return z, jax.random.fold_in(base, 1)


def _train_loss(params, h, step, *, batch_size):
    xb, yb = models.minibatch(h["x"], h["y"], batch_size, step, h["key"])
    return models.nll(models.mlp_apply(params, xb), yb)


def final_loss(log_scale, log_lr, problem: Problem, *, steps: int, static: _Static):
    """f(log_scale, log_lr): the training NLL after `steps` steps from exp(log_scale) * z."""
    dt = jnp.dtype(static.dtype)
    x, y = problem.x.astype(dt), problem.y.astype(dt)
    params = jax.tree_util.tree_map(lambda a: (jnp.exp(log_scale) * a).astype(dt), problem.z)
    if steps > 0:
        method = (revlearn.Reversible(frac_bits=static.frac_bits) if static.method == "reversible"
                  else revlearn.Unrolled())
        params = revlearn.sgd(
            functools.partial(_train_loss, batch_size=static.batch_size), params,
            {"x": x, "y": y, "key": problem.key}, lr=jnp.exp(log_lr).astype(dt),
            momentum=static.momentum, steps=steps, method=method)
    return models.nll(models.mlp_apply(params, x), y).astype(jnp.float64)


@functools.partial(jax.jit, static_argnames=("steps", "static", "grad"))
def _evaluate(points, problem, *, steps: int, static: _Static, grad: bool):
    """points [B, 2] of (log_scale, log_lr) -> [B, 3] of (f, df/dlog_scale, df/dlog_lr)
    (the gradients are NaN when `grad` is False)."""

    def one(p):
        f = lambda s, a: final_loss(s, a, problem, steps=steps, static=static)  # noqa: E731
        if grad:
            value, (gs, ga) = jax.value_and_grad(f, argnums=(0, 1))(p[0], p[1])
        else:
            value, gs, ga = f(p[0], p[1]), jnp.nan, jnp.nan
        return jnp.stack([value, gs, ga])

    points, gather = split_population(points)
    return gather(jax.vmap(one)(points))


def evaluate_points(points, problem, *, steps, static, grad=True, chunk=8, log=None):
    """`_evaluate` over any number of points in chunks of `chunk` (the last one padded).

    A chunk whose run faults (e.g. a weight leaves the fixed-point range at a huge
    learning rate) is redone point by point; the points that still fault get NaN.
    Returns ([N, 3] values, [N] bool faulted).
    """
    points = np.asarray(points, np.float64).reshape(-1, 2)
    n = points.shape[0]
    out = np.full((n, 3), np.nan)
    faulted = np.zeros(n, bool)
    chunk = max(1, min(chunk, n))
    for start in range(0, n, chunk):
        part = points[start:start + chunk]
        pad = np.concatenate([part, np.repeat(part[-1:], chunk - len(part), 0)], 0)
        try:
            res = np.asarray(_evaluate(jnp.asarray(pad), problem, steps=steps, static=static,
                                       grad=grad))
            out[start:start + len(part)] = res[:len(part)]
        except (revlearn.ReversibleError, jax.errors.JaxRuntimeError):
            for i, p in enumerate(part):
                try:
                    res = _evaluate(jnp.asarray(p[None]), problem, steps=steps, static=static,
                                    grad=grad)
                    out[start + i] = np.asarray(res)[0]
                except (revlearn.ReversibleError, jax.errors.JaxRuntimeError) as e:
                    faulted[start + i] = True
                    if log:
                        log(f"    fault at (log_scale, log_lr) = ({p[0]:.3f}, {p[1]:.3f}), "
                            f"T={steps}: {str(e).splitlines()[0][:160]}")
    return out, faulted


# -- analysis --------------------------------------------------------------------

def grid_consistency(x, f, g):
    """Relative mismatch [N-1] between the secant slopes of f and the trapezoid mean of
    its gradients g on the grid x (see the module docstring)."""
    x, f, g = (np.asarray(a, np.float64) for a in (x, f, g))
    secant = np.diff(f) / np.diff(x)
    mean_g = 0.5 * (g[1:] + g[:-1])
    floor = 0.1 * np.nanmean(np.abs(secant)) if np.isfinite(secant).any() else 0.0
    scale = np.maximum(np.maximum(np.abs(secant), np.abs(mean_g)), max(floor, 1e-300))
    return np.abs(secant - mean_g) / scale


def first_inconsistent(x, f, g, tol=0.5):
    """The left end of the first grid interval whose mismatch exceeds `tol`, or None."""
    err = grid_consistency(x, f, g)
    bad = np.flatnonzero(~(err <= tol))
    return float(x[bad[0]]) if bad.size else None


#: |hypergradient| above which we call it exploded: a change of 0.1 in the log
#: hyperparameter would move the loss by more than 1 nat if f were linear.
EXPLODED = 10.0


def _rel(a, b):
    return float(abs(a - b) / max(abs(b), 1e-300))


def _finite_or_none(v):
    v = float(v)
    return v if math.isfinite(v) else None


# -- run -------------------------------------------------------------------------

_BLOCKS = (  # name, hyperparameter swept, range field, points field, lengths field
    ("scale_sweep", "scale", "scale_range", "points", "scale_steps"),
    ("scale_zoom", "scale", "scale_zoom", "zoom_points", "scale_zoom_steps"),
    ("lr_sweep", "lr", "lr_range", "points", "lr_steps"),
    ("lr_zoom", "lr", "lr_zoom", "zoom_points", "lr_zoom_steps"),
)


def _grid_points(config: Config, hyper: str, lo: float, hi: float, n: int):
    grid = np.linspace(lo, hi, n)
    if hyper == "scale":
        return grid, np.stack([grid, np.full(n, math.log(config.lr))], 1)
    return grid, np.stack([np.full(n, config.log_scale), grid], 1)


def run(config: Config, run_dir: RunDir) -> dict:
    t_start = time.perf_counter()
    cfg = config.resolved()
    problem = make_problem(cfg)

    def log(msg):
        if run_dir.progress:
            print(msg, file=sys.stderr, flush=True)

    def static(method="reversible", dtype="float64"):
        return _Static(tuple(cfg.sizes), cfg.batch_size, cfg.momentum, cfg.frac_bits, method, dtype)

    def cached(tag, points, compute):
        """compute() -> (values, faulted), saved as block_<tag>.npz; an interrupted run
        continued with --resume reuses the blocks it finished (same points)."""
        name = f"block_{tag}"
        if run_dir.resume and run_dir.has_arrays(name):
            saved = run_dir.load_arrays(name)
            if saved["points"].shape == points.shape and np.array_equal(saved["points"], points):
                log(f"chaos: {tag}: reusing the saved results (--resume)")
                return saved["values"], saved["faulted"].astype(bool)
        values, faulted = compute()
        run_dir.save_arrays(name, {"points": points, "values": values, "faulted": faulted})
        return values, faulted

    run_dir.truncate_metrics(0)  # one record per block, written afresh (resumed or not)
    arrays = {}
    summary: dict = {}
    record_i = 0
    # Group every (log_scale, log_lr) point of every block by length T, so each
    # length compiles once.
    jobs: dict[int, list] = {}
    for name, hyper, rng, npts, lengths in _BLOCKS:
        lo, hi = getattr(cfg, rng)
        grid, pts = _grid_points(cfg, hyper, lo, hi, getattr(cfg, npts))
        arrays[f"{name}/grid"] = grid
        arrays[f"{name}/steps"] = np.asarray(getattr(cfg, lengths), np.int64)
        for T in getattr(cfg, lengths):
            jobs.setdefault(int(T), []).append((name, hyper, pts))
    fd_pts = ([(s, math.log(cfg.lr)) for s in cfg.fd_log_scales]
              + [(cfg.log_scale, a) for a in cfg.fd_log_lrs])
    fd_kind = ["scale"] * len(cfg.fd_log_scales) + ["lr"] * len(cfg.fd_log_lrs)
    jobs.setdefault(cfg.fd_steps, []).append(("fd", None, np.asarray(fd_pts, np.float64)))

    for T in sorted(jobs):
        t0 = time.perf_counter()
        allpts = np.concatenate([p for _, _, p in jobs[T]], 0)
        log(f"chaos: T={T}: {len(allpts)} points (reversible value and gradient)")
        vals, bad = cached(f"T{T}", allpts, lambda T=T, allpts=allpts: evaluate_points(
            allpts, problem, steps=T, static=static(), chunk=cfg.chunk, log=log))
        k = 0
        for name, hyper, pts in jobs[T]:
            v, b = vals[k:k + len(pts)], bad[k:k + len(pts)]
            k += len(pts)
            arrays[f"{name}/T{T}/loss"] = v[:, 0]
            arrays[f"{name}/T{T}/grad"] = v[:, 1] if hyper == "scale" else v[:, 2]
            arrays[f"{name}/T{T}/fault"] = b
            if name == "fd":
                arrays["fd/reversible"] = np.where(
                    np.array([kk == "scale" for kk in fd_kind]), v[:, 1], v[:, 2])
                arrays["fd/loss"] = v[:, 0]
                continue
            g = np.abs(arrays[f"{name}/T{T}/grad"])
            run_dir.append_metrics({
                "iteration": record_i, "block": name, "steps": T, "points": len(pts),
                "faults": int(b.sum()), "max_abs_grad": _finite_or_none(np.nanmax(g))
                if np.isfinite(g).any() else None,
                "wall_time_s": time.perf_counter() - t0})
            record_i += 1

    # -- the finite-difference / precision study at the FD points --------------
    t0 = time.perf_counter()
    T = cfg.fd_steps
    fd_pts = np.asarray(fd_pts, np.float64)
    log(f"chaos: finite differences at {len(fd_pts)} points, T={T}, h in {list(cfg.fd_h)}")
    shifted = []
    for p, kind in zip(fd_pts, fd_kind):
        d = np.array([1.0, 0.0]) if kind == "scale" else np.array([0.0, 1.0])
        for h in cfg.fd_h:
            shifted += [p + h * d, p - h * d]
    shifted = np.asarray(shifted)
    fvals, fbad = cached("fd_shifted", shifted, lambda: evaluate_points(
        shifted, problem, steps=T, static=static("unrolled", "float64"), grad=False,
        chunk=cfg.chunk, log=log))
    fv = fvals[:, 0].reshape(len(fd_pts), len(cfg.fd_h), 2)
    arrays["fd/h"] = np.asarray(cfg.fd_h, np.float64)
    arrays["fd/points"] = fd_pts
    arrays["fd/is_scale"] = np.array([k == "scale" for k in fd_kind])
    arrays["fd/fd"] = (fv[..., 0] - fv[..., 1]) / (2 * np.asarray(cfg.fd_h)[None, :])
    log(f"chaos: unrolled autodiff (float64 and float32) at {len(fd_pts)} points, T={T}")
    ucap = max(1, min(cfg.chunk, 2))  # the unrolled tape holds every step
    for dt in ("float64", "float32"):
        v, b = cached(f"unrolled_{dt}", fd_pts, lambda dt=dt: evaluate_points(
            fd_pts, problem, steps=T, static=static("unrolled", dt), chunk=ucap, log=log))
        arrays[f"fd/unrolled_{dt}"] = np.where(arrays["fd/is_scale"], v[:, 1], v[:, 2])
        arrays[f"fd/loss_{dt}"] = v[:, 0]
    run_dir.append_metrics({"iteration": record_i, "block": "fd", "steps": T,
                            "points": len(fd_pts), "faults": int(fbad.sum()),
                            "wall_time_s": time.perf_counter() - t0})
    run_dir.save_arrays("results", arrays)

    # -- headline numbers -----------------------------------------------------
    for name, hyper, _, _, lengths in _BLOCKS:
        grid = arrays[f"{name}/grid"]
        for T in getattr(cfg, lengths):
            f, g = arrays[f"{name}/T{T}/loss"], arrays[f"{name}/T{T}/grad"]
            if np.isfinite(g).any():
                summary[f"{name}_T{T}_max_abs_grad"] = _finite_or_none(np.nanmax(np.abs(g)))
            edge = first_inconsistent(grid, f, g) if T > 0 else None
            summary[f"{name}_T{T}_gradient_uninformative_from"] = (
                "none" if edge is None else round(edge, 4))
            big = np.flatnonzero(np.abs(g) > EXPLODED)
            summary[f"{name}_T{T}_abs_grad_above_{EXPLODED:g}_from"] = (
                "none" if big.size == 0 else round(float(grid[big[0]]), 4))
    rev = arrays["fd/reversible"]
    for i, (p, kind) in enumerate(zip(fd_pts, fd_kind)):
        tag = (f"fd_log_scale_{p[0]:g}" if kind == "scale" else f"fd_log_lr_{p[1]:g}")
        summary[f"{tag}_reversible_grad"] = _finite_or_none(rev[i])
        summary[f"{tag}_relerr_unrolled_float64"] = _finite_or_none(
            _rel(arrays["fd/unrolled_float64"][i], rev[i]))
        summary[f"{tag}_relerr_unrolled_float32"] = _finite_or_none(
            _rel(arrays["fd/unrolled_float32"][i], rev[i]))
        errs = [abs(fd - rev[i]) / max(abs(rev[i]), 1e-300) for fd in arrays["fd/fd"][i]]
        ok = np.isfinite(errs)
        best = int(np.flatnonzero(ok)[np.argmin(np.asarray(errs)[ok])]) if ok.any() else None
        summary[f"{tag}_best_fd_relerr"] = None if best is None else float(errs[best])
        summary[f"{tag}_best_fd_h"] = None if best is None else float(cfg.fd_h[best])
    summary["wall_time_s"] = time.perf_counter() - t_start
    plot(run_dir.path)
    return summary


# -- plot ------------------------------------------------------------------------

_LABEL = {"scale": r"log initial scale $\log s$", "lr": r"log learning rate $\log \alpha$"}
_GLABEL = {"scale": r"$\partial f / \partial \log s$", "lr": r"$\partial f / \partial \log \alpha$"}
_TITLE = {"scale_sweep": "initial scale", "scale_zoom": "initial scale (zoom)",
          "lr_sweep": "learning rate", "lr_zoom": "learning rate (zoom)"}


def _sweep_figure(res, cfg, name, hyper):
    from matplotlib.figure import Figure

    grid = res[f"{name}/grid"]
    lengths = [int(t) for t in res[f"{name}/steps"]]
    n = len(lengths)
    fig = Figure(figsize=(max(7.5, 2.9 * n + 1.0), 5.8), layout="constrained")
    axes = np.asarray(fig.subplots(2, n, sharex=True, squeeze=False))
    for j, T in enumerate(lengths):
        f, g = res[f"{name}/T{T}/loss"], res[f"{name}/T{T}/grad"]
        bad = res[f"{name}/T{T}/fault"].astype(bool)
        a1, a2 = axes[0, j], axes[1, j]
        a1.plot(grid, f, ".-", color="C0", ms=4)
        a1.set_yscale("log")
        a1.set_title(f"T = {T} step{'s' if T != 1 else ''}")
        a2.plot(grid, g, ".-", color="C3", ms=4)
        lin = 1.0
        a2.set_yscale("symlog", linthresh=lin)
        a2.axhspan(-lin, lin, color="0.92", zorder=0)
        if bad.any():
            for ax in (a1, a2):
                for xb in grid[bad]:
                    ax.axvline(xb, color="0.6", lw=0.8, ls=":")
            a1.text(0.02, 0.95, f"{int(bad.sum())} faulted (dotted)", transform=a1.transAxes,
                    fontsize=7, va="top")
        a2.set_xlabel(_LABEL[hyper])
        for ax in (a1, a2):
            ax.grid(alpha=0.3)
        if T == 0 and hyper == "lr":
            a2.text(0.5, 0.5, "no training:\ngradient is 0", transform=a2.transAxes,
                    ha="center", va="center", fontsize=8)
    axes[0, 0].set_ylabel("final training loss f\n(NLL, nats, log scale)")
    axes[1, 0].set_ylabel(f"exact hypergradient {_GLABEL[hyper]}\n(symlog, linear in grey band)")
    fixed = (rf"$\alpha$ = {cfg.get('lr', 1.0):g}" if hyper == "scale"
             else rf"$\log s$ = {cfg.get('log_scale', -2.0):g}")
    fig.suptitle(f"Training loss f and its exact (reversible) hypergradient vs the "
                 f"{_TITLE[name]}\n{fixed}, $\\gamma$ = {cfg.get('momentum', 0.9):g}, "
                 f"{cfg.get('n_train', 1000)} examples, "
                 f"MLP {'-'.join(str(s) for s in cfg.get('sizes', []))}",
                 fontsize=10)
    return fig


def _growth_figure(res, cfg):
    """|df/dlog s| against T at a few initial scales (from the wide scale sweep)."""
    from matplotlib.figure import Figure

    grid = res["scale_sweep/grid"]
    lengths = [int(t) for t in res["scale_sweep/steps"] if t > 0]
    fig = Figure(figsize=(6.5, 4.3), layout="constrained")
    ax = fig.subplots()
    cmap = __import__("matplotlib").colormaps["viridis"]
    idx = sorted({int(np.argmin(np.abs(grid - s))) for s in (-4, -3, -2, -1, 0, 0.5, 1)})
    for k, i in enumerate(idx):
        g = [abs(res[f"scale_sweep/T{T}/grad"][i]) for T in lengths]
        ax.plot(lengths, g, "o-", color=cmap(k / max(1, len(idx) - 1)),
                label=rf"$\log s$ = {grid[i]:.2f}")
    ax.set_yscale("log")
    ax.set_xlabel("training steps T")
    ax.set_ylabel(r"$|\partial f / \partial \log s|$ (exact, log scale)")
    ax.set_title(rf"Growth of the hypergradient with training length "
                 rf"($\alpha$ = {cfg.get('lr', 1.0):g})")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, title="initial scale")
    return fig


def _fd_figure(res, cfg):
    from matplotlib.figure import Figure

    h, fd, rev = res["fd/h"], res["fd/fd"], res["fd/reversible"]
    pts, is_scale = res["fd/points"], res["fd/is_scale"].astype(bool)
    u64, u32 = res["fd/unrolled_float64"], res["fd/unrolled_float32"]
    n = len(rev)
    fig = Figure(figsize=(12, 4.6), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.25, 1]})
    labels = []
    for i in range(n):
        lab = (rf"$\log s$={pts[i, 0]:g}" if is_scale[i] else rf"$\log\alpha$={pts[i, 1]:g}")
        lab += rf" ($|g|$={abs(rev[i]):.2g})"
        labels.append(lab)
        err = np.abs(fd[i] - rev[i]) / np.maximum(np.abs(rev[i]), 1e-300)
        ax1.plot(h, np.maximum(err, 1e-17), "osD^vP"[i % 6] + "-", color=f"C{i}", label=lab,
                 ms=7 - 0.7 * (i % 6), alpha=0.85)
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.invert_xaxis()
    ax1.axhline(1.0, color="k", lw=0.8, ls="--")
    ax1.text(h[0], 1.3, "100% error", fontsize=8)
    ax1.set_xlabel("finite-difference step h (shrinking to the right)")
    ax1.set_ylabel("|FD - exact| / |exact|")
    ax1.set_title(f"Central finite differences vs exact hypergradient (T = {cfg.get('fd_steps')})")
    ax1.grid(alpha=0.3, which="both")
    ax1.legend(fontsize=8)
    x = np.arange(n)
    e64 = np.abs(u64 - rev) / np.maximum(np.abs(rev), 1e-300)
    e32 = np.abs(u32 - rev) / np.maximum(np.abs(rev), 1e-300)
    best = np.nanmin(np.abs(fd - rev[:, None]) / np.maximum(np.abs(rev[:, None]), 1e-300), 1)
    w = 0.27
    ax2.bar(x - w, np.maximum(e64, 1e-17), w, label="unrolled autodiff, float64", color="C0")
    ax2.bar(x, np.maximum(e32, 1e-17), w, label="unrolled autodiff, float32", color="C1")
    ax2.bar(x + w, np.maximum(best, 1e-17), w, label="finite difference, best h", color="0.6")
    ax2.set_yscale("log")
    ax2.set_ylim(top=1e5)
    ax2.axhline(1.0, color="k", lw=0.8, ls="--")
    ax2.set_xticks(x)
    ax2.set_xticklabels([lab.replace(" (", "\n(") for lab in labels], fontsize=7)
    ax2.set_ylabel("relative difference from exact reversible")
    ax2.set_title("Other gradients vs the exact reversible one")
    ax2.grid(alpha=0.3, axis="y", which="both")
    ax2.legend(fontsize=8, loc="upper left")
    fig.suptitle("Numerical error or genuine chaos? (float64 FD of the loss; "
                 "relative errors below 1e-17 drawn at 1e-17)")
    return fig


def plot(path) -> list[Path]:
    """Re-render the figures from results.npz and config.json."""
    rd = RunDir(Path(path))
    res = rd.load_arrays("results")
    cfg = (rd.read_config() or {}).get("config", {})
    paths = []
    for name, hyper, *_ in _BLOCKS:
        if f"{name}/grid" in res and len(res[f"{name}/steps"]):
            fig = _sweep_figure(res, cfg, name, hyper)
            paths.append(rd.figures / f"{name}.png")
            save_figure(fig, paths[-1], dpi=100)
    if len([t for t in res["scale_sweep/steps"] if t > 0]) >= 2:
        fig = _growth_figure(res, cfg)
        paths.append(rd.figures / "gradient_growth.png")
        save_figure(fig, paths[-1], dpi=110)
    fig = _fd_figure(res, cfg)
    paths.append(rd.figures / "fd_check.png")
    save_figure(fig, paths[-1], dpi=110)
    return paths


EXPERIMENT = register(Experiment(
    name="chaos",
    description="The edge of chaos: training loss and exact hypergradient vs initial scale and "
                "learning rate; finite differences and float32/64 autodiff vs exact.",
    Config=Config, smoke=SMOKE, run=run, plot=plot))
