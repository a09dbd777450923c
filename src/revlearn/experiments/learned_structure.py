"""Learned structure: the regulariser that turns a fully connected layer into a
convolution, made learnable.

Model: a tanh net 784 - H - 10 whose H = G * G * C first-layer units sit on a
G x G grid over the 28 x 28 image, C channels per position: unit u = (gy, gx, c)
sits at pixel pos_u = (s gy + s/2, s gx + s/2), s = 28 / G, and its weight
from pixel p is W[p, u]. Every (pixel, unit) pair has a relative offset
d = p - pos_u in [-27, 27]^2. The training loss is

    L_train(w, t) = NLL(w; batch_t)
                    + sum_{p, u} lambda[p - pos_u] W[p, u]^2                  (offset L2)
                    + sum_{u ~ u'} sum_p tau[p - pos_u] (W[p, u] - W[p + pos_u' - pos_u, u'])^2
                    + lambda_out ||W_out||^2

where u ~ u' runs over the pairs of horizontally or vertically neighbouring
units of the same channel (pixels outside the image have no weight, so those
terms are absent). A convnet with kernel k and stride s is the limit
lambda[d] = inf outside the k x k window, tau[d] = inf inside it.

`Geometry` holds the index arrays (an offset d is the flat index
(dy + 27) * 55 + (dx + 27)): positions [G] (pixel s g + s // 2 of row / column
g), l2_index [784, H] (the offset of every (pixel, unit) pair), tie_h_index
[28, 28 - s, G, G - 1] and tie_v_index [28 - s, 28, G - 1, G] (the offset,
relative to the left / upper unit, of every horizontal / vertical pair at each of
its pixels), l2_count and tie_count [55, 55] (how many terms each strength weighs).

Hyperparameters theta = (log lambda [55, 55], log tau [55, 55], log lambda_out),
each strength = cap * sigmoid(u - log cap) (log space below a soft ceiling
cap = `max_strength`), starting flat at `init_l2` and `init_tie`. Meta-objective:
the validation NLL after T steps of SGD with momentum from initial weights
N(0, 1/fan-in) and a minibatch order drawn from key_i = iteration_key(seed, i);
its gradient comes from `revlearn.sgd(..., method=Reversible(...))` and Adam
takes the meta-steps.

Baselines (same data, T, batch, alpha, gamma): the same net with one global L2
(lambda = lambda_out = const, tau = 0) and a convnet (`revlearn.models.convnet`:
C channels of k x k filters with stride s, i.e. on the same G x G grid, then the
same dense layer) with global L2, each at the setting of `l2_grid` (and
`conv_kernels`) of lowest validation loss. Every model is evaluated on
`n_eval` keys never used in meta-training, metrics averaged over them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from matplotlib.ticker import FuncFormatter

import revlearn
from revlearn import models
from revlearn.meta import RunDir, iteration_key, meta_optimize

from . import _plots
from ._config import MnistConfig
from ._registry import Experiment
from ._splits import evaluate, mnist_splits
from ._validate import (at_least, at_most, check_clip, check_decay, check_pool, check_range,
                        fail, positive)

__all__ = ["Config", "run", "plot", "EXPERIMENT", "Geometry", "geometry", "structure_penalty",
           "active_counts", "strengths", "flat_hypers", "best_index"]

SIDE = 28
N_OFF = 2 * SIDE - 1  # offsets -27 .. 27 along each axis
_D = np.arange(N_OFF) - (SIDE - 1)
RADIUS = np.hypot(_D[:, None], _D[None, :])  # [55, 55] the length |d| of each offset
RINGS = np.arange(0.0, 40.0, 2.0)  # the radial profile's bins of |d|


@dataclasses.dataclass(frozen=True)
class Config(MnistConfig):
    """Settings of `learned-structure` (defaults: a few minutes on 2 CPU cores)."""

    grid: int = 7            # G: units on a G x G grid (28 must be a multiple of G)
    channels: int = 4        # C: units per grid position
    n_train: int = 1000
    n_valid: int = 2000
    n_test: int = 5000
    batch_size: int = 100
    steps: int = 100
    lr: float = 0.5
    momentum: float = 0.9
    init_l2: float = 1e-2     # a strong flat start: the hypergradient relaxes it where it hurts
    init_tie: float = 1e-1
    max_strength: float = 1.0  # soft ceiling of every strength (keeps SGD stable at lr 0.5)
    meta_lr: float = 0.4
    meta_iterations: int = 25
    l2_grid: tuple[float, ...] = (0.0, 1e-4, 1e-3, 1e-2)
    conv_kernels: tuple[int, ...] = (5, 9, 13)  # empty: no convnet baseline
    n_eval: int = 3
    clip: float | None = None

    def check(self):
        at_least(self, 1, "grid", "channels", "n_train", "n_valid", "n_test", "batch_size",
                 "steps", "n_eval")
        if SIDE % self.grid:
            fail("grid", self.grid, f"must divide {SIDE} (1, 2, 4, 7, 14 or 28), so the units "
                 "sit on a regular grid over the image", "pass e.g. grid=7 (the default)")
        at_most(self, "batch_size", "n_train")
        check_pool(self, "n_train", "n_valid", "n_test")
        check_decay("momentum", self.momentum)
        positive(self, "lr", "meta_lr", "max_strength")
        for name in ("init_l2", "init_tie"):
            check_range(name, getattr(self, name), 0, self.max_strength, lo_open=True,
                        hi_open=True, fix=f"pass a strength in (0, max_strength="
                        f"{self.max_strength}) (it is learned in log space)")
        if any(k < 1 for k in self.conv_kernels):
            fail("conv_kernels", self.conv_kernels, "must list kernel sizes >= 1",
                 "pass e.g. conv_kernels=5,9,13, or conv_kernels= for no convnet baseline")
        if not self.l2_grid or any(not 0 <= g < self.max_strength for g in self.l2_grid):
            fail("l2_grid", self.l2_grid, f"must list L2 strengths in [0, max_strength="
                 f"{self.max_strength})", "pass e.g. l2_grid=0,1e-4,1e-3,1e-2 (the default)")
        at_least(self, 0, "meta_iterations")
        check_clip(self)

    @property
    def geom(self) -> Geometry:
        return geometry(self.grid, self.channels)


SMOKE = Config(grid=7, channels=1, n_train=200, n_valid=200, n_test=200, batch_size=50, steps=6,
               meta_iterations=2, l2_grid=(1e-3,), conv_kernels=(), n_eval=1)


# -- geometry --------------------------------------------------------------------

class Geometry(NamedTuple):
    """Index arrays of the grid of units (shapes in the module docstring)."""

    grid: int
    channels: int
    stride: int
    positions: np.ndarray
    l2_index: np.ndarray
    tie_h_index: np.ndarray
    tie_v_index: np.ndarray
    l2_count: np.ndarray
    tie_count: np.ndarray

    @property
    def hidden(self) -> int:
        return self.grid * self.grid * self.channels


def _count(*indices) -> np.ndarray:
    return sum(np.bincount(i.ravel(), minlength=N_OFF * N_OFF) for i in indices).reshape(
        N_OFF, N_OFF)


@functools.lru_cache(maxsize=8)
def geometry(grid: int, channels: int) -> Geometry:
    """The geometry of a G x G grid of units with C channels over a 28 x 28 image."""
    s = SIDE // grid
    pos = s * np.arange(grid) + s // 2
    off = np.arange(SIDE)[:, None] - pos[None, :] + SIDE - 1      # [28, G]: p - pos + 27
    idx = off[:, None, :, None] * N_OFF + off[None, :, None, :]    # [py, px, gy, gx]
    l2_index = np.repeat(idx[..., None], channels, axis=-1).reshape(SIDE * SIDE, -1)
    tie_h, tie_v = idx[:, : SIDE - s, :, : grid - 1], idx[: SIDE - s, :, : grid - 1, :]
    return Geometry(grid, channels, s, pos, l2_index.astype(np.int32), tie_h.astype(np.int32),
                    tie_v.astype(np.int32), _count(l2_index), channels * _count(tie_h, tie_v))


def active_counts(geom: Geometry, active: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """([55, 55] L2, [55, 55] tie): how many terms of each offset's strength involve a
    pixel that is non-zero in some training image (`active`: bool [784]). Offsets with
    none only weigh weights of blank pixels, whose hypergradient is (almost) zero."""
    active = np.asarray(active, bool).reshape(-1)
    if active.shape != (SIDE * SIDE,):
        raise ValueError(f"active must have {SIDE * SIDE} pixels, got {active.shape}")
    a2, s, g = active.reshape(SIDE, SIDE), geom.stride, geom.grid
    pair_h = (a2[:, : SIDE - s] | a2[:, s:])[:, :, None, None] & np.ones((1, 1, g, g - 1), bool)
    pair_v = (a2[: SIDE - s, :] | a2[s:, :])[:, :, None, None] & np.ones((1, 1, g - 1, g), bool)
    return (_count(geom.l2_index[active]),
            geom.channels * _count(geom.tie_h_index[pair_h], geom.tie_v_index[pair_v]))


def structure_penalty(w: jax.Array, l2_offset: jax.Array, tie_offset: jax.Array,
                      geom: Geometry) -> jax.Array:
    """The offset L2 plus the tying penalty of a first layer w [784, H] (module
    docstring), with strengths l2_offset, tie_offset [55, 55]."""
    g, c, s = geom.grid, geom.channels, geom.stride
    pen = jnp.sum(l2_offset.reshape(-1)[geom.l2_index] * w ** 2)
    w5 = w.reshape(SIDE, SIDE, g, g, c)
    tie = tie_offset.reshape(-1)
    if g > 1:
        dh = w5[:, : SIDE - s, :, : g - 1, :] - w5[:, s:, :, 1:, :]
        dv = w5[: SIDE - s, :, : g - 1, :, :] - w5[s:, :, 1:, :, :]
        pen = pen + jnp.sum(tie[geom.tie_h_index][..., None] * dh ** 2)
        pen = pen + jnp.sum(tie[geom.tie_v_index][..., None] * dv ** 2)
    return pen


# -- the problem -----------------------------------------------------------------

def strengths(theta: dict, cap: float) -> dict:
    """{"l2_offset", "tie_offset", "l2_out"} from theta {"log_l2_offset", ...}:
    cap * sigmoid(u - log cap) = exp(u) / (1 + exp(u) / cap), which is exp(u) while
    exp(u) << cap and never exceeds cap (strong tying at lr alpha would make SGD diverge)."""
    return {k[len("log_"):]: cap * jax.nn.sigmoid(u - math.log(cap)) for k, u in theta.items()}


def flat_hypers(l2: float, tie: float, cap: float) -> dict:
    """theta of flat maps: lambda = lambda_out = l2, tau = tie (0 <= each < cap)."""
    def uncap(v):  # the inverse of `strengths`
        if not 0 <= v < cap:
            raise ValueError(f"strength {v} must lie in [0, max_strength={cap})")
        return math.log(v) - math.log1p(-v / cap) if v > 0 else -np.inf
    f64 = jnp.float64  # explicit dtypes: a weakly typed leaf would recompile after one update
    return {"log_l2_offset": jnp.full((N_OFF, N_OFF), uncap(l2), f64),
            "log_tie_offset": jnp.full((N_OFF, N_OFF), uncap(tie), f64),
            "log_l2_out": jnp.asarray(uncap(l2), f64)}


def _loss(params, h, step, *, static: Config, kernel: int):
    xb, yb = models.minibatch(h["x"], h["y"], static.batch_size, step, h["key"])
    if kernel:  # the convnet baseline, global L2
        logp = models.convnet_apply(params, xb, stride=static.geom.stride)
        return models.nll(logp, yb) + h["l2"] * sum(jnp.sum(layer["w"] ** 2) for layer in params)
    return (models.nll(models.mlp_apply(params, xb), yb)
            + structure_penalty(params[0]["w"], h["l2_offset"], h["tie_offset"], static.geom)
            + h["l2_out"] * jnp.sum(params[1]["w"] ** 2))


def _train(hyper, key, data, static: Config, method, kernel: int = 0):
    """w_T, from the initial weights and minibatch order of `key`, of the structured net
    (kernel 0, hyper = theta) or of the convnet with k x k filters (hyper = its L2)."""
    k_init, k_batch = jax.random.split(key)
    if kernel:
        h = {"l2": hyper}
        params0 = models.convnet_init(k_init, channels=(static.channels,), kernel=kernel,
                                      stride=static.geom.stride, dtype=jnp.float64)
    else:
        h = strengths(hyper, static.max_strength)
        params0 = models.mlp_init(k_init, [SIDE * SIDE, static.geom.hidden, 10], dtype=jnp.float64)
    x, y = data["train"]
    return revlearn.sgd(functools.partial(_loss, static=static, kernel=kernel), params0,
                        {**h, "key": k_batch, "x": x, "y": y}, lr=static.lr,
                        momentum=static.momentum, steps=static.steps, method=method)


def meta_objective(theta, key, data, static: Config, method):
    """(validation NLL after training, metrics of w_T)."""
    metrics = evaluate(models.mlp_apply, _train(theta, key, data, static, method), data)
    return metrics["valid_loss"], metrics


@functools.partial(jax.jit, static_argnames="static")
def _hypergrad(theta, key, data, static: Config):
    method = revlearn.Reversible(min_momentum=static.momentum)
    (loss, metrics), grads = jax.value_and_grad(meta_objective, has_aux=True)(
        theta, key, data, static, method)
    return loss, grads, metrics


@functools.partial(jax.jit, static_argnames=("static", "kernel"))
def _retrain(hyper, keys, data, static: Config, kernel: int = 0):
    """(metrics averaged over `keys`, w_T of the first key) of `_train`. Forward only:
    `Unrolled` is the same run as `Reversible` to within rounding, and quicker to compile."""
    apply = (functools.partial(models.convnet_apply, stride=static.geom.stride) if kernel
             else models.mlp_apply)

    def one(key):
        params = _train(hyper, key, data, static, revlearn.Unrolled(), kernel)
        return evaluate(apply, params, data), params
    metrics, params = jax.lax.map(one, keys)
    return ({k: jnp.mean(v) for k, v in metrics.items()},
            jax.tree_util.tree_map(lambda a: a[0], params))


def best_index(valid_losses) -> int:
    """The entry with the lowest finite validation loss (ties: the first)."""
    v = np.where(np.isfinite(valid_losses), valid_losses, np.nan)
    if np.isnan(v).all():
        raise ValueError(f"no grid point has a finite validation loss: {v.tolist()}")
    return int(np.nanargmin(v))


# -- run -------------------------------------------------------------------------

def run(config: Config, run_dir: RunDir) -> dict:
    t0 = time.perf_counter()
    data = mnist_splits(config, "train", "valid", "test")
    static, cap, n_l2 = config.program(), config.max_strength, len(config.l2_grid)
    theta0 = flat_hypers(config.init_l2, config.init_tie, cap)
    result = meta_optimize(
        lambda th, i: _hypergrad(th, iteration_key(config.seed, i), data, static), theta0,
        optax.adam(config.meta_lr), config.meta_iterations, run_dir, clip=config.clip,
        progress_metric="valid_loss", description="learned-structure")
    run_dir.save_arrays("hypers_final", result.hypers)
    t_meta = time.perf_counter() - t0

    n = config.meta_iterations  # keys never used in meta-training
    keys = jnp.stack([iteration_key(config.seed, n + k) for k in range(config.n_eval)])
    rows, w = {}, {}
    for name, th in (("fc_initial", theta0), ("learned", result.hypers)):
        rows[name], w[name] = _retrain(th, keys, data, static)
    grids = {"fc": [_retrain(flat_hypers(g, 0.0, cap), keys, data, static)[0]
                    for g in config.l2_grid],
             "conv": [_retrain(jnp.asarray(g, jnp.float64), keys, data, static, kernel)[0]
                      for kernel in config.conv_kernels for g in config.l2_grid]}
    grids = {k: {m: np.reshape([float(r[m]) for r in v], (-1, n_l2)) for m in v[0]}
             for k, v in grids.items() if v}  # {metric: [kernel (fc: 1), l2]}
    best = {k: divmod(best_index(v["valid_loss"].ravel()), n_l2) for k, v in grids.items()}
    rows.update({f"{k}_global": {m: v[m][best[k]] for m in v} for k, v in grids.items()})
    results = {"maps": strengths(result.hypers, cap), "rows": rows, "grids": grids,
               "w_before": w["fc_initial"][0]["w"], "w_after": w["learned"][0]["w"]}
    results["count"] = dict(zip(("l2", "tie"), active_counts(
        config.geom, np.asarray(data["train"][0]).max(0) > 0)))
    run_dir.save_arrays("results", results)

    summary = {"hidden_units": config.geom.hidden, "n_hyperparameters": 2 * N_OFF * N_OFF + 1,
               "meta_iterations": n}
    for what in ("error", "loss"):
        summary.update({f"test_{what}_{k}": float(m[f"test_{what}"]) for k, m in rows.items()})
    summary["valid_loss_learned"] = float(rows["learned"]["valid_loss"])
    summary["fc_best_l2"] = float(config.l2_grid[best["fc"][1]])
    if "conv" in best:
        summary["conv_best_kernel"] = int(config.conv_kernels[best["conv"][0]])
        summary["conv_best_l2"] = float(config.l2_grid[best["conv"][1]])
    for name in ("l2", "tie"):  # geometric means near (|d| <= 4) and far (|d| >= 10) from the unit
        logv = np.log(np.asarray(results["maps"][f"{name}_offset"]))
        ok = results["count"][name] > 0
        summary[f"{name}_near_geomean"] = float(np.exp(logv[ok & (RADIUS <= 4)].mean()))
        summary[f"{name}_far_geomean"] = float(np.exp(logv[ok & (RADIUS >= 10)].mean()))
    summary["meta_time_s"] = t_meta
    summary["wall_time_s"] = time.perf_counter() - t0
    plot(run_dir.path)
    return summary


def radial_profile(values: np.ndarray, count: np.ndarray, edges=RINGS):
    """(bin centres, geometric means): the mean of log10(values) over the offsets with
    count > 0, in bins of |d| (pixels), as 10^mean; empty bins left out."""
    logv, ok = np.log10(np.maximum(values, 1e-300)), count > 0
    sel = [ok & (RADIUS >= lo) & (RADIUS < hi) for lo, hi in zip(edges[:-1], edges[1:])]
    return (np.array([0.5 * (lo + hi) for lo, hi, s in zip(edges[:-1], edges[1:], sel) if s.any()]),
            np.array([10 ** logv[s].mean() for s in sel if s.any()]))


# -- plot ------------------------------------------------------------------------

@_plots.styled
def plot(path) -> list[Path]:
    """Re-render the figures from results.npz and metrics.jsonl."""
    run = _plots.saved(path, "results")
    res, cfg, out, paths = run.arrays["results"], run.config, run.run.figures, []
    g, c = cfg["grid"], cfg["channels"]

    # 1. the learned offset maps and their radial profiles
    fig, (ax1, ax2, ax3) = _plots.figure(3, width=14, height=4.6)
    power = FuncFormatter(lambda v, _: f"$10^{{{v:g}}}$")
    for ax, name, title in ((ax1, "l2", "L2 strength $\\lambda$[d]"),
                            (ax2, "tie", "tying strength $\\tau$[d]")):
        vals = np.ma.masked_where(res[f"count/{name}"] == 0, np.log10(res[f"maps/{name}_offset"]))
        im = ax.imshow(vals, extent=(-SIDE + 0.5, SIDE - 0.5, SIDE - 0.5, -SIDE + 0.5),
                       cmap=matplotlib.colormaps["viridis"].with_extremes(bad="0.75"),
                       interpolation="nearest")
        fig.colorbar(im, ax=ax, shrink=0.85, format=power,
                     label=f"strength (log scale; initial {cfg[f'init_{name}']:g})")
        ax.plot([0], [0], "+", color="w", ms=10, mew=1.5)
        ax.grid(False)
        ax.set(xlabel="offset $d_x$ = pixel x $-$ unit x (pixels)",
               ylabel="offset $d_y$ = pixel y $-$ unit y (pixels)", title=f"Learned {title}")
    lims = []
    for name, color, label in (("l2", "C0", "L2 $\\lambda$"), ("tie", "C1", "tie $\\tau$")):
        r, gm = radial_profile(res[f"maps/{name}_offset"], res[f"count/{name}"])
        ax3.plot(r, gm, "o-", color=color, label=f"learned {label}")
        ax3.axhline(cfg[f"init_{name}"], color=color, ls="--", lw=1.2, label=f"initial {label}")
        lims += [gm.min(), gm.max(), cfg[f"init_{name}"]]
    _plots.plain_log(ax3)
    ax3.set_ylim(min(lims) / 1.6, max(lims) * 1.6)  # the initial lines clear of the frame
    ax3.set(xlabel="offset length |d| (pixels, rings 2 wide)",
            ylabel="geometric mean strength over the ring", title="Radial profile of the maps")
    ax3.legend()
    fig.suptitle(f"Learned regulariser of a fully connected first layer ({g}x{g} grid of units, "
                 f"{c} channel{'s' * (c > 1)} each)\ngrey: offsets that only pair a unit with "
                 "pixels blank in every training image (no hypergradient); +: d = 0")
    _plots.save(fig, out, "offset_maps", paths)

    # 2. example filters before / after
    pos, mid = geometry(g, c).positions, g // 2
    corners = [(1, 1), (1, g - 2), (g - 2, 1), (g - 2, g - 2)] if g >= 4 else [(0, 0)]
    picks = list(dict.fromkeys([(mid, mid, ch) for ch in range(min(c, 4))]
                               + [(gy, gx, 0) for gy, gx in corners]))
    wmax = float(np.percentile(np.abs([res["w_before"], res["w_after"]]), 99.5)) or 1.0
    fig, axes = _plots.figure(len(picks), 2, width=1.45 * len(picks) + 1.6, height=3.6)
    axes = np.reshape(axes, (2, len(picks)))
    for row, (w, label) in enumerate(((res["w_before"], "before:\ninitial (flat)\nhyperparameters"),
                                      (res["w_after"], "after:\nlearned\nhyperparameters"))):
        im = _plots.image_grid(
            axes[row], [w[:, (gy * g + gx) * c + ch].reshape(SIDE, SIDE) for gy, gx, ch in picks],
            [f"unit ({gy},{gx}), ch {ch}" if row == 0 else "" for gy, gx, ch in picks],
            cmap="RdBu_r", vmin=-wmax, vmax=wmax, interpolation="nearest")
        for ax, (gy, gx, _) in zip(axes[row], picks):
            ax.plot([pos[gx]], [pos[gy]], "+", color="k", ms=7)
        axes[row, 0].set_ylabel(label, fontsize=9)
    fig.colorbar(im, ax=axes, shrink=0.85, label="weight (shared scale)")
    fig.suptitle("First-layer filters after training, same initialisation and minibatch order "
                 "(+: the unit's grid position)")
    _plots.save(fig, out, "filters", paths)

    # 3. meta-learning curves against the baselines, one legend below (none over the curves)
    fig = _plots.meta_curves(run.metrics, "net", {
        label: {k: float(res[f"rows/{name}/{k}"]) for k in ("test_loss", "test_error")}
        for name, label in (("fc_global", "fully connected, best global L2"),
                            ("conv_global", "convnet, best kernel and L2"))
        if f"rows/{name}/test_loss" in res})
    if run.metrics:
        for ax in fig.axes:
            ax.get_legend().remove()
        fig.legend(*fig.axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=3)
    _plots.save(fig, out, "meta_curves", paths)
    return paths


EXPERIMENT = Experiment(
    "learned-structure", "Learn per-offset L2 and weight-tying strengths of a fully connected "
    "layer (generalised convnet) and compare with FC and conv baselines.", Config, SMOKE, run, plot)
