"""Per-weight L2: one learned L2 strength for every weight (paper section 3.4).

Model: logistic regression on MNIST (`model="logistic"`, w = [{"w": [784, 10],
"b": [10]}], w_0 = 0), or a 784-100-10 tanh MLP (`model="mlp"`, w_0 drawn once
from the seed and kept fixed, so each hidden unit keeps its identity across
meta-iterations). Training (T steps of SGD with momentum, minibatch of step t
drawn from key_i = fold_in(PRNGKey(seed), i) at meta-iteration i):

    L_train(w, t) = NLL(w; batch_t) + sum_j lambda_j w_j^2,   lambda_j = exp(theta_j)
    v_{t+1} = gamma v_t - (1 - gamma) grad L_train(w_t, t),   w_{t+1} = w_t + alpha v_{t+1}

Hyperparameters: theta = log lambda, one per weight and bias (7,850 for
logistic regression, 79,510 for the MLP), all starting at `init_l2`.
Meta-objective, as in the original code (a small Gaussian prior on lambda):

    f(theta) = NLL(w_T; valid) + meta_penalty * sum_j lambda_j^2

Its gradient comes from `revlearn.sgd(..., method=Reversible(...))`; an optax
optimiser (plain gradient descent with the original meta-step 1000 by default)
updates theta for `meta_iterations` iterations.

Baseline: the same training run (same T, batch, alpha, gamma) with one global
L2 strength from `grid`; the grid value with the lowest validation loss (the
meta-objective) is "the best global L2". The learned penalties and every grid
value are evaluated alike: retrained on `n_eval` minibatch orders that
meta-training never used (key_N, key_{N+1}, ...), metrics averaged over them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from pathlib import Path
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import revlearn
from revlearn import data as rdata
from revlearn import models
from revlearn.meta import RunDir, save_figure, iteration_key, meta_optimize

from . import _plots
from ._registry import Experiment, register
from ._config import MnistConfig
from ._validate import (
    at_least,
    check_clip,
    check_decay,
    check_pool,
    fail,
    nonnegative,
    positive,
)

__all__ = ["Config", "run", "plot", "EXPERIMENT"]

_SPLITS, _SPLIT_NAMES = tuple(_plots.SPLIT_NAMES), _plots.SPLIT_NAMES


@dataclasses.dataclass(frozen=True)
class Config(MnistConfig):
    """Settings of `l2-per-weight`. Defaults follow the original run (batch 200,
    50 steps, alpha 1, gamma 0.9, meta-step 1000, 50 meta-iterations,
    meta-penalty 0.01, initial lambda = exp(log 0.01 + 1)), with 5k / 4k / 1k
    train / validation / test images instead of 10k / 10k / 1k, since the
    embedded data set has 10k images in all."""

    model: Literal["logistic", "mlp"] = "logistic"
    hidden: int = 100
    n_train: int = 5000
    n_valid: int = 4000
    n_test: int = 1000
    batch_size: int = 200
    steps: int = 50
    lr: float = 1.0
    momentum: float = 0.9
    init_l2: float = 0.01 * math.e
    meta_optimizer: Literal["sgd", "adam"] = "sgd"
    meta_lr: float = 1000.0
    meta_iterations: int = 50
    meta_penalty: float = 0.01
    grid: tuple[float, ...] = (0.0, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
    n_eval: int = 5
    clip: float | None = None

    def check(self):
        at_least(self, 1, "n_train", "n_valid", "n_test", "batch_size", "steps", "hidden",
                 "n_eval")
        if self.batch_size > self.n_train:
            fail("batch_size", self.batch_size, f"exceeds n_train={self.n_train}",
                 "pass batch_size <= n_train")
        check_pool(self, "n_train", "n_valid", "n_test")
        check_decay("momentum", self.momentum)
        positive(self, "lr", "meta_lr")
        positive(self, "init_l2", why=" (it is learned in log space)")
        nonnegative(self, "meta_penalty")
        if not self.grid or any(g < 0 for g in self.grid):
            fail("grid", self.grid, "must list global L2 strengths >= 0",
                 "pass e.g. grid=0,1e-3,1e-2")
        at_least(self, 0, "meta_iterations")
        check_clip(self)


SMOKE = Config(n_train=400, n_valid=300, n_test=300, batch_size=100, steps=8, meta_iterations=3,
               grid=(0.0, 1e-2), n_eval=2)


# -- the problem -----------------------------------------------------------------

class _Static(NamedTuple):
    """The settings that fix the compiled programs (hashable: a jit static argument)."""

    steps: int
    batch_size: int
    lr: float
    momentum: float
    meta_penalty: float

    @classmethod
    def of(cls, config: Config) -> _Static:
        return cls(config.steps, config.batch_size, config.lr, config.momentum,
                   config.meta_penalty)


def _splits(config: Config) -> dict[str, tuple[jax.Array, jax.Array]]:
    pool = rdata.load_mnist(config.data, config.data_dir)
    parts = rdata.split(pool, {"train": config.n_train, "valid": config.n_valid,
                               "test": config.n_test}, config.seed)
    return {k: (jnp.asarray(d.images, jnp.float64), jnp.asarray(d.onehot, jnp.float64))
            for k, d in parts.items()}


def _params0(config: Config) -> list[dict]:
    """w_0: zeros for logistic regression; for the MLP N(0, 1/fan_in) weights drawn
    once from a key of the seed that no minibatch order uses."""
    if config.model == "logistic":
        return models.logistic_init(jax.random.PRNGKey(0), dtype=jnp.float64)
    init_key = jax.random.split(jax.random.PRNGKey(config.seed))[1]
    return models.mlp_init(init_key, [784, config.hidden, 10], dtype=jnp.float64)


def _train_loss(params, h, step, *, batch_size):
    xb, yb = models.minibatch(h["x"], h["y"], batch_size, step, h["key"])
    return models.nll(models.mlp_apply(params, xb), yb) + models.l2_penalty(params, h["l2"])


def _train(l2, params0, key, data, static: _Static, method):
    """w_T after T steps with per-weight L2 strengths `l2` (a pytree like params0)."""
    x, y = data["train"]
    return revlearn.sgd(functools.partial(_train_loss, batch_size=static.batch_size), params0,
                        {"l2": l2, "key": key, "x": x, "y": y}, lr=static.lr,
                        momentum=static.momentum, steps=static.steps, method=method)


def _evaluate(params, data) -> dict:
    out = {}
    for name in _SPLITS:
        x, y = data[name]
        logp = models.mlp_apply(params, x)
        out[f"{name}_loss"] = models.nll(logp, y)
        out[f"{name}_error"] = models.error_rate(logp, y).astype(jnp.float64)
    return out


def meta_objective(theta, params0, key, data, static: _Static, method):
    """(f(theta), metrics of w_T): validation NLL after training plus the
    meta-penalty on lambda = exp(theta["log_l2"])."""
    l2 = jax.tree_util.tree_map(jnp.exp, theta["log_l2"])
    params = _train(l2, params0, key, data, static, method)
    metrics = _evaluate(params, data)
    penalty = sum(jnp.sum(lam ** 2) for lam in jax.tree_util.tree_leaves(l2))
    metrics["meta_penalty"] = static.meta_penalty * penalty
    metrics["mean_log_l2"] = (sum(jnp.sum(t) for t in jax.tree_util.tree_leaves(theta))
                              / sum(t.size for t in jax.tree_util.tree_leaves(theta)))
    return metrics["valid_loss"] + metrics["meta_penalty"], metrics


@functools.partial(jax.jit, static_argnames="static")
def _hypergrad(theta, params0, key, data, static: _Static):
    """(f(theta), df/dtheta by exact reversal, metrics)."""
    method = revlearn.Reversible(min_momentum=static.momentum)
    (loss, metrics), grads = jax.value_and_grad(meta_objective, has_aux=True)(
        theta, params0, key, data, static, method)
    return loss, grads, metrics


@functools.partial(jax.jit, static_argnames="static")
def _retrain(l2, params0, keys, data, static: _Static):
    """Train once per key of `keys` [n, 2] with fixed `l2`: (metrics averaged over
    the keys, w_T of the first key)."""
    def one(key):
        params = _train(l2, params0, key, data, static,
                        revlearn.Reversible(min_momentum=static.momentum))
        return _evaluate(params, data), params

    metrics, params = jax.lax.map(one, keys)
    return ({k: jnp.mean(v) for k, v in metrics.items()},
            jax.tree_util.tree_map(lambda a: a[0], params))


def _eval_keys(config: Config) -> jax.Array:
    """Minibatch orders never used in meta-training: key_N .. key_{N + n_eval - 1}."""
    n = config.meta_iterations
    return jnp.stack([iteration_key(config.seed, n + k) for k in range(config.n_eval)])


def best_grid_index(valid_losses) -> int:
    """The grid point with the lowest validation loss (ties: the first; NaN never wins)."""
    v = np.asarray(valid_losses, dtype=float)
    if not np.isfinite(v).any():
        raise ValueError(f"no grid point has a finite validation loss: {v.tolist()}")
    return int(np.nanargmin(np.where(np.isfinite(v), v, np.nan)))


def _flat(tree, prefix: str) -> dict:
    """{prefix_l_w: array, prefix_l_b: array} for a list of layers."""
    return {f"{prefix}_{i}_{k}": np.asarray(layer[k]) for i, layer in enumerate(tree)
            for k in ("w", "b")}


# -- run -------------------------------------------------------------------------

def run(config: Config, run_dir: RunDir) -> dict:
    t0 = time.perf_counter()
    data = _splits(config)
    static = _Static.of(config)
    params0 = _params0(config)
    theta0 = {"log_l2": jax.tree_util.tree_map(
        lambda p: jnp.full(p.shape, math.log(config.init_l2), jnp.float64), params0)}
    n_hypers = sum(p.size for p in jax.tree_util.tree_leaves(params0))

    def hypergrad_fn(theta, iteration):
        return _hypergrad(theta, params0, iteration_key(config.seed, iteration), data, static)

    opt = (optax.sgd(config.meta_lr) if config.meta_optimizer == "sgd"
           else optax.adam(config.meta_lr))
    result = meta_optimize(hypergrad_fn, theta0, opt, config.meta_iterations, run_dir,
                           clip=config.clip, progress_metric="valid_loss",
                           description=f"l2-per-weight ({config.model})")
    theta = result.hypers
    run_dir.save_arrays("hypers_final", theta)
    t_meta = time.perf_counter() - t0

    keys = _eval_keys(config)
    l2_learned = jax.tree_util.tree_map(jnp.exp, theta["log_l2"])
    learned, w_learned = _retrain(l2_learned, params0, keys, data, static)
    grid = {f"{k}": [] for k in ("valid_loss", "valid_error", "test_loss", "test_error",
                                 "train_loss", "train_error")}
    grid_weights = []
    for value in config.grid:
        l2 = jax.tree_util.tree_map(lambda p: jnp.full(p.shape, value, jnp.float64), params0)
        m, w = _retrain(l2, params0, keys, data, static)
        for k in grid:
            grid[k].append(float(m[k]))
        grid_weights.append(w)
    best = best_grid_index(grid["valid_loss"])

    results = {"grid_l2": np.asarray(config.grid, np.float64)}
    results.update({f"grid_{k}": np.asarray(v) for k, v in grid.items()})
    results.update({f"learned_{k}": np.asarray(v) for k, v in learned.items()})
    results.update(_flat(l2_learned, "penalty"))
    results.update(_flat(w_learned, "weights"))
    results.update(_flat(grid_weights[best], "weights_global"))
    run_dir.save_arrays("results", results)
    wall = time.perf_counter() - t0

    summary = {
        "model": config.model,
        "n_hyperparameters": int(n_hypers),
        "meta_iterations": config.meta_iterations,
        "test_error_learned": float(learned["test_error"]),
        "test_error_best_global": grid["test_error"][best],
        "best_global_l2": float(config.grid[best]),
        "test_loss_learned": float(learned["test_loss"]),
        "test_loss_best_global": grid["test_loss"][best],
        "valid_loss_learned": float(learned["valid_loss"]),
        "valid_loss_best_global": grid["valid_loss"][best],
        "valid_error_learned": float(learned["valid_error"]),
        "valid_error_best_global": grid["valid_error"][best],
        "train_loss_learned": float(learned["train_loss"]),
        "train_loss_best_global": grid["train_loss"][best],
        "l2_learned_median": float(np.median(np.concatenate(
            [np.ravel(a) for a in jax.tree_util.tree_leaves(l2_learned)]))),
        "meta_time_s": t_meta,
        "wall_time_s": wall,
    }
    plot(run_dir.path)
    return summary


# -- plot ------------------------------------------------------------------------

def penalty_images(penalty_w: np.ndarray, percentile: float = 98.0):
    """[n_units, 28, 28] images of a first-layer penalty [784, n_units] (image k is
    column k, pixels in MNIST's row-major order), clipped at `percentile` of all
    values, and that shared upper limit of the colour scale."""
    penalty_w = np.asarray(penalty_w)
    if penalty_w.ndim != 2 or penalty_w.shape[0] != 784:
        raise ValueError(f"expected a first-layer array [784, n_units], got {penalty_w.shape}")
    vmax = float(np.percentile(penalty_w, percentile))
    images = np.minimum(penalty_w.T.reshape(-1, 28, 28), vmax)
    return images, vmax


def _units_to_show(res, model: str, n: int = 10) -> tuple[np.ndarray, list[str]]:
    if model == "logistic":
        return np.arange(10), [f"digit {k}" for k in range(10)]
    out_norm = np.linalg.norm(res["weights_1_w"], axis=1)  # [hidden]
    units = np.sort(np.argsort(-out_norm)[:n])
    return units, [f"unit {u}" for u in units]


def _image_row(fig, axes, images, *, cmap, vmin, vmax, titles, label):
    im = None
    for ax, img, title in zip(axes, images, titles):
        im = ax.imshow(img, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(title, fontsize=9)
    axes[0].set_ylabel(label, fontsize=9)
    return im


def plot(path) -> list[Path]:
    """Re-render the figures from results.npz and metrics.jsonl."""
    from matplotlib.figure import Figure

    rd = RunDir(Path(path))
    res = rd.load_arrays("results")
    metrics = rd.read_metrics()
    cfg = (rd.read_config() or {}).get("config", {})
    model = cfg.get("model", "logistic")
    out = rd.figures
    paths = []

    # 1. penalty maps beside the trained weights
    units, titles = _units_to_show(res, model)
    pen, vmax = penalty_images(res["penalty_0_w"])
    pen = pen[units]
    # logistic: from 0 as in the original figure; MLP: from the 2nd percentile, for contrast
    vmin = 0.0 if model == "logistic" else float(np.percentile(res["penalty_0_w"], 2.0))
    w_learned = res["weights_0_w"].T.reshape(-1, 28, 28)[units]
    w_global = res["weights_global_0_w"].T.reshape(-1, 28, 28)[units]
    wmax = float(np.percentile(np.abs(np.concatenate([w_learned, w_global])), 99.5)) or 1.0
    best_l2 = float(res["grid_l2"][best_grid_index(res["grid_valid_loss"])])
    fig = Figure(figsize=(1.25 * len(units) + 1.6, 4.6), layout="constrained")
    axes = fig.subplots(3, len(units))
    im_p = _image_row(fig, axes[0], pen, cmap="viridis", vmin=vmin, vmax=vmax, titles=titles,
                      label="learned\npenalty $\\lambda$")
    im_w = _image_row(fig, axes[1], w_learned, cmap="RdBu_r", vmin=-wmax, vmax=wmax,
                      titles=[""] * len(units), label="weights,\nlearned $\\lambda$")
    _image_row(fig, axes[2], w_global, cmap="RdBu_r", vmin=-wmax, vmax=wmax,
               titles=[""] * len(units), label=f"weights, best\nglobal $\\lambda$={best_l2:g}")
    cb = fig.colorbar(im_p, ax=axes[0], shrink=0.9, pad=0.01)
    cb.set_label("$\\lambda$ (clipped at\n98th percentile)", fontsize=8)
    cb = fig.colorbar(im_w, ax=axes[1:], shrink=0.9, pad=0.01)
    cb.set_label("weight (shared scale)", fontsize=8)
    what = ("logistic regression, one column per class" if model == "logistic" else
            "MLP first layer, the 10 hidden units with the largest outgoing weights")
    fig.suptitle(f"Learned per-weight L2 penalties and trained weights ({what})")
    paths.append(out / "penalties.png")
    save_figure(fig, paths[-1], dpi=110)

    if model == "mlp":  # per input pixel: the penalty averaged over hidden units
        mean_pen = res["penalty_0_w"].mean(axis=1)
        mean_abs_w = np.abs(res["weights_0_w"]).mean(axis=1)
        fig = Figure(figsize=(8.5, 3.8), layout="constrained")
        ax1, ax2 = fig.subplots(1, 2)
        vm = float(np.percentile(mean_pen, 98.0))
        im = ax1.imshow(np.minimum(mean_pen, vm).reshape(28, 28), cmap="viridis",
                        vmin=float(mean_pen.min()), vmax=vm, interpolation="nearest")
        fig.colorbar(im, ax=ax1, label="mean $\\lambda$ (clipped at 98th pct.)")
        ax1.set_title("Penalty per input pixel\n(mean over the hidden units)", fontsize=10)
        im = ax2.imshow(mean_abs_w.reshape(28, 28), cmap="magma", interpolation="nearest")
        fig.colorbar(im, ax=ax2, label="mean |weight|")
        ax2.set_title("Trained first-layer weights per pixel\n(mean |w| over hidden units)",
                      fontsize=10)
        for ax in (ax1, ax2):
            ax.set_xticks([])
            ax.set_yticks([])
        fig.suptitle("MLP 784-%d-10: learned first-layer penalties" % res["weights_0_w"].shape[1])
        paths.append(out / "pixel_penalty.png")
        save_figure(fig, paths[-1], dpi=110)

    # 2. meta-learning curves
    best = best_grid_index(res["grid_valid_loss"])
    fig = _plots.meta_curves(metrics, "model", {
        f"best global $\\lambda$ ({best_l2:g})": {"test_loss": res["grid_test_loss"][best],
                                                  "test_error": res["grid_test_error"][best]}})
    paths.append(out / "meta_curves.png")
    save_figure(fig, paths[-1], dpi=110)

    # 3. the grid of global L2 strengths against the learned penalties
    fig = Figure(figsize=(10, 4.0), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    g = res["grid_l2"]
    positive = g > 0
    floor = g[positive].min() / 10 if positive.any() else 1e-6
    gx = np.where(positive, g, floor)
    for ax, kind, scale, unit in ((ax1, "loss", 1.0, "mean NLL, nats"), (ax2, "error", 100.0, "%")):
        for split in ("valid", "test"):
            ax.plot(gx, scale * res[f"grid_{split}_{kind}"], "o-", color=_plots.SPLIT_COLORS[split],
                    label=f"{_SPLIT_NAMES[split]}, global $\\lambda$")
            ax.axhline(scale * float(res[f"learned_{split}_{kind}"]), color=_plots.SPLIT_COLORS[split],
                       ls="--", label=f"{_SPLIT_NAMES[split]}, learned per-weight $\\lambda$")
        ax.axvline(gx[best], color="0.6", lw=0.8, label="best global $\\lambda$ (lowest "
                   "validation loss)")
        ax.set_xscale("log")
        ax.set_xlabel("global L2 strength $\\lambda$" + (f" (0 drawn at {floor:g})"
                                                           if not positive.all() else ""))
        ax.set_ylabel(f"{kind} after training ({unit})")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    ax1.set_title("Loss")
    ax2.set_title("Error")
    n_eval = cfg.get("n_eval")
    fig.suptitle("Grid search over one global L2 strength vs. learned per-weight penalties"
                 + (f" (mean over {n_eval} unseen minibatch orders)" if n_eval else ""))
    paths.append(out / "grid.png")
    save_figure(fig, paths[-1], dpi=110)
    return paths


EXPERIMENT = register(Experiment(
    name="l2-per-weight",
    description="Learn one L2 penalty per weight of logistic regression (or an MLP) on MNIST "
                "and compare with the best global L2 of a grid.",
    Config=Config, smoke=SMOKE, run=run, plot=plot))
