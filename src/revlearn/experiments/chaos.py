"""The edge of chaos: the final training loss and its exact hypergradient as
functions of the initial parameter scale and of the learning rate.

Model (the lab notebook's): a [784, 200, 50, 10] tanh MLP with log-softmax
output, trained on n = 1,000 MNIST images by T steps of SGD with momentum
(minibatch 250, alpha = exp(log_lr), gamma = 0.9). The initial weights are one
fixed standard normal draw z (every weight and bias) times a scale:

    w_0 = exp(log_scale) * z
    v_{t+1} = gamma v_t - (1 - gamma) grad NLL(w_t; batch_t),  w_{t+1} = w_t + alpha v_{t+1}
    f(log_scale, log_lr) = NLL(w_T; all n training images)

f and its exact gradient (d f / d log_scale, d f / d log_lr from one reversible
backward pass) are swept over a grid of one hyperparameter, the other held
fixed, for several training lengths T (T = 0 is the loss at w_0); grid points
[B, 2] are evaluated with `jax.vmap`, B = `chunk` at a time, split over the
devices by `split_population`.

At a few points the exact hypergradient is compared with central finite
differences (f(x + h) - f(x - h)) / 2h of the float64 loss, and with reverse-mode
autodiff of the unrolled loop (`revlearn.Unrolled()`) in float64 and float32.

Grid-consistency: the gradient is informative at the grid's resolution when the
secant slope s_i = (f_{i+1} - f_i) / h matches the trapezoid mean
gbar_i = (g_i + g_{i+1}) / 2 of the exact gradients:

    |s_i - gbar_i| <= 0.5 max(|s_i|, |gbar_i|, 0.1 mean_j |s_j|)

(the floor keeps flat stretches near a minimum from counting); reported per
length as the first grid value where it fails.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import revlearn
from revlearn import models
from revlearn.meta import RunDir, split_population

from . import _plots
from ._config import MnistConfig
from ._registry import Experiment
from ._splits import mnist_splits
from ._validate import at_least, check_decay, check_pool, check_range, fail, positive

__all__ = ["Config", "run", "plot", "EXPERIMENT", "final_loss", "evaluate_points",
           "grid_consistency", "first_inconsistent", "make_problem"]

#: sweep: (hyperparameter, range field); its grid has `<sweep>_points`, lengths `<sweep>_steps`
SWEEPS = {"scale": ("scale", "scale_range"), "scale_zoom": ("scale", "scale_zoom"),
          "lr": ("lr", "lr_range"), "lr_zoom": ("lr", "lr_zoom")}


@dataclasses.dataclass(frozen=True)
class Config(MnistConfig):
    """Settings of `chaos` (defaults: about 12 CPU-minutes, most of it the 500-point
    learning-rate zoom)."""

    sizes: tuple[int, ...] = (784, 200, 50, 10)
    n_train: int = 1000
    batch_size: int = 250
    momentum: float = 0.9
    lr: float = 1.0  # alpha during the scale sweeps
    log_scale: float = -2.0  # log initial scale during the learning-rate sweeps
    scale_range: tuple[float, float] = (-4.0, 1.0)
    scale_points: int = 16
    scale_steps: tuple[int, ...] = (0, 1, 5, 10, 20, 50)
    scale_zoom: tuple[float, float] = (-2.0, 1.0)
    scale_zoom_points: int = 20
    scale_zoom_steps: tuple[int, ...] = (10, 50)
    lr_range: tuple[float, float] = (-4.0, 3.0)
    lr_points: int = 16
    lr_steps: tuple[int, ...] = (10, 50)
    lr_zoom: tuple[float, float] = (0.5, 2.5)  # the paper's figure 10
    lr_zoom_points: int = 500
    lr_zoom_steps: tuple[int, ...] = (50,)
    fd_steps: int = 50
    fd_log_scales: tuple[float, ...] = (-2.0, 0.0, 1.0)  # at log_lr = log(lr)
    fd_log_lrs: tuple[float, ...] = (0.0, 2.0, 2.5)  # at log_scale (both empty: no FD study)
    fd_h: tuple[float, ...] = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8)
    chunk: int = 8  # grid points per vmapped evaluation
    frac_bits: int = 52

    def check(self):
        if len(self.sizes) < 2 or (self.sizes[0], self.sizes[-1]) != (784, 10) \
                or min(self.sizes) < 1:
            fail("sizes", self.sizes, "must run from 784 to 10 through layers of >= 1 units",
                 "pass e.g. sizes=784,200,50,10 (the default)")
        at_least(self, 1, "n_train", "chunk", "fd_steps")
        at_least(self, 2, *(f"{s}_points" for s in SWEEPS))
        check_pool(self, "n_train")
        check_range("batch_size", self.batch_size, 1, self.n_train, fix="pass it <= n_train")
        check_decay("momentum", self.momentum)
        positive(self, "lr")
        check_range("frac_bits", self.frac_bits, 8, 60, fix="pass e.g. frac_bits=52")
        for bad, name, fix in [(not np.less(*getattr(self, r)), r, "pass lo,hi with lo < hi")
                               for _, r in SWEEPS.values()] + [
                (min(getattr(self, f"{s}_steps"), default=0) < 0, f"{s}_steps", "pass e.g. 10,50")
                for s in SWEEPS] + [(min(self.fd_h, default=0) <= 0, "fd_h", "pass e.g. 1e-4")]:
            if bad:
                fail(name, getattr(self, name), "is out of range", fix)


SMOKE = Config(sizes=(784, 16, 10), n_train=100, batch_size=50, scale_points=4,
               scale_zoom_points=3, lr_points=4, lr_zoom_points=5, scale_steps=(0, 3),
               scale_zoom_steps=(3,), lr_steps=(3,), lr_zoom_steps=(3,), fd_steps=3,
               fd_log_scales=(-2.0, 1.0), fd_log_lrs=(0.0,), fd_h=(1e-3, 1e-6), chunk=4)


# -- the problem -----------------------------------------------------------------

def make_problem(config: Config) -> dict:
    """The training images x and labels y, the draw z, the minibatch key."""
    (x, y), base = mnist_splits(config, "train")["train"], jax.random.PRNGKey(config.seed)
    z = models.mlp_init(jax.random.fold_in(base, 0), list(config.sizes), 1.0, jnp.float64)
    return {"x": x, "y": y, "z": z, "key": jax.random.fold_in(base, 1)}


def _train_loss(params, h, step, *, batch_size):
    xb, yb = models.minibatch(h["x"], h["y"], batch_size, step, h["key"])
    return models.nll(models.mlp_apply(params, xb), yb)


def final_loss(log_scale, log_lr, problem, *, steps, config, method="reversible",
               dtype="float64"):
    """f(log_scale, log_lr) after `steps` steps of `Reversible` or ("unrolled") `Unrolled`."""
    x, y = (problem[k].astype(dtype) for k in "xy")
    params = jax.tree_util.tree_map(lambda a: (jnp.exp(log_scale) * a).astype(dtype),
                                    problem["z"])
    if steps > 0:
        params = revlearn.sgd(
            functools.partial(_train_loss, batch_size=config.batch_size), params,
            {"x": x, "y": y, "key": problem["key"]}, lr=jnp.exp(log_lr).astype(dtype),
            momentum=config.momentum, steps=steps,
            method=(revlearn.Reversible(frac_bits=config.frac_bits) if method == "reversible"
                    else revlearn.Unrolled()))
    return models.nll(models.mlp_apply(params, x), y).astype(jnp.float64)


@functools.partial(jax.jit, static_argnames=("steps", "config", "method", "dtype", "grad"))
def _evaluate(points, problem, *, grad, **static):
    """points [B, 2] of (log_scale, log_lr) -> [B, 3] of (f, df/dlog_scale, df/dlog_lr)."""
    f = functools.partial(final_loss, problem=problem, **static)

    def one(p):
        if not grad:
            return jnp.stack([f(p[0], p[1]), jnp.nan, jnp.nan])
        value, (gs, ga) = jax.value_and_grad(f, (0, 1))(p[0], p[1])
        return jnp.stack([value, gs, ga])

    points, gather = split_population(points)
    return gather(jax.vmap(one)(points))


def evaluate_points(points, problem, *, chunk=8, grad=True, **static):
    """`_evaluate` over N points, `chunk` at a time (the last chunk padded). A chunk whose
    run faults (a weight leaving the fixed-point range) is redone point by point; points
    that fault again get NaN. Returns ([N, 3] values, [N] bool faulted)."""
    points = np.asarray(points, np.float64).reshape(-1, 2)
    out, faulted = np.full((len(points), 3), np.nan), np.zeros(len(points), bool)
    ev = functools.partial(_evaluate, problem=problem, grad=grad,
                           **{**static, "config": static["config"].program()})
    chunk = min(chunk, len(points))
    for start in range(0, len(points), chunk):
        part, at = points[start:start + chunk], slice(start, start + chunk)
        try:
            out[at] = np.asarray(ev(np.concatenate([part, np.repeat(part[-1:], chunk - len(part),
                                                                    0)])))[:len(part)]
        except (revlearn.ReversibleError, jax.errors.JaxRuntimeError):
            if chunk > 1:
                out[at], faulted[at] = evaluate_points(part, problem, chunk=1, grad=grad, **static)
            faulted[at] |= chunk == 1
    return out, faulted


def grid_consistency(x, f, g):
    """Relative mismatch [N-1] between the secant slopes of f and the trapezoid mean of
    its gradients g on the grid x (see the module docstring)."""
    x, f, g = (np.asarray(a, np.float64) for a in (x, f, g))
    secant, mean_g = np.diff(f) / np.diff(x), 0.5 * (g[1:] + g[:-1])
    floor = 0.1 * np.nanmean(np.abs(secant)) if np.isfinite(secant).any() else 0.0
    scale = np.maximum(np.maximum(np.abs(secant), np.abs(mean_g)), max(floor, 1e-300))
    return np.abs(secant - mean_g) / scale


def first_inconsistent(x, f, g, tol=0.5):
    """The left end of the first grid interval whose mismatch exceeds `tol`, or None."""
    bad = np.flatnonzero(~(grid_consistency(x, f, g) <= tol))
    return float(x[bad[0]]) if bad.size else None


def _rel(a, exact):
    return np.abs(a - exact) / np.maximum(np.abs(exact), 1e-300)


# -- run -------------------------------------------------------------------------

def run(config: Config, run_dir: RunDir) -> dict:
    t_start, problem = time.perf_counter(), make_problem(config)
    run_dir.truncate_metrics(0)  # one record per sweep and length, written afresh

    def cached(tag, points, **kw):
        """evaluate_points(points, **kw), saved as block_<tag>; --resume reuses it."""
        if run_dir.resume and run_dir.has_arrays(f"block_{tag}"):
            saved = run_dir.load_arrays(f"block_{tag}")
            if np.array_equal(saved["points"], points):
                return saved["values"], saved["faulted"].astype(bool)
        values, faulted = evaluate_points(points, problem, config=config, **kw)
        run_dir.save_arrays(f"block_{tag}", {"points": points, "values": values,
                                             "faulted": faulted})
        return values, faulted

    res, summary = {}, {}
    for name, (hyper, rng) in SWEEPS.items():
        grid = res[f"{name}/grid"] = np.linspace(*getattr(config, rng),
                                                 getattr(config, f"{name}_points"))
        res[f"{name}/steps"] = np.asarray(getattr(config, f"{name}_steps"), np.int64)
        fixed = np.full_like(grid, math.log(config.lr) if hyper == "scale" else config.log_scale)
        pts = np.stack([grid, fixed] if hyper == "scale" else [fixed, grid], 1)
        for T in res[f"{name}/steps"]:  # one compiled program per length, shared by the sweeps
            t0 = time.perf_counter()
            v, bad = cached(f"{name}_T{T}", pts, steps=int(T), chunk=config.chunk)
            f, g = v[:, 0], v[:, 1 + (hyper == "lr")]
            res.update({f"{name}/T{T}/loss": f, f"{name}/T{T}/grad": g, f"{name}/T{T}/fault": bad})
            big, edge = np.flatnonzero(np.abs(g) > 1), first_inconsistent(grid, f, g) if T else None
            summary.update({f"{name}_T{T}_{k}": v for k, v in {
                "max_abs_grad": float(np.nanmax(np.abs(g))), "min_loss": float(np.nanmin(f)),
                "argmin": round(float(grid[np.nanargmin(f)]), 4),
                "abs_grad_above_1_from": round(float(grid[big[0]]), 4) if big.size else "none",
                "gradient_uninformative_from": "none" if edge is None else round(edge, 4),
                "faults": int(bad.sum())}.items()})
            run_dir.append_metrics({"iteration": len(run_dir.read_metrics()), "sweep": name,
                                    "steps": int(T), "wall_time_s": time.perf_counter() - t0})
    pts = np.asarray([(s, math.log(config.lr)) for s in config.fd_log_scales]
                     + [(config.log_scale, a) for a in config.fd_log_lrs]).reshape(-1, 2)
    if len(pts):  # the finite-difference / precision study at T = fd_steps
        T, h, col = config.fd_steps, np.asarray(config.fd_h), np.arange(len(pts))
        is_scale = col < len(config.fd_log_scales)
        grad = lambda v: v[col, 2 - is_scale]  # noqa: E731  (d/dlog s or d/dlog alpha)
        unit = np.stack([is_scale, ~is_scale], 1)[:, None, None]
        shifted = (pts[:, None, None] + np.array([1.0, -1.0])[:, None] * h[:, None, None]
                   * unit).reshape(-1, 2)
        fv = cached("fd_shifted", shifted, steps=T, method="unrolled", grad=False,
                    chunk=config.chunk)[0][:, 0].reshape(len(pts), len(h), 2)
        res.update({"fd/h": h, "fd/points": pts, "fd/is_scale": is_scale,
                    "fd/fd": (fv[..., 0] - fv[..., 1]) / (2 * h),
                    "fd/exact": grad(cached("fd_exact", pts, steps=T, chunk=config.chunk)[0])})
        for dt in ("float64", "float32"):  # the unrolled tape holds every step: 2 at a time
            res[f"fd/unrolled_{dt}"] = grad(cached(f"unrolled_{dt}", pts, steps=T, dtype=dt,
                                                   method="unrolled", chunk=2)[0])
        for i, p in enumerate(pts):
            err, rev = _rel(res["fd/fd"][i], res["fd/exact"][i]), res["fd/exact"][i]
            tag = f"fd_log_scale_{p[0]:g}" if is_scale[i] else f"fd_log_lr_{p[1]:g}"
            summary.update({f"{tag}_{k}": v for k, v in {
                "reversible_grad": float(rev), "best_fd_h": float(h[np.nanargmin(err)]),
                "best_fd_relerr": float(np.nanmin(err)),
                **{f"relerr_unrolled_{dt}": float(_rel(res[f"fd/unrolled_{dt}"][i], rev))
                   for dt in ("float64", "float32")}}.items()})
    run_dir.save_arrays("results", res)
    summary["wall_time_s"] = time.perf_counter() - t_start
    plot(run_dir.path)
    return summary


# -- plot ------------------------------------------------------------------------

_X = {"scale": r"log initial scale $\log s$", "lr": r"log learning rate $\log \alpha$"}
_G = {"scale": r"$\partial f / \partial \log s$", "lr": r"$\partial f / \partial \log \alpha$"}


def _sweep_figure(res, cfg, name, hyper):
    grid, lengths = res[f"{name}/grid"], [int(t) for t in res[f"{name}/steps"]]
    fig, axes = _plots.figure(len(lengths), 2, width=max(7.5, 2.9 * len(lengths) + 1),
                              height=5.8, sharex=True)
    axes = np.reshape(axes, (2, -1))
    style = dict(marker=".", ms=4) if len(grid) <= 60 else dict(lw=0.7)
    for (a1, a2), T in zip(axes.T, lengths):
        f, g, bad = (res[f"{name}/T{T}/{k}"] for k in ("loss", "grad", "fault"))
        a1.plot(grid, f, color="C0", **style)
        a2.plot(grid, g, color="C3", **style)
        _plots.plain_log(a1)
        if np.nanmax(f) > 300 * np.nanmin(f):  # label the decades only
            a1.yaxis.set_minor_formatter("")
        a1.set_title(f"T = {T} step{'s' * (T != 1)}"
                     + (f" ({int(bad.sum())} faulted points: gaps)" if bad.any() else ""))
        a2.set_yscale("symlog", linthresh=1.0)
        ticks = [0.0]  # and 3 or fewer decades per sign: no crowded labels round the band
        for sign in (1, -1):
            e = int(np.log10(max(1.0, np.nanmax(np.append(sign * g, 0)))))
            ticks += [sign * 10.0 ** k for k in range(-(-e // 3), e + 1, -(-e // 3) or 1)]
        a2.set_yticks(ticks)
        a2.minorticks_off()
        a2.axhspan(-1.0, 1.0, color="0.93", zorder=0)
        a2.set_xlabel(_X[hyper])
    axes[0, 0].set_ylabel("final training loss f\n(NLL, nats, log scale)")
    axes[1, 0].set_ylabel(f"exact hypergradient {_G[hyper]}\n(symlog, linear in grey band)")
    fixed = (rf"$\alpha$ = {cfg['lr']:g}" if hyper == "scale"
             else rf"$\log s$ = {cfg['log_scale']:g}")
    fig.suptitle(f"Training loss f and its exact (reversible) hypergradient, {len(grid)} grid "
                 f"points\n{fixed}, $\\gamma$ = {cfg['momentum']:g}, {cfg['n_train']} examples, "
                 f"MLP {'-'.join(map(str, cfg['sizes']))}")
    return fig


def _paper_view(res, T):
    """The zoom on the paper's figure-10 axes: linear, cut at [0, 0.5] and [-0.5, 0.5]."""
    grid = res["lr_zoom/grid"]
    fig, axes = _plots.figure(1, 2, width=7, height=5.5, sharex=True)
    for ax, key, lim in zip(axes, ("loss", "grad"), ((0, 0.5), (-0.5, 0.5))):
        y = res[f"lr_zoom/T{T}/{key}"]
        out = ~((y >= lim[0]) & (y <= lim[1]))
        ax.plot(grid, np.clip(y, *lim), color="C0" if key == "loss" else "k", lw=0.8)
        ax.plot(grid[out], np.clip(np.nan_to_num(y[out]), *lim), "|", color="C3", ms=5,
                label=f"{int(out.sum())} of {len(y)} points beyond the axis (drawn at its edge)")
        ax.set(ylim=(lim[0] - 0.02, lim[1] + 0.02),
               ylabel="training loss f" if key == "loss" else _G["lr"])
        ax.legend(loc="upper left", fontsize=7)
    axes[1].set_xlabel(_X["lr"])
    fig.suptitle(f"The learning-rate zoom on the paper's figure-10 axes (T = {T})")
    return fig


def _fd_figure(res, T):
    """One panel per point: the FD error against h, the unrolled gradients' errors."""
    h, fd, rev, pts = res["fd/h"], res["fd/fd"], res["fd/exact"], res["fd/points"]
    fig, axes = _plots.figure(len(rev), width=2.6 * len(rev) + 1.2, height=4.6, sharey=True)
    for i, ax in enumerate(np.atleast_1d(axes)):
        ax.plot(h, np.maximum(_rel(fd[i], rev[i]), 1e-17), "o-", color="0.3",
                label="central finite difference")
        for dt, c, ls in (("float64", "C0", "-"), ("float32", "C1", "--")):
            ax.axhline(max(_rel(res[f"fd/unrolled_{dt}"][i], rev[i]), 1e-17), color=c, ls=ls,
                       lw=1.5, label=f"unrolled autodiff, {dt}")
        ax.axhline(1.0, color="C3", lw=0.8, ls=":", label="100% error")
        what = (rf"$\log s$ = {pts[i, 0]:g}" if res["fd/is_scale"][i]
                else rf"$\log\alpha$ = {pts[i, 1]:g}")
        ax.set(xscale="log", yscale="log", xlim=(h.max() * 3, h.min() / 3), xlabel="FD step h",
               title=f"{what}\nexact gradient {rev[i]:.3g}")
    np.atleast_1d(axes)[0].set_ylabel("|other - exact| / |exact|\n(below 1e-17 drawn at 1e-17)")
    fig.legend(*np.atleast_1d(axes)[0].get_legend_handles_labels(), loc="outside lower center",
               ncol=4)
    fig.suptitle("Numerical error or genuine chaos? Finite differences of the float64 loss and "
                 f"unrolled autodiff\nagainst the exact reversible hypergradient (T = {T})")
    return fig


@_plots.styled
def plot(path) -> list[Path]:
    """Re-render the figures from results.npz and config.json."""
    run = _plots.saved(path, "results")
    res, cfg, out, paths = run.arrays["results"], run.config, run.run.figures, []
    for name, (hyper, _) in SWEEPS.items():
        if len(res[f"{name}/steps"]):
            _plots.save(_sweep_figure(res, cfg, name, hyper), out,
                        name if "zoom" in name else f"{name}_sweep", paths)
    if len(res["lr_zoom/steps"]):
        _plots.save(_paper_view(res, int(res["lr_zoom/steps"][-1])), out, "figure10", paths)
    if "fd/h" in res:
        _plots.save(_fd_figure(res, cfg["fd_steps"]), out, "fd_check", paths)
    return paths


EXPERIMENT = Experiment(
    "chaos", "The edge of chaos: training loss and exact hypergradient vs initial scale and "
    "learning rate (paper figure 10); finite differences and float32/64 autodiff vs exact.",
    Config, SMOKE, run, plot)
