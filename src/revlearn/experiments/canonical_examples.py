"""Canonical examples: learn the pixels of a ten-image training set (paper Figure 7).

The hyperparameters are the pixels of the training images X [10 k, 784]
(k = `per_class` images of each digit, labels fixed); the elementary learner is
trained on them and the meta-objective is its validation loss:

    w_0 = 0 (logistic regression) or w_0 ~ mlp_init(key_i) (MLP)
    v_{t+1} = gamma v_t - (1 - gamma) grad_w [NLL(w_t; X_batch_t) + lambda ||w_t||^2]
    w_{t+1} = w_t + alpha v_{t+1},                   t = 0 .. T - 1
    f(X) = NLL(w_T; validation set)

d f / d X comes from `revlearn.sgd(..., method=Reversible())`; X follows plain
gradient descent (`optax.sgd(meta_lr)`) from X = 0 (`init="zeros"`), from one
real image per class (`"real"`) or from the class means (`"mean"`).
`learn_lr_l2` also learns log alpha and log lambda (Adam, `meta_lr_scalars`).

Overfitting study: the optimisation is repeated for validation sets of
`validation_sizes` (0/1 weights on the validation examples, nested subsets)
and images of `study_resolutions` r: X = P Z P^T with P [28, 28] the r-block
average (10 k r^2 free values), so every cell runs one compiled program.

Baselines (same learner, T, alpha, gamma): 10 k real training images (one draw
per class, `real_draws` draws), and the whole training split (`full_steps`
steps of batch `full_batch`).
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
from revlearn import data as rdata
from revlearn import models
from revlearn.meta import RunDir, iteration_key, meta_optimize

from . import _plots
from ._config import MnistConfig
from ._registry import Experiment
from ._splits import arrays, mnist_parts
from ._validate import (at_least, at_most, check_decay, check_pool, fail, nonnegative,
                        positive, show)

__all__ = ["Config", "run", "plot", "EXPERIMENT", "meta_objective", "block_projection"]

_SIDE = 28
_CURVES = ("valid_error", "test_error", "valid_loss", "test_loss")


@dataclasses.dataclass(frozen=True)
class Config(MnistConfig):
    """Settings of canonical-examples (the paper's where the embedded data allows)."""

    n_train: int = 2000  # pool of real images (baseline draws, full-training baseline)
    n_valid: int = 5000  # validation pool; the main run uses all of it
    n_test: int = 3000
    per_class: int = 1  # learned images of each digit
    learner: Literal["logistic", "mlp"] = "logistic"
    hidden: int = 50  # hidden units of the MLP learner
    init: Literal["zeros", "real", "mean"] = "zeros"
    batch_size: int = 10
    steps: int = 20
    lr: float = 1.0
    momentum: float = 0.9
    l2: float = 0.0  # L2 strength of the learner (the start value if learn_lr_l2)
    learn_lr_l2: bool = False  # also learn log alpha and log lambda
    meta_lr: float = 1.0  # plain gradient descent on the pixels (optax.sgd)
    meta_lr_scalars: float = 0.05  # Adam step of log alpha and log lambda (learn_lr_l2)
    meta_iterations: int = 40
    real_draws: int = 20
    full_steps: int = 500
    full_batch: int = 100
    validation_sizes: tuple[int, ...] = (100, 1000, 5000)  # () skips the study
    study_resolutions: tuple[int, ...] = (7, 14, 28)

    def check(self):
        at_least(self, 1, "n_train", "n_valid", "n_test", "per_class", "hidden", "batch_size",
                 "steps", "real_draws", "full_steps", "full_batch")
        if self.batch_size > 10 * self.per_class:
            fail("batch_size", self.batch_size, f"exceeds the {10 * self.per_class} learned "
                 "images (10 x per_class)", "pass batch_size <= 10 * per_class")
        if 10 * self.per_class > self.n_train:
            fail("per_class", self.per_class, f"needs 10 x per_class <= n_train={self.n_train} "
                 "real training images (the real-image baselines draw per_class of each digit)",
                 "lower per_class or raise n_train")
        at_most(self, "full_batch", "n_train")
        check_pool(self, "n_train", "n_valid", "n_test")
        check_decay("momentum", self.momentum)
        positive(self, "lr", "meta_lr", "meta_lr_scalars")
        nonnegative(self, "l2")
        at_least(self, 0, "meta_iterations")
        bad = [n for n in self.validation_sizes if not 1 <= n <= self.n_valid]
        if bad:
            fail("validation_sizes", self.validation_sizes, f"holds {show(bad)} outside "
                 f"[1, n_valid={self.n_valid}]", "raise n_valid (--data mnist allows 10,000 "
                 "and more) or pass smaller sizes (none: validation_sizes=, which skips the study)")
        bad = [r for r in self.study_resolutions if r < 1 or _SIDE % r]
        if bad:
            fail("study_resolutions", self.study_resolutions, f"holds {show(bad)}, but every "
                 "resolution must divide 28", "pass e.g. study_resolutions=7,14,28")


SMOKE = Config(n_train=200, n_valid=300, n_test=300, steps=5, meta_iterations=3, real_draws=3,
               full_steps=20, full_batch=50, validation_sizes=(30, 300), study_resolutions=(7, 28))


# -- the problem -----------------------------------------------------------------

def block_projection(resolution: int, dtype=jnp.float64) -> jax.Array:
    """P [28, 28] with (P z P^T) the r x r block average of a 28 x 28 image z
    (r = resolution; the identity for r = 28). P is a symmetric projection."""
    if resolution < 1 or _SIDE % resolution:
        raise ValueError(f"resolution={resolution} must divide {_SIDE}")
    block = np.arange(_SIDE) // (_SIDE // resolution)
    return jnp.asarray((block[:, None] == block[None, :]) / (_SIDE // resolution), dtype)


def _images(z, proj):
    """The training images [n, 784] of the hyperparameters z [n, 784]."""
    z = z.reshape(-1, _SIDE, _SIDE)
    return jnp.einsum("ij,njk,lk->nil", proj, z, proj).reshape(-1, _SIDE * _SIDE)


def _labels(per_class: int) -> jax.Array:
    return jnp.repeat(jnp.eye(10, dtype=jnp.float64), per_class, axis=0)


def _train_loss(params, h, step, *, batch_size):
    xb, yb = models.minibatch(h["x"], h["y"], batch_size, step, h["key"])
    return models.nll(models.mlp_apply(params, xb), yb) + h["l2"] * models.l2_penalty(params, 1.0)


def _train(x, y, lr, l2, key, static: Config, method="reversible", full=False):
    """The learner's final weights after training on (x, y) (`full`: the whole-split
    baseline's `full_steps` steps of batch `full_batch`)."""
    batch, steps = ((static.full_batch, static.full_steps) if full else
                    (static.batch_size, static.steps))
    params0 = ([{"w": jnp.zeros((784, 10), jnp.float64), "b": jnp.zeros((10,), jnp.float64)}]
               if static.learner == "logistic" else models.mlp_init(
                   jax.random.fold_in(key, 1), [784, static.hidden, 10], dtype=jnp.float64))
    method = (revlearn.Reversible(min_momentum=static.momentum) if method == "reversible"
              else revlearn.Unrolled())
    return revlearn.sgd(functools.partial(_train_loss, batch_size=batch), params0,
                        {"x": x, "y": y, "l2": l2, "key": key}, lr=lr, momentum=static.momentum,
                        steps=steps, method=method)


def _evaluate(params, x, y, weights=None) -> tuple[jax.Array, jax.Array]:
    """(mean NLL, error rate) of the trained learner on (x, y), optionally weighted
    (0/1 weights: a validation subset)."""
    logp = models.mlp_apply(params, x)
    nll = -jnp.sum(logp * y, axis=-1)
    wrong = (jnp.argmax(logp, -1) != jnp.argmax(y, -1)).astype(nll.dtype)
    if weights is None:
        return jnp.mean(nll), jnp.mean(wrong)
    return jnp.sum(weights * nll) / jnp.sum(weights), jnp.sum(weights * wrong) / jnp.sum(weights)


def meta_objective(theta, key, data, proj, valid_weights, lr, l2, static: Config,
                   method="reversible"):
    """(validation loss, metrics) of the learner trained on the images of theta
    ({"pixels": [n, 784]}, + "log_lr" and "log_l2" if learned, else `lr` and `l2`);
    data = {"labels": [n, 10], "valid": (x, y), "test": (x, y)}; `proj` the block
    projection; `valid_weights` [n_valid] the 0/1 weights of a validation subset."""
    if "log_lr" in theta:
        lr, l2 = jnp.exp(theta["log_lr"]), jnp.exp(theta["log_l2"])
    x = _images(theta["pixels"], proj)
    params = _train(x, data["labels"], lr, l2, key, static, method)
    metrics = {}
    for name, xy, w in (("valid", data["valid"], valid_weights), ("test", data["test"], None),
                        ("train", (x, data["labels"]), None)):
        metrics[f"{name}_loss"], metrics[f"{name}_error"] = _evaluate(params, *xy, w)
    return metrics["valid_loss"], dict(metrics, lr=lr, l2=l2)


@functools.partial(jax.jit, static_argnames=("static", "method"))
def _hypergrad(theta, key, data, proj, valid_weights, lr, l2, static: Config,
               method="reversible"):
    (loss, metrics), grads = jax.value_and_grad(meta_objective, has_aux=True)(
        theta, key, data, proj, valid_weights, lr, l2, static, method)
    return loss, grads, metrics


@functools.partial(jax.jit, static_argnames=("static", "full"))
def _test_error_of(x, y, keys, test, lr, l2, static: Config, full=False):
    """Test error of the learner trained on each (x[d], y[d], keys[d]): [draws]."""
    return jax.lax.map(lambda a: _evaluate(_train(*a[:2], lr, l2, a[2], static, full=full),
                                           *test)[1], (x, y, keys))


# -- plot ----------------------------------------------------------------------

@_plots.styled
def plot(path) -> list[Path]:
    """Re-render the figures from results.npz, study.npz and metrics.jsonl."""
    run = _plots.saved(path, "results", optional=("study",))
    res, cfg, out, paths = run.arrays["results"], run.config, run.run.figures, []
    per_class = int(cfg.get("per_class", 1))
    n, rows = 10 * per_class, min(per_class, 3)
    real_err, learned_err = 100 * res["real_test_error"], 100 * res["learned_test_error"]

    # 1. real against learned images (at most 3 of each digit), columns = digits
    learned = res["pixels_learned"]
    lim = float(np.percentile(np.abs(learned), 99.5)) or 1.0
    fig, axes = _plots.figure(10, 2 * rows, width=11, height=0.6 + 1.3 * 2 * rows)
    order = [c * per_class + r for r in range(rows) for c in range(10)]
    shape = (-1, _SIDE, _SIDE)
    im_r = _plots.image_grid(axes[:rows], res["real_example"][order].reshape(shape),
                             [f"digit {c}" for c in range(10)], cmap="gray_r", vmin=0, vmax=1)
    im_l = _plots.image_grid(axes[rows:], learned[order].reshape(shape), cmap="RdBu_r",
                             vmin=-lim, vmax=lim)
    axes[0, 0].set_ylabel(f"real\n(test error\n{real_err.mean():.1f} ± {real_err.std():.1f}%)")
    axes[rows, 0].set_ylabel(f"learned\n(test error\n{learned_err.mean():.1f}%)")
    fig.colorbar(im_r, ax=axes[:rows], shrink=0.9, label="pixel value")
    fig.colorbar(im_l, ax=axes[rows:], shrink=0.9, label="pixel value\n(clipped at 99.5th pct.)")
    fig.suptitle(f"{n} real training images (one of {len(real_err)} random draws) and {n} "
                 f"learned ones (init {cfg.get('init', 'zeros')}); the learner's test error "
                 "after training on them")
    _plots.save(fig, out, "learned_images", paths)

    # 2. meta-learning curves; the last point: the final images
    final = {k[len("final_"):]: float(v) for k, v in res.items() if k.startswith("final_")}
    records = list(run.metrics) + ([dict(final, iteration=len(run.metrics))] if final else [])
    fig = _plots.meta_curves(records, "learner", {
        f"trained on all {cfg.get('n_train')} training images": {
            "test_error": float(res["full_test_error"])},
        f"trained on {n} real images (mean)": {"test_error": real_err.mean() / 100}})
    _plots.underlay(fig, "validation")  # the test curve nearly covers it
    fig.suptitle(f"Meta-learning curves: the learner trained on the {n} images of each "
                 f"meta-iteration (validation set of {cfg.get('n_valid')})")
    _plots.save(fig, out, "meta_curves", paths)

    # 3. overfitting the validation set
    if "study" in run.arrays:
        st = run.arrays["study"]
        sizes, resolutions, its = st["sizes"], st["resolutions"], st["test_error"].shape[-1]
        gap = 100 * (st["test_error"][:, :, -1] - st["valid_error"][:, :, -1])
        fig, (ax1, ax2) = _plots.figure(2, width=11, height=4.2)
        for a, r in enumerate(resolutions):
            ax1.plot(sizes, gap[a], "o-", label=f"{r}x{r} images: {n * r ** 2:,} hyperparameters")
        ax1.axhline(0, color="0.5", lw=0.8)
        ax1.set(xscale="log", xlabel="validation set size (examples, log scale)",
                ylabel="test error − validation error (percentage points)",
                title=f"Overfitting the validation set after {its - 1} meta-iterations")
        ax1.set_xticks(sizes, [f"{s:,}" for s in sizes])
        ax1.minorticks_off()
        for b, s in enumerate(sizes):
            ax2.plot(100 * st["valid_error"][-1, b], "--", color=f"C{b}")
            ax2.plot(100 * st["test_error"][-1, b], color=f"C{b}",
                     label=f"{s:,} validation examples")
        ax2.plot([], [], "k--", label="validation error")
        ax2.plot([], [], "k-", label="test error")
        ax2.set(xlabel="meta-iteration", ylabel="error of the trained learner (%)", ylim=(0, None),
                title=f"Validation and test error ({resolutions[-1]}x{resolutions[-1]} images)")
        for ax in (ax1, ax2):
            ax.legend()
        _plots.save(fig, out, "overfitting", paths)
    return paths


# -- run -----------------------------------------------------------------------

def _initial_theta(config: Config, train: rdata.Dataset) -> dict:
    if config.init == "zeros":
        pixels = np.zeros((10 * config.per_class, 784))
    elif config.init == "real":
        pixels = train.images[rdata.class_balanced_indices(train.labels, config.per_class,
                                                           config.seed)]
    else:
        pixels = np.repeat(np.stack([train.images[train.labels == c].mean(0)
                                     for c in range(10)]), config.per_class, axis=0)
    theta = {"pixels": jnp.asarray(pixels, jnp.float64)}
    if config.learn_lr_l2:
        theta["log_lr"] = jnp.asarray(math.log(config.lr), jnp.float64)
        theta["log_l2"] = jnp.asarray(math.log(config.l2 if config.l2 > 0 else 1e-4), jnp.float64)
    return theta


def _optimise(config, theta0, data, proj, weights, run_dir, description):
    """meta_optimize over the pixels: (final theta, history, final metrics, initial
    metrics), the metrics measured on an unseen minibatch order (key_N)."""
    args = (data, proj, weights, jnp.asarray(config.lr), jnp.asarray(config.l2), config.program())
    opt = optax.multi_transform(
        {"pixels": optax.sgd(config.meta_lr), "scalars": optax.adam(config.meta_lr_scalars)},
        {k: ("pixels" if k == "pixels" else "scalars") for k in theta0})
    result = meta_optimize(
        lambda theta, i: _hypergrad(theta, iteration_key(config.seed, i), *args), theta0,
        opt if config.learn_lr_l2 else optax.sgd(config.meta_lr), config.meta_iterations,
        run_dir, progress=None if run_dir is not None else False,
        progress_metric="valid_error", description=description)
    key = iteration_key(config.seed, config.meta_iterations)
    final, initial = (_hypergrad(th, key, *args)[2] for th in (result.hypers, theta0))
    return (result.hypers, result.history, {k: float(v) for k, v in final.items()},
            float(initial["test_error"]))


def _study(config: Config, run_dir: RunDir, theta0, data, main) -> dict:
    """Repeat the optimisation for every (resolution r, validation size n); each cell's
    curves are saved as it ends and reused on --resume."""
    cells = []
    for r in config.study_resolutions:
        for n in config.validation_sizes:
            name = f"study_r{r}_n{n}"
            if r == _SIDE and n == config.n_valid:
                history, final = main
            elif run_dir.resume and run_dir.has_arrays(name):
                cells.append(run_dir.load_arrays(name))
                continue
            else:
                proj, weights = block_projection(r), (jnp.arange(config.n_valid) < n).astype(float)
                history, final = _optimise(config, dict(theta0, pixels=_images(
                    theta0["pixels"], proj)), data, proj, weights, None, name)[1:3]
            cells.append({k: np.asarray([h[k] for h in history] + [final[k]], np.float64)
                          for k in _CURVES})
            run_dir.save_arrays(name, cells[-1])
    shape = (len(config.study_resolutions), len(config.validation_sizes), -1)
    return {"sizes": np.asarray(config.validation_sizes, np.int64),
            "resolutions": np.asarray(config.study_resolutions, np.int64),
            **{k: np.stack([c[k] for c in cells]).reshape(shape) for k in _CURVES}}


def run(config: Config, run_dir: RunDir) -> dict:
    t0 = time.perf_counter()
    parts = mnist_parts(config, "train", "valid", "test")
    splits, train, static = arrays(parts), parts["train"], config.program()
    data = {"labels": _labels(config.per_class), "valid": splits["valid"], "test": splits["test"]}
    theta0 = _initial_theta(config, train)
    theta, history, final, initial_error = _optimise(
        config, theta0, data, block_projection(_SIDE), jnp.ones((config.n_valid,), jnp.float64),
        run_dir, "canonical-examples")
    run_dir.save_arrays("hypers_final", theta)

    # Baselines: real images (one draw per class, several draws) and the whole training split.
    real_x = jnp.asarray(train.images[np.stack([rdata.class_balanced_indices(
        train.labels, config.per_class, config.seed * 1000 + d)
        for d in range(config.real_draws)])], jnp.float64)
    keys = jax.vmap(lambda d: iteration_key(config.seed + 1, d))(jnp.arange(config.real_draws))
    lr0, l20 = jnp.asarray(config.lr, jnp.float64), jnp.asarray(config.l2, jnp.float64)
    lr, l2 = ((jnp.exp(theta["log_lr"]), jnp.exp(theta["log_l2"])) if config.learn_lr_l2
              else (lr0, l20))
    tile = lambda a: jnp.broadcast_to(a, (config.real_draws,) + a.shape)  # noqa: E731
    real_err = np.asarray(_test_error_of(real_x, tile(data["labels"]), keys, splits["test"],
                                         lr0, l20, static))
    learned_err = np.asarray(_test_error_of(tile(_images(theta["pixels"], block_projection(
        _SIDE))), tile(data["labels"]), keys, splits["test"], lr, l2, static))
    full_err = float(_test_error_of(splits["train"][0][None], splits["train"][1][None],
                                    keys[:1], splits["test"], lr0, l20, static, full=True)[0])
    study = None
    if config.validation_sizes and config.study_resolutions:
        study = _study(config, run_dir, theta0, data, (history, final))
        run_dir.save_arrays("study", study)
    run_dir.save_arrays("results", {
        "pixels_initial": theta0["pixels"], "pixels_learned": theta["pixels"],
        "real_example": real_x[0], "real_test_error": real_err,
        "learned_test_error": learned_err, "full_test_error": np.asarray(full_err),
        **{f"final_{k}": np.asarray(v) for k, v in final.items()}})
    summary = {
        "n_hyperparameters": int(theta["pixels"].size), "meta_iterations": config.meta_iterations,
        "test_error_initial": initial_error, "valid_error_learned": final["valid_error"],
        "test_error_learned": final["test_error"],
        "test_error_learned_mean_over_draws": float(learned_err.mean()),
        "test_error_real_mean": float(real_err.mean()),
        "test_error_real_std": float(real_err.std()), "test_error_full_train": full_err,
        "train_error_learned": final["train_error"], "lr_learned": final["lr"],
        "l2_learned": final["l2"]}
    for a, r in enumerate(study["resolutions"] if study is not None else ()):
        for b, n in enumerate(study["sizes"]):
            summary[f"gap_r{r}_n{n}"] = float(study["test_error"][a, b, -1]
                                             - study["valid_error"][a, b, -1])
    summary["wall_time_s"] = time.perf_counter() - t0
    plot(run_dir.path)
    return summary


EXPERIMENT = Experiment(
    "canonical-examples", "Learn the pixels of a 10-image training set (paper Figure 7) and "
    "measure how much that overfits validation sets of several sizes.", Config, SMOKE, run, plot)
