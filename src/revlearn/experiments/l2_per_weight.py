"""Per-weight L2: one learned L2 strength for every weight (paper Figure 6).

Model: logistic regression on MNIST (`model="logistic"`, w = [{"w": [784, 10],
"b": [10]}], w_0 = 0), or a 784-100-10 tanh MLP (`model="mlp"`, w_0 drawn once
from the seed and kept fixed, so each hidden unit keeps its identity across
meta-iterations). Training (T steps of SGD with momentum, minibatch of step t
drawn from key_i = fold_in(PRNGKey(seed), i) at meta-iteration i):

    L_train(w, t) = NLL(w; batch_t) + sum_j lambda_j w_j^2,   lambda_j = exp(theta_j)
    v_{t+1} = gamma v_t - (1 - gamma) grad L_train(w_t, t),   w_{t+1} = w_t + alpha v_{t+1}

Hyperparameters: theta = log lambda, one per weight and bias (7,850 for
logistic regression, 79,510 for the MLP), all starting at `init_l2`.
Meta-objective (a small Gaussian prior on lambda):

    f(theta) = NLL(w_T; valid) + meta_penalty * sum_j lambda_j^2

Its gradient comes from `revlearn.sgd(..., method=Reversible(...))`; plain
gradient descent (or Adam) updates theta for `meta_iterations` iterations.

Baseline: the same training with one global L2 strength from `grid`; the grid
value with the lowest validation loss is "the best global L2". The learned
penalties and every grid value are retrained on `n_eval` minibatch orders
never used in meta-training (key_N, key_{N+1}, ...), metrics averaged.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

import revlearn
from revlearn import models
from revlearn.meta import RunDir, iteration_key, meta_optimize

from . import _plots
from ._config import MnistConfig
from ._registry import Experiment
from ._splits import evaluate, mnist_splits
from ._validate import (at_least, at_most, check_clip, check_decay, check_pool, fail,
                        nonnegative, positive)

__all__ = ["Config", "run", "plot", "EXPERIMENT", "meta_objective", "penalty_images",
           "best_grid_index"]


@dataclasses.dataclass(frozen=True)
class Config(MnistConfig):
    """Settings of `l2-per-weight`: the original run's, on 5k / 4k / 1k train /
    validation / test images instead of 10k / 10k / 1k (the embedded data has 10k)."""

    n_train: int = 5000
    n_valid: int = 4000
    n_test: int = 1000
    batch_size: int = 200
    steps: int = 50
    lr: float = 1.0
    momentum: float = 0.9
    init_l2: float = 0.01 * math.e
    model: Literal["logistic", "mlp"] = "logistic"
    hidden: int = 100  # hidden units of the MLP
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
        at_most(self, "batch_size", "n_train")
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

def _params0(config: Config) -> list[dict]:
    """w_0: zeros, or N(0, 1/fan_in) MLP weights from a key no minibatch order uses."""
    if config.model == "logistic":
        return models.logistic_init(jax.random.PRNGKey(0), dtype=jnp.float64)
    init_key = jax.random.split(jax.random.PRNGKey(config.seed))[1]
    return models.mlp_init(init_key, [784, config.hidden, 10], dtype=jnp.float64)


def _train_loss(params, h, step, *, batch_size):
    xb, yb = models.minibatch(h["x"], h["y"], batch_size, step, h["key"])
    return models.nll(models.mlp_apply(params, xb), yb) + models.l2_penalty(params, h["l2"])


def _train(l2, params0, key, data, static: Config, method):
    """w_T after T steps with per-weight L2 strengths `l2` (a pytree like params0)."""
    x, y = data["train"]
    return revlearn.sgd(functools.partial(_train_loss, batch_size=static.batch_size), params0,
                        {"l2": l2, "key": key, "x": x, "y": y}, lr=static.lr,
                        momentum=static.momentum, steps=static.steps, method=method)


def meta_objective(theta, params0, key, data, static: Config, method):
    """(f(theta), metrics of w_T): validation NLL after training plus the
    meta-penalty on lambda = exp(theta["log_l2"])."""
    l2 = jax.tree_util.tree_map(jnp.exp, theta["log_l2"])
    metrics = evaluate(models.mlp_apply, _train(l2, params0, key, data, static, method), data)
    leaves = jax.tree_util.tree_leaves(theta)
    metrics["meta_penalty"] = static.meta_penalty * sum(
        jnp.sum(lam ** 2) for lam in jax.tree_util.tree_leaves(l2))
    metrics["mean_log_l2"] = sum(jnp.sum(t) for t in leaves) / sum(t.size for t in leaves)
    return metrics["valid_loss"] + metrics["meta_penalty"], metrics


@functools.partial(jax.jit, static_argnames="static")
def _hypergrad(theta, params0, key, data, static: Config):
    """(f(theta), df/dtheta by exact reversal, metrics)."""
    method = revlearn.Reversible(min_momentum=static.momentum)
    (loss, metrics), grads = jax.value_and_grad(meta_objective, has_aux=True)(
        theta, params0, key, data, static, method)
    return loss, grads, metrics


@functools.partial(jax.jit, static_argnames="static")
def _retrain(l2, params0, keys, data, static: Config):
    """Train once per key of `keys` [n, 2] with fixed `l2`: (metrics averaged over
    the keys, w_T of the first key)."""
    def one(key):
        params = _train(l2, params0, key, data, static,
                        revlearn.Reversible(min_momentum=static.momentum))
        return evaluate(models.mlp_apply, params, data), params

    metrics, params = jax.lax.map(one, keys)
    return ({k: jnp.mean(v) for k, v in metrics.items()},
            jax.tree_util.tree_map(lambda a: a[0], params))


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


# -- plot ------------------------------------------------------------------------

def penalty_images(penalty_w: np.ndarray, percentile: float = 98.0):
    """[n_units, 28, 28] images of a first-layer penalty [784, n_units] (image k is
    column k, pixels in MNIST's row-major order), clipped at `percentile` of all
    values, and that shared upper limit of the colour scale."""
    penalty_w = np.asarray(penalty_w)
    if penalty_w.ndim != 2 or penalty_w.shape[0] != 784:
        raise ValueError(f"expected a first-layer array [784, n_units], got {penalty_w.shape}")
    vmax = float(np.percentile(penalty_w, percentile))
    return np.minimum(penalty_w.T.reshape(-1, 28, 28), vmax), vmax


@_plots.styled
def plot(path) -> list[Path]:
    """Re-render the figures from results.npz and metrics.jsonl."""
    run = _plots.saved(path, "results")
    res, out, paths = run.arrays["results"], run.run.figures, []
    logistic = run.config.get("model", "logistic") == "logistic"
    best = best_grid_index(res["grid_valid_loss"])
    best_l2 = float(res["grid_l2"][best])

    # 1. penalty maps beside the trained weights (MLP: the 10 units of largest outgoing weights)
    units = (np.arange(10) if logistic else
             np.sort(np.argsort(-np.linalg.norm(res["weights_1_w"], axis=1))[:10]))
    pen, vmax = penalty_images(res["penalty_0_w"])
    # logistic: from 0 as in the original figure; MLP: from the 2nd percentile, for contrast
    vmin = 0.0 if logistic else float(np.percentile(res["penalty_0_w"], 2.0))
    w = [res[k].T.reshape(-1, 28, 28)[units] for k in ("weights_0_w", "weights_global_0_w")]
    wmax = float(np.percentile(np.abs(np.concatenate(w)), 99.5)) or 1.0
    fig, axes = _plots.figure(len(units), 3, width=1.25 * len(units) + 1.6, height=4.6)
    im_p = _plots.image_grid(axes[0], pen[units], [f"{'digit' if logistic else 'unit'} {u}"
                                                   for u in units],
                             cmap="viridis", vmin=vmin, vmax=vmax, interpolation="nearest")
    for row, img in zip(axes[1:], w):
        im_w = _plots.image_grid(row, img, cmap="RdBu_r", vmin=-wmax, vmax=wmax,
                                 interpolation="nearest")
    for ax, label in zip(axes[:, 0], ("learned\npenalty $\\lambda$", "weights,\nlearned $\\lambda$",
                                      f"weights, best\nglobal $\\lambda$={best_l2:g}")):
        ax.set_ylabel(label)
    fig.colorbar(im_p, ax=axes[0], shrink=0.9, pad=0.01,
                 label="$\\lambda$ (clipped at\n98th percentile)")
    fig.colorbar(im_w, ax=axes[1:], shrink=0.9, pad=0.01, label="weight (shared scale)")
    what = ("logistic regression, one column per class" if logistic else
            "MLP first layer, the 10 hidden units with the largest outgoing weights")
    fig.suptitle(f"Learned per-weight L2 penalties and trained weights ({what})")
    _plots.save(fig, out, "penalties", paths)

    if not logistic:  # per input pixel: the penalty averaged over hidden units
        mean_pen = res["penalty_0_w"].mean(axis=1)
        vm = float(np.percentile(mean_pen, 98.0))
        fig, (ax1, ax2) = _plots.figure(2, width=8.5, height=3.8)
        im = _plots.image_grid([ax1], [np.minimum(mean_pen, vm).reshape(28, 28)],
                               cmap="viridis", vmin=float(mean_pen.min()), vmax=vm,
                               interpolation="nearest")
        fig.colorbar(im, ax=ax1, label="mean $\\lambda$ (clipped at 98th pct.)")
        ax1.set_title("Penalty per input pixel\n(mean over the hidden units)")
        im = _plots.image_grid([ax2], [np.abs(res["weights_0_w"]).mean(1).reshape(28, 28)],
                               cmap="magma", interpolation="nearest")
        fig.colorbar(im, ax=ax2, label="mean |weight|")
        ax2.set_title("Trained first-layer weights per pixel\n(mean |w| over hidden units)")
        fig.suptitle(f"MLP 784-{res['weights_0_w'].shape[1]}-10: learned first-layer penalties")
        _plots.save(fig, out, "pixel_penalty", paths)

    # 2. meta-learning curves
    fig = _plots.meta_curves(run.metrics, "model", {
        f"best global $\\lambda$ ({best_l2:g})": {"test_loss": res["grid_test_loss"][best],
                                                  "test_error": res["grid_test_error"][best]}})
    _plots.underlay(fig, "training")  # the test curve nearly covers it
    _plots.save(fig, out, "meta_curves", paths)

    # 3. the grid of global L2 strengths against the learned penalties; 0 drawn left of the grid
    g = res["grid_l2"]
    floor = g[g > 0].min() / 10 if (g > 0).any() else 1e-6
    gx = np.where(g > 0, g, floor)
    fig, axes = _plots.figure(2, width=10, height=4.2)
    for ax, kind, scale, unit in zip(axes, ("loss", "error"), (1, 100), ("mean NLL, nats", "%")):
        for split in ("valid", "test"):
            c, name = _plots.SPLIT_COLORS[split], _plots.SPLIT_NAMES[split]
            ax.plot(gx, scale * res[f"grid_{split}_{kind}"], "o-", color=c,
                    label=f"{name}, one global $\\lambda$")
            ax.axhline(scale * float(res[f"learned_{split}_{kind}"]), color=c, ls="--",
                       label=f"{name}, learned per-weight $\\lambda$")
        ax.plot(gx[best], scale * res[f"grid_valid_{kind}"][best], "o", ms=12, mfc="none",
                mec="k", label="best global $\\lambda$ (lowest validation loss)")
        ax.set_xscale("log")
        ax.set_xticks(gx, [f"{v:g}" for v in g], rotation=45)
        ax.minorticks_off()
        ax.set_xlabel("global L2 strength $\\lambda$ (log scale; 0 drawn at the left)")
        ax.set_ylabel(f"{kind} after training ({unit})")
        ax.legend()
    axes[0].set_title("Loss")
    axes[1].set_title("Error")
    fig.suptitle("Grid search over one global L2 strength vs. learned per-weight penalties"
                 f" (mean over {run.config.get('n_eval', '?')} unseen minibatch orders)")
    _plots.save(fig, out, "grid", paths)
    return paths


# -- run -------------------------------------------------------------------------

def run(config: Config, run_dir: RunDir) -> dict:
    t0 = time.perf_counter()
    data = mnist_splits(config, "train", "valid", "test")
    static, params0 = config.program(), _params0(config)
    full = lambda v: jax.tree_util.tree_map(  # noqa: E731
        lambda p: jnp.full(p.shape, v, jnp.float64), params0)
    opt = (optax.sgd if config.meta_optimizer == "sgd" else optax.adam)(config.meta_lr)
    result = meta_optimize(
        lambda theta, i: _hypergrad(theta, params0, iteration_key(config.seed, i), data, static),
        {"log_l2": full(math.log(config.init_l2))}, opt, config.meta_iterations, run_dir,
        clip=config.clip, progress_metric="valid_loss",
        description=f"l2-per-weight ({config.model})")
    run_dir.save_arrays("hypers_final", result.hypers)
    t_meta = time.perf_counter() - t0

    # unseen minibatch orders: key_N .. key_{N + n_eval - 1}
    keys = jnp.stack([iteration_key(config.seed, config.meta_iterations + k)
                      for k in range(config.n_eval)])
    l2_learned = jax.tree_util.tree_map(jnp.exp, result.hypers["log_l2"])
    learned, w_learned = _retrain(l2_learned, params0, keys, data, static)
    grid = [_retrain(full(value), params0, keys, data, static) for value in config.grid]
    best = best_grid_index([float(m["valid_loss"]) for m, _ in grid])
    results = {"grid_l2": np.asarray(config.grid, np.float64),
               **{f"grid_{k}": np.asarray([float(m[k]) for m, _ in grid]) for k in learned},
               **{f"learned_{k}": np.asarray(v) for k, v in learned.items()},
               **_flat(l2_learned, "penalty"), **_flat(w_learned, "weights"),
               **_flat(grid[best][1], "weights_global")}
    run_dir.save_arrays("results", results)
    summary = {"model": config.model, "n_hyperparameters": sum(
        p.size for p in jax.tree_util.tree_leaves(params0)),
        "meta_iterations": config.meta_iterations, "best_global_l2": float(config.grid[best])}
    for k in ("test_error", "test_loss", "valid_loss", "valid_error", "train_loss"):
        summary[f"{k}_learned"] = float(learned[k])
        summary[f"{k}_best_global"] = float(results[f"grid_{k}"][best])
    summary["l2_learned_median"] = float(np.median(np.concatenate(
        [np.ravel(a) for a in jax.tree_util.tree_leaves(l2_learned)])))
    summary.update(meta_time_s=t_meta, wall_time_s=time.perf_counter() - t0)
    plot(run_dir.path)
    return summary


EXPERIMENT = Experiment(
    "l2-per-weight", "Learn one L2 penalty per weight of logistic regression (or an MLP) on "
    "MNIST and compare with the best global L2 of a grid.", Config, SMOKE, run, plot)
