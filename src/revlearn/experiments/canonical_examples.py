"""Canonical examples: learn the pixels of a ten-image training set.

"Given only 10 training examples, what should those examples look like in
order to maximise performance on a validation set?" (lab notebook; paper
section 3.3). The hyperparameters are the pixels of the training images
X [10 k, 784] (k = `per_class` images of each digit, labels fixed); the
elementary learner is trained on them and the meta-objective is its
validation loss:

    w_0 = 0 (logistic regression) or w_0 ~ mlp_init(key_i) (MLP)
    v_{t+1} = gamma v_t - (1 - gamma) grad_w [NLL(w_t; X_batch_t) + lambda ||w_t||^2]
    w_{t+1} = w_t + alpha v_{t+1},                   t = 0 .. T - 1
    f(X) = NLL(w_T; validation set)

d f / d X comes from `revlearn.sgd(..., method=Reversible())`, and X is
updated by plain gradient descent (`optax.sgd(meta_lr)`), as in the paper:
T = 20 steps, alpha = 1, gamma = 0.9, batch 10, 40 meta-iterations, meta-step 1.

Initialisation: X = 0 (`init="zeros"`, the paper's choice). Every pixel then
owes its value to the hypergradient alone, so the pictures show what the
validation loss asks of a training set rather than a perturbed real digit
(a zero image still has a non-zero hypergradient: the validation loss
depends on X through the weight updates x (p - y)^T). `init="real"` starts
from one random training image per class, `init="mean"` from the class means.

Overfitting the validation set: the same optimisation is repeated with
validation sets of several sizes (`validation_sizes`, nested subsets of one
validation pool) and with images learned at several resolutions
(`study_resolutions`: r x r blocks, i.e. 10 k r^2 hyperparameters), and the
gap between test and validation error is plotted against both. A lower
resolution is the projection X = P Z P^T (P [28, 28] averages r-blocks), so
every cell of the study runs the same compiled program.

Baselines (same learner, same T, alpha, gamma): 10 k real training images
(one draw per class, averaged over `real_draws` draws), and the whole
training split (`full_steps` steps of batch `full_batch`).
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

from ._registry import Experiment, register
from ._config import MnistConfig
from ._validate import (
    at_least,
    check_decay,
    check_pool,
    fail,
    nonnegative,
    positive,
    show,
)

__all__ = ["Config", "run", "plot", "EXPERIMENT", "meta_objective", "block_projection"]

_SIDE = 28


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
        if self.full_batch > self.n_train:
            fail("full_batch", self.full_batch, f"exceeds n_train={self.n_train}",
                 "pass full_batch <= n_train")
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

class _Static(NamedTuple):
    """What fixes the compiled programs (a hashable jit static argument)."""

    learner: str
    hidden: int
    batch_size: int
    steps: int
    momentum: float
    learn_lr_l2: bool
    method: str = "reversible"  # or "unrolled" (tests)

    @classmethod
    def of(cls, config: Config, **changes) -> _Static:
        return cls(config.learner, config.hidden, config.batch_size, config.steps,
                   config.momentum, config.learn_lr_l2)._replace(**changes)


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


def _apply(static: _Static):
    return models.logistic_apply if static.learner == "logistic" else models.mlp_apply


def _params0(static: _Static, key):
    if static.learner == "logistic":
        return [{"w": jnp.zeros((784, 10), jnp.float64), "b": jnp.zeros((10,), jnp.float64)}]
    return models.mlp_init(key, [784, static.hidden, 10], dtype=jnp.float64)


def _train_loss(params, h, step, *, static: _Static):
    xb, yb = models.minibatch(h["x"], h["y"], static.batch_size, step, h["key"])
    loss = models.nll(_apply(static)(params, xb), yb)
    return loss + h["l2"] * models.l2_penalty(params, 1.0)


def _train(x, y, lr, l2, key, static: _Static):
    """The learner's final weights after training on (x, y)."""
    method = (revlearn.Reversible(min_momentum=static.momentum) if static.method == "reversible"
              else revlearn.Unrolled())
    return revlearn.sgd(functools.partial(_train_loss, static=static),
                        _params0(static, jax.random.fold_in(key, 1)),
                        {"x": x, "y": y, "l2": l2, "key": key},
                        lr=lr, momentum=static.momentum, steps=static.steps, method=method)


def _lr_l2(theta, config_lr, config_l2):
    if "log_lr" in theta:
        return jnp.exp(theta["log_lr"]), jnp.exp(theta["log_l2"])
    return jnp.asarray(config_lr, jnp.float64), jnp.asarray(config_l2, jnp.float64)


def _evaluate(params, x, y, static: _Static, weights=None) -> tuple[jax.Array, jax.Array]:
    """(mean NLL, error rate) of the trained learner on (x, y), optionally weighted."""
    logp = _apply(static)(params, x)
    nll = -jnp.sum(logp * y, axis=-1)
    wrong = (jnp.argmax(logp, -1) != jnp.argmax(y, -1)).astype(nll.dtype)
    if weights is None:
        return jnp.mean(nll), jnp.mean(wrong)
    return jnp.sum(weights * nll) / jnp.sum(weights), jnp.sum(weights * wrong) / jnp.sum(weights)


def meta_objective(theta, key, data, proj, valid_weights, lr, l2, static: _Static):
    """(validation loss, metrics) of the learner trained on the images of theta.

    Args:
      theta: {"pixels": [n, 784]} (+ "log_lr", "log_l2" if static.learn_lr_l2).
      key: the meta-iteration's key (minibatch order, MLP initialisation).
      data: {"labels": [n, 10], "valid": (x, y), "test": (x, y)}.
      proj: [28, 28] block projection (see `block_projection`).
      valid_weights: [n_valid] weights of the validation examples (0/1: a subset).
      lr, l2: the learner's alpha and lambda when they are not learned.
    """
    alpha, lam = _lr_l2(theta, lr, l2)
    x = _images(theta["pixels"], proj)
    params = _train(x, data["labels"], alpha, lam, key, static)
    v_loss, v_err = _evaluate(params, *data["valid"], static, valid_weights)
    t_loss, t_err = _evaluate(params, *data["test"], static)
    tr_loss, tr_err = _evaluate(params, x, data["labels"], static)
    return v_loss, {"valid_loss": v_loss, "valid_error": v_err, "test_loss": t_loss,
                    "test_error": t_err, "train_loss": tr_loss, "train_error": tr_err,
                    "lr": alpha, "l2": lam}


@functools.partial(jax.jit, static_argnames="static")
def _hypergrad(theta, key, data, proj, valid_weights, lr, l2, static: _Static):
    (loss, metrics), grads = jax.value_and_grad(meta_objective, has_aux=True)(
        theta, key, data, proj, valid_weights, lr, l2, static)
    return loss, grads, metrics


def _metrics(theta, key, data, proj, valid_weights, lr, l2, static: _Static):
    """The metrics of `meta_objective` (through `_hypergrad`: cheap here, and one compile)."""
    return _hypergrad(theta, key, data, proj, valid_weights, lr, l2, static)[2]


@functools.partial(jax.jit, static_argnames="static")
def _test_error_of(x, y, keys, test, lr, l2, static: _Static):
    """Test error of the learner trained on each (x[d], y[d], keys[d]): [draws]."""
    def one(args):
        xd, yd, kd = args
        return _evaluate(_train(xd, yd, lr, l2, kd, static), *test, static)[1]
    return jax.lax.map(one, (x, y, keys))


# -- run -----------------------------------------------------------------------

def _splits(config: Config):
    pool = rdata.load_mnist(config.data, config.data_dir)
    parts = rdata.split(pool, {"train": config.n_train, "valid": config.n_valid,
                               "test": config.n_test}, config.seed)
    arrays = {k: (jnp.asarray(d.images, jnp.float64), jnp.asarray(d.onehot, jnp.float64))
              for k, d in parts.items()}
    return parts, arrays


def _labels(per_class: int) -> jax.Array:
    return jnp.repeat(jnp.eye(10, dtype=jnp.float64), per_class, axis=0)


def _initial_pixels(config: Config, train: rdata.Dataset) -> jax.Array:
    n = 10 * config.per_class
    if config.init == "zeros":
        return jnp.zeros((n, 784), jnp.float64)
    if config.init == "real":
        idx = rdata.class_balanced_indices(train.labels, config.per_class, config.seed)
        return jnp.asarray(train.images[idx], jnp.float64)
    means = np.stack([train.images[train.labels == c].mean(0) for c in range(10)])
    return jnp.asarray(np.repeat(means, config.per_class, axis=0), jnp.float64)


def _initial_theta(config: Config, train: rdata.Dataset) -> dict:
    theta = {"pixels": _initial_pixels(config, train)}
    if config.learn_lr_l2:
        theta["log_lr"] = jnp.asarray(math.log(config.lr), jnp.float64)
        theta["log_l2"] = jnp.asarray(math.log(config.l2 if config.l2 > 0 else 1e-4), jnp.float64)
    return theta


def _optimizer(config: Config, theta: dict) -> optax.GradientTransformation:
    if not config.learn_lr_l2:
        return optax.sgd(config.meta_lr)
    labels = {k: ("pixels" if k == "pixels" else "scalars") for k in theta}
    return optax.multi_transform({"pixels": optax.sgd(config.meta_lr),
                                  "scalars": optax.adam(config.meta_lr_scalars)}, labels)


def _optimise(config, theta0, data, proj, weights, static, run_dir, description):
    """meta_optimize over the pixels; returns (final theta, history, final metrics)."""
    lr, l2 = jnp.asarray(config.lr), jnp.asarray(config.l2)

    def hypergrad_fn(theta, i):
        return _hypergrad(theta, iteration_key(config.seed, i), data, proj, weights, lr, l2, static)

    result = meta_optimize(hypergrad_fn, theta0, _optimizer(config, theta0),
                           config.meta_iterations, run_dir,
                           progress=None if run_dir is not None else False,
                           progress_metric="valid_error", description=description)
    final = _metrics(result.hypers, iteration_key(config.seed, config.meta_iterations), data,
                     proj, weights, lr, l2, static)
    return result.hypers, result.history, {k: float(v) for k, v in final.items()}


def _study(config: Config, run_dir: RunDir, theta0, data, static, main) -> dict:
    """Repeat the optimisation for every (resolution, validation size)."""
    sizes, resolutions = config.validation_sizes, config.study_resolutions
    its = config.meta_iterations + 1
    out = {"sizes": np.asarray(sizes, np.int64), "resolutions": np.asarray(resolutions, np.int64),
           "valid_error": np.zeros((len(resolutions), len(sizes), its)),
           "test_error": np.zeros((len(resolutions), len(sizes), its)),
           "valid_loss": np.zeros((len(resolutions), len(sizes), its)),
           "test_loss": np.zeros((len(resolutions), len(sizes), its))}
    for a, r in enumerate(resolutions):
        proj = block_projection(r)
        theta_r = dict(theta0, pixels=_images(theta0["pixels"], proj))
        for b, n in enumerate(sizes):
            name = f"study_r{r}_n{n}"
            if r == _SIDE and n == config.n_valid:
                history, final = main
            elif run_dir.resume and run_dir.has_arrays(name):
                cell = run_dir.load_arrays(name)
                for key in ("valid_error", "test_error", "valid_loss", "test_loss"):
                    out[key][a, b] = cell[key]
                continue
            else:
                weights = (jnp.arange(config.n_valid) < n).astype(jnp.float64)
                _, history, final = _optimise(config, theta_r, data, proj, weights, static, None,
                                              name)
            cell = {key: np.asarray([h[key] for h in history] + [final[key]], np.float64)
                    for key in ("valid_error", "test_error", "valid_loss", "test_loss")}
            run_dir.save_arrays(name, cell)
            for key, v in cell.items():
                out[key][a, b] = v
    return out


def run(config: Config, run_dir: RunDir) -> dict:
    t0 = time.perf_counter()
    parts, arrays = _splits(config)
    static = _Static.of(config)
    data = {"labels": _labels(config.per_class), "valid": arrays["valid"], "test": arrays["test"]}
    theta0 = _initial_theta(config, parts["train"])
    full_res = block_projection(_SIDE)
    all_valid = jnp.ones((config.n_valid,), jnp.float64)

    theta, history, final = _optimise(config, theta0, data, full_res, all_valid, static,
                                      run_dir, "canonical-examples")
    run_dir.save_arrays("hypers_final", theta)
    initial = {k: float(v) for k, v in _metrics(
        theta0, iteration_key(config.seed, config.meta_iterations), data, full_res, all_valid,
        jnp.asarray(config.lr), jnp.asarray(config.l2), static).items()}

    # Baselines: real images (one draw per class, several draws) and the whole training split.
    alpha, lam = _lr_l2(theta, config.lr, config.l2)
    train = parts["train"]
    idx = np.stack([rdata.class_balanced_indices(train.labels, config.per_class,
                                                 config.seed * 1000 + d)
                    for d in range(config.real_draws)])
    real_x = jnp.asarray(train.images[idx], jnp.float64)
    real_y = jnp.broadcast_to(_labels(config.per_class), real_x.shape[:2] + (10,))
    keys = jax.vmap(lambda d: iteration_key(config.seed + 1, d))(jnp.arange(config.real_draws))
    lr0, l20 = jnp.asarray(config.lr, jnp.float64), jnp.asarray(config.l2, jnp.float64)
    real_err = np.asarray(_test_error_of(real_x, real_y, keys, arrays["test"], lr0, l20, static))
    learned_x = _images(theta["pixels"], full_res)
    learned_err = np.asarray(_test_error_of(
        learned_x[None].repeat(len(keys), 0), data["labels"][None].repeat(len(keys), 0), keys,
        arrays["test"], alpha, lam, static))
    full_static = static._replace(batch_size=config.full_batch, steps=config.full_steps)
    full_err = float(_test_error_of(arrays["train"][0][None], arrays["train"][1][None],
                                    keys[:1], arrays["test"], lr0, l20, full_static)[0])

    study = None
    if config.validation_sizes and config.study_resolutions:
        study = _study(config, run_dir, theta0, data, static, (history, final))
        run_dir.save_arrays("study", study)

    run_dir.save_arrays("results", {
        "pixels_initial": theta0["pixels"], "pixels_learned": theta["pixels"],
        "real_example": real_x[0], "real_test_error": real_err,
        "learned_test_error": learned_err, "full_test_error": np.asarray(full_err),
        **{f"final_{k}": np.asarray(v) for k, v in final.items()},
    })
    summary = {
        "n_hyperparameters": int(theta["pixels"].size),
        "meta_iterations": config.meta_iterations,
        "test_error_initial": initial["test_error"],
        "valid_error_learned": final["valid_error"],
        "test_error_learned": final["test_error"],
        "test_error_learned_mean_over_draws": float(learned_err.mean()),
        "test_error_real_mean": float(real_err.mean()),
        "test_error_real_std": float(real_err.std()),
        "test_error_full_train": full_err,
        "train_error_learned": final["train_error"],
        "lr_learned": final["lr"], "l2_learned": final["l2"],
    }
    if study is not None:
        for a, r in enumerate(study["resolutions"]):
            for b, n in enumerate(study["sizes"]):
                summary[f"gap_r{int(r)}_n{int(n)}"] = float(
                    study["test_error"][a, b, -1] - study["valid_error"][a, b, -1])
    summary["wall_time_s"] = time.perf_counter() - t0
    plot(run_dir.path)
    return summary


# -- plot ----------------------------------------------------------------------

def _image_row(subfig, images, title, cmap, vmin, vmax, per_class):
    """One subfigure: `per_class` rows (at most 3) of the 10 digits, and a colour bar."""
    rows = min(per_class, 3)
    axes = subfig.subplots(rows, 10, squeeze=False, gridspec_kw={"wspace": 0.05, "hspace": 0.05})
    im = None
    for r in range(rows):
        for c in range(10):
            ax = axes[r, c]
            im = ax.imshow(images[c * per_class + r].reshape(_SIDE, _SIDE), cmap=cmap,
                           vmin=vmin, vmax=vmax)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"digit {c}", fontsize=9)
    subfig.colorbar(im, ax=axes, shrink=0.9, label="pixel value")
    subfig.suptitle(title, fontsize=11)


def plot(path) -> list[Path]:
    """Re-render the figures from results.npz, study.npz and metrics.jsonl."""
    from matplotlib.figure import Figure

    rd = RunDir(Path(path))
    res = rd.load_arrays("results")
    metrics = rd.read_metrics()
    cfg = (rd.read_config() or {}).get("config", {})
    per_class = int(cfg.get("per_class", 1))
    out = rd.figures
    paths = []

    # 1. real versus learned images
    learned = res["pixels_learned"]
    lim = float(np.percentile(np.abs(learned), 99.5)) or 1.0
    rows = min(per_class, 3)
    fig = Figure(figsize=(11, 1.0 + 2.6 * rows), layout="constrained")
    top, bottom = fig.subfigures(2, 1)
    real_err = 100 * res["real_test_error"]
    _image_row(top, res["real_example"], (
        f"{10 * per_class} real training images, one random draw (learner's test error over "
        f"{len(real_err)} draws: {real_err.mean():.1f} ± {real_err.std():.1f}%)"),
        "gray_r", 0.0, 1.0, per_class)
    _image_row(bottom, learned, (
        f"{10 * per_class} learned training images, init {cfg.get('init', 'zeros')} "
        f"(learner's test error: {100 * float(res['learned_test_error'].mean()):.1f}%; "
        "colour scale clipped at the 99.5th percentile of |pixel|)"),
        "RdBu_r", -lim, lim, per_class)
    paths.append(out / "learned_images.png")
    save_figure(fig, paths[-1], dpi=110)

    # 2. meta-learning curves
    fig = Figure(figsize=(10, 4.0), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    final = {k[len("final_"):]: float(v) for k, v in res.items() if k.startswith("final_")}
    records = list(metrics) + ([dict(final, iteration=len(metrics))] if final else [])
    it = np.array([m["iteration"] for m in records])
    labels = {"train": "training (the learned images)", "valid": "validation (meta-objective)",
              "test": "test"}
    for split, color in (("train", "C2"), ("valid", "C0"), ("test", "C3")):
        if records and f"{split}_loss" in records[0]:
            ax1.plot(it, [m[f"{split}_loss"] for m in records], "o-", ms=3, color=color,
                     label=labels[split])
            ax2.plot(it, [100 * m[f"{split}_error"] for m in records], "o-", ms=3, color=color,
                     label=labels[split])
    full = 100 * float(res["full_test_error"])
    ax2.axhline(full, color="0.3", ls=":", label=f"test, trained on all {cfg.get('n_train')} "
                "training images")
    ax2.axhline(real_err.mean(), color="0.6", ls="--",
                label=f"test, trained on {10 * per_class} real images (mean)")
    ax1.set_ylabel("loss of the trained learner (mean NLL, nats)")
    ax2.set_ylabel("error of the trained learner (%)")
    for ax in (ax1, ax2):
        ax.set_xlabel("meta-iteration (each point: the learner trained from scratch)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax1.set_title("Loss")
    ax2.set_title("Classification error")
    fig.suptitle(f"Learning {10 * per_class} training images "
                 f"({cfg.get('learner', 'logistic')} learner, validation set of "
                 f"{cfg.get('n_valid')})")
    paths.append(out / "meta_curves.png")
    save_figure(fig, paths[-1], dpi=110)

    # 3. overfitting the validation set
    if rd.has_arrays("study"):
        st = rd.load_arrays("study")
        sizes, res_ = st["sizes"], st["resolutions"]
        gap = 100 * (st["test_error"][:, :, -1] - st["valid_error"][:, :, -1])
        fig = Figure(figsize=(11, 4.2), layout="constrained")
        ax1, ax2 = fig.subplots(1, 2)
        for a, r in enumerate(res_):
            n_h = 10 * per_class * int(r) ** 2
            ax1.plot(sizes, gap[a], "o-", color=f"C{a}",
                     label=f"{int(r)}x{int(r)} images: {n_h:,} hyperparameters")
        ax1.set_xscale("log")
        ax1.set_xticks(sizes, [f"{int(n):,}" for n in sizes])
        ax1.minorticks_off()
        ax1.set_xlabel("validation set size (examples, log scale)")
        ax1.set_ylabel("test error − validation error (percentage points)")
        ax1.set_title(f"Overfitting the validation set after {st['test_error'].shape[-1] - 1} "
                      "meta-iterations")
        ax1.axhline(0, color="0.5", lw=0.8)
        ax1.grid(alpha=0.3, which="both")
        ax1.legend(fontsize=8)
        a = len(res_) - 1
        its = np.arange(st["test_error"].shape[-1])
        for b, n in enumerate(sizes):
            ax2.plot(its, 100 * st["valid_error"][a, b], "--", color=f"C{b}")
            ax2.plot(its, 100 * st["test_error"][a, b], "-", color=f"C{b}",
                     label=f"{int(n):,} validation examples")
        ax2.plot([], [], "k--", label="validation error")
        ax2.plot([], [], "k-", label="test error")
        ax2.set_xlabel("meta-iteration")
        ax2.set_ylabel("error of the trained learner (%)")
        ax2.set_title(f"Validation and test error ({int(res_[a])}x{int(res_[a])} images)")
        ax2.set_ylim(bottom=0)
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=8)
        paths.append(out / "overfitting.png")
        save_figure(fig, paths[-1], dpi=110)
    return paths


EXPERIMENT = register(Experiment(
    name="canonical-examples",
    description="Learn the pixels of a 10-image training set (paper sec. 3.3) and measure "
                "how much that overfits validation sets of several sizes.",
    Config=Config, smoke=SMOKE, run=run, plot=plot))
