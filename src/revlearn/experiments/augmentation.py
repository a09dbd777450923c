"""Learned data augmentation: a local, continuous deformation y = expm(t A) x.

The lab notebook's idea: restrict a learned linear transformation of the
images to continuous deformations y = expm(t A) x, with t ~ N(0, s^2) drawn
per example and per step, A coupling adjacent pixels only, and learn A by
hypergradient through training on the augmented data.

Generator. A couples each pixel with its 4 neighbours; it is stored as 4 edge
arrays [4, 28, 28] (`_expm_action`) and applied as shifts of the image, never
as a 784 x 784 matrix. With unconstrained edges E:

    generator="antisymmetric":  G = A - A^T, A = E   (the notebook's "use both A and
                                A^T": imaginary eigenvalues, norm-preserving
                                flows such as translations and rotations)
    generator="general":        G = E               (also directional, real-eigenvalue
                                transformations such as smoothing or sharpening)
    edges of the applied generator: g_max tanh(G / g_max), entry by entry

The entrywise tanh (odd, so G stays antisymmetric) bounds every edge weight by
g_max = `max_edge` (0.5: a translation of at most one pixel per unit of t),
hence ||t G||_1 <= 4 g_max |t|; t is clipped to +-`t_clip` s. This keeps the
fixed Taylor scheme of `expm_action` (m = `substeps`, K = `terms`) accurate.

Training (the elementary learner, logistic regression or a tanh MLP, on
`n_train` images; T steps of batch B; step k's batch and t's drawn from
fold_in(key_i, k)):

    x~_{k,b} = expm(t_{k,b} G) x_{k,b},   t_{k,b} = s clip(z_{k,b}, -c, c),  z ~ N(0, 1)
    v_{k+1} = gamma v_k - (1 - gamma) grad NLL(w_k; x~_k),  w_{k+1} = w_k + alpha v_{k+1}

The T B augmented images are computed up front (one batched `expm_action`)
and passed to `revlearn.sgd` as data, so the exactly reversible loop sees a
plain logistic/MLP loss and the hypergradient flows back through the
augmentation by ordinary autodiff. Meta-objective, minimised with Adam:

    f(E) = NLL(w_T; validation set) + penalty_strength * P(G)
    P = sum of squared differences of adjacent edge weights ("smooth") or sum |G| ("l1")

The symmetry trap (notebook: "a symmetry-related zero gradient"): t and -t
are equally likely, so the expected training distribution, and hence the
expected meta-objective, is an even function of A; at A = 0 its gradient
vanishes. Worse, at A = 0 the hypergradient of one draw is exactly linear in
the t's (g(-t) = -g(t)), so it is pure zero-mean noise. We start from a
random E (`init_scale`), away from the stationary point, and let the
second-order effects (the curvature of the even function) grow the useful
directions; `init_scale=0` shows what happens without that.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from matplotlib.figure import Figure

import revlearn
from revlearn import models
from revlearn.meta import RunDir, iteration_key, meta_optimize

from . import _expm_action as ea
from . import _plots
from ._config import MnistConfig
from ._registry import Experiment
from ._splits import arrays, mnist_parts
from ._validate import at_least, at_most, check_decay, check_pool, nonnegative, positive

__all__ = ["Config", "run", "plot", "EXPERIMENT", "generator_edges", "meta_objective",
           "flow_field"]

_SIDE = 28
_COLUMNS = ("valid_loss", "valid_error", "test_loss", "test_error")  # of the eval_* arrays


@dataclasses.dataclass(frozen=True)
class Config(MnistConfig):
    """Settings of augmentation (defaults: about two minutes on 2 CPU cores)."""

    n_train: int = 500
    n_valid: int = 2000
    n_test: int = 3000
    learner: Literal["logistic", "mlp"] = "logistic"
    hidden: int = 50
    batch_size: int = 50
    steps: int = 100
    lr: float = 0.5
    momentum: float = 0.9
    generator: Literal["antisymmetric", "general"] = "antisymmetric"
    t_scale: float = 1.0  # s
    t_clip: float = 3.0  # |t| <= t_clip * s
    max_edge: float = 0.5  # g_max
    init_scale: float = 0.05  # std of the initial random edges E
    penalty: Literal["smooth", "l1", "none"] = "smooth"
    penalty_strength: float = 1e-3
    substeps: int = 4
    terms: int = 8
    image_dtype: Literal["float32", "float64"] = "float32"  # of the augmented images
    meta_lr: float = 0.03
    meta_iterations: int = 40
    eval_seeds: int = 4  # trainings averaged in the final comparison

    def check(self):
        at_least(self, 1, "n_train", "n_valid", "n_test", "hidden", "batch_size", "steps",
                 "substeps", "eval_seeds")
        at_least(self, 2, "terms")  # a Taylor polynomial of degree >= 2
        at_most(self, "batch_size", "n_train")
        check_pool(self, "n_train", "n_valid", "n_test")
        check_decay("momentum", self.momentum)
        positive(self, "lr", "t_scale", "t_clip", "max_edge", "meta_lr")
        nonnegative(self, "init_scale", "penalty_strength")
        at_least(self, 0, "meta_iterations")


SMOKE = Config(n_train=100, n_valid=200, n_test=200, batch_size=20, steps=10, substeps=2,
               terms=4, meta_iterations=3, eval_seeds=2)


# -- the generator and the problem -------------------------------------------------

def generator_edges(raw: jax.Array, kind: str, max_edge) -> jax.Array:
    """The edge weights [4, 28, 28] of the applied generator G (module docstring)."""
    g = raw - ea.transpose_edges(raw) if kind == "antisymmetric" else raw
    return max_edge * jnp.tanh(g / max_edge)


def flow_field(edges) -> tuple[np.ndarray, np.ndarray]:
    """(v_x, v_y) [28, 28]: the velocity, in pixels per unit of t, of the
    transport dx/dt = -v . grad x that the antisymmetric part of G discretises
    with central differences (v_x = E_left - E_right, v_y = E_up - E_down;
    v_y > 0 points down the image)."""
    e = np.asarray(edges)
    return e[1] - e[0], e[3] - e[2]


def _penalty(edges, kind: str):
    if kind == "l1":
        return jnp.sum(jnp.abs(edges))
    if kind == "smooth":
        return jnp.sum(jnp.diff(edges, axis=1) ** 2) + jnp.sum(jnp.diff(edges, axis=2) ** 2)
    return jnp.zeros((), edges.dtype)


def _augmented_stream(edges, key, train, static: Config, t_sign=1.0, augment=True):
    """The T batches of (augmented images [T, B, 784], labels [T, B, 10]) of one
    training run (`augment=False`: the batches as they are)."""
    x, y = train
    steps = jnp.arange(static.steps)
    k_batch, k_t = jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)
    idx = jax.vmap(lambda k: models.batch_indices(x.shape[0], static.batch_size, k, k_batch))(steps)
    dtype = jnp.dtype(static.image_dtype)
    xb = x[idx].reshape(-1, _SIDE, _SIDE).astype(dtype)
    if augment:
        z = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k_t, k),
                                                 (static.batch_size,)))(steps)
        t = t_sign * static.t_scale * jnp.clip(z, -static.t_clip, static.t_clip)
        xb = ea.expm_action(edges.astype(dtype), t.reshape(-1).astype(dtype), xb,
                            substeps=static.substeps, terms=static.terms)
    return xb.reshape(static.steps, static.batch_size, -1), y[idx]


def _train_loss(params, h, step):
    return models.nll(models.mlp_apply(params, h["x"][step]), h["y"][step])


def _train(edges, key, train, static: Config, t_sign=1.0, method="reversible", augment=True):
    xa, ya = _augmented_stream(edges, key, train, static, t_sign, augment)
    params0 = ([{"w": jnp.zeros((784, 10), jnp.float64), "b": jnp.zeros((10,), jnp.float64)}]
               if static.learner == "logistic" else models.mlp_init(
                   jax.random.fold_in(key, 2), [784, static.hidden, 10], dtype=jnp.float64))
    method = (revlearn.Reversible(min_momentum=static.momentum) if method == "reversible"
              else revlearn.Unrolled())
    return revlearn.sgd(_train_loss, params0, {"x": xa, "y": ya}, lr=static.lr,
                        momentum=static.momentum, steps=static.steps, method=method)


def _errors(params, x, y):
    logp = models.mlp_apply(params, x)
    return models.nll(logp, y), models.error_rate(logp, y)


def meta_objective(theta, key, data, static: Config, t_sign=1.0, method="reversible"):
    """(validation loss + penalty, metrics) after training on data augmented by theta["edges"].

    `t_sign=-1` flips every t (used to show the symmetry of the hypergradient at A = 0).
    """
    edges = generator_edges(theta["edges"], static.generator, static.max_edge)
    v_loss, v_err = _errors(_train(edges, key, data["train"], static, t_sign, method),
                            *data["valid"])
    pen = _penalty(edges, static.penalty)
    return v_loss + static.penalty_strength * pen, {
        "valid_loss": v_loss, "valid_error": v_err, "penalty": pen,
        "generator_one_norm": ea.one_norm(edges)}


@functools.partial(jax.jit, static_argnames=("static", "method"))
def _hypergrad(theta, key, data, static: Config, t_sign=1.0, method="reversible"):
    (loss, metrics), grads = jax.value_and_grad(meta_objective, has_aux=True)(
        theta, key, data, static, t_sign, method)
    return loss, grads, metrics


@functools.partial(jax.jit, static_argnames=("static", "augment"))
def _evaluate(theta, keys, data, static: Config, augment=True):
    """[len(keys), 4]: (valid loss, valid error, test loss, test error) per training run."""
    edges = generator_edges(theta["edges"], static.generator, static.max_edge)

    def one(k):
        params = _train(edges, k, data["train"], static, augment=augment)
        return jnp.stack([*_errors(params, *data["valid"]),
                          *_errors(params, *data["test"])]).astype(jnp.float64)
    return jax.lax.map(one, keys)


@functools.partial(jax.jit, static_argnames=("substeps", "terms", "refine"))
def _transform(edges, t, x, substeps, terms, refine=1):
    """expm(t A) x as `refine` applications of expm(t A / refine)."""
    for _ in range(refine):
        x = ea.expm_action(edges, t / refine, x, substeps=substeps, terms=terms)
    return x


# -- plot ----------------------------------------------------------------------

@_plots.styled
def plot(path) -> list[Path]:
    """Re-render the figures from results.npz and metrics.jsonl."""
    run = _plots.saved(path, "results")
    res, cfg, out, paths = run.arrays["results"], run.config, run.run.figures, []
    kind = cfg.get("generator", "antisymmetric")

    # 1. digits under the learned transformation, one row per digit, one column per t
    tr, ts = res["transformed"], res["t_values"]
    hi = max(1.0, float(np.percentile(tr, 99.8)))
    fig, axes = _plots.figure(tr.shape[1], tr.shape[0], width=1.3 * tr.shape[1] + 1.2,
                              height=1.35 * tr.shape[0] + 0.8)
    im = _plots.image_grid(axes, tr.reshape(-1, _SIDE, _SIDE), [
        f"t = {t:+.2f}" + (" (original)" if abs(t) < 1e-12 else "") for t in ts],
        cmap="gray_r", vmin=0.0, vmax=hi)
    for ax in axes[:, np.argmin(np.abs(ts))]:  # frame the originals
        ax.spines[:].set(color="C0", linewidth=2)
    fig.colorbar(im, ax=axes, shrink=0.6, extend="both" if float(tr.max()) > hi else "min",
                 label="pixel value (shared scale, clipped)")
    fig.suptitle("Test digits under the learned transformation expm(t A) x, t from -2s to 2s "
                 f"(s = {cfg.get('t_scale', 1.0):g}; {kind} generator)")
    _plots.save(fig, out, "transformed_digits", paths)

    # 2. the generator: flow field over the mean training image, and the four edge maps
    edges = res["edges_learned"]
    fig = Figure(figsize=(12, 5.4), layout="constrained")
    left, right = fig.subfigures(1, 2, width_ratios=[1.1, 1])
    ax, axs = left.subplots(), right.subplots(2, 2)
    vx, vy = flow_field(edges)
    speed, every2 = np.hypot(vx, vy), (slice(None, None, 2),) * 2
    ax.imshow(res["mean_image"], cmap="gray_r", alpha=0.35)
    q = ax.quiver(*np.mgrid[0:_SIDE:2, 0:_SIDE:2][::-1], vx[every2], vy[every2], speed[every2],
                  cmap="viridis", angles="xy", scale_units="xy",
                  scale=max(float(speed.max()), 1e-12) / 3.6, width=0.004)
    left.colorbar(q, ax=ax, shrink=0.8, label="speed (pixels per unit of t)")
    ax.set(xlim=(-0.5, _SIDE - 0.5), ylim=(_SIDE - 0.5, -0.5), xlabel="pixel column",
           ylabel="pixel row", title="Flow of pixel content for t > 0" + (
               "" if kind == "antisymmetric" else " (antisymmetric part of A)")
           + "\n(every 2nd pixel; background: mean training image)")
    ax.grid(False)
    lim = max(float(np.abs(edges).max()), 1e-12)
    im = _plots.image_grid(axs, edges, [f"neighbour {n}" for n in (
        "right (j+1)", "left (j-1)", "below (i+1)", "above (i-1)")],
        cmap="RdBu_r", vmin=-lim, vmax=lim)
    right.colorbar(im, ax=axs, shrink=0.8, label="edge weight A[p, neighbour]")
    right.suptitle("Edge weights of the learned generator", fontsize=10)
    fig.suptitle(f"Learned generator A ({kind}, {edges.size:,} edge weights)")
    _plots.save(fig, out, "generator", paths)

    # 3. meta-learning curves against no augmentation, and the final comparison
    none = res["eval_none"].mean(0)
    fig = _plots.meta_curves(run.metrics, "learner", {
        f"no augmentation (mean of {len(res['eval_none'])} runs)": dict(zip(_COLUMNS[:2], none))})
    for ax, key, scale in zip(fig.axes, ("valid_loss", "valid_error"), (1, 100)):
        vals = scale * np.array([m[key] for m in run.metrics])
        if len(vals) >= 5:
            ax.plot(np.arange(2, len(vals) - 2) + run.metrics[0]["iteration"],
                    np.convolve(vals, np.ones(5) / 5, "valid"), color="C0", lw=3, alpha=0.5,
                    label="validation, moving average of 5")
            ax.legend()
    fig.suptitle("Meta-learning curves (each point: one training run on augmented data)")
    _plots.save(fig, out, "meta_curves", paths)

    fig, ax = _plots.figure(width=6, height=4.2)
    names = {"none": "no\naugmentation", "initial": "initial\nrandom A", "learned": "learned A"}
    for j, (split, col) in enumerate((("valid", 1), ("test", 3))):
        e = np.array([100 * res[f"eval_{k}"][:, col] for k in names])
        ax.bar_label(ax.bar(np.arange(3) + 0.38 * j - 0.19, e.mean(1), 0.36, yerr=e.std(1),
                            capsize=3, color=_plots.SPLIT_COLORS[split],
                            label=_plots.SPLIT_NAMES[split]), fmt="%.2f", padding=2, fontsize=8)
    ax.set_xticks(np.arange(3), list(names.values()))
    ax.set(ylim=(0, None), ylabel="error after training (%), mean ± std",
           title=f"Final comparison ({len(res['eval_none'])} training runs each, unseen "
           "minibatch orders and t's)")
    ax.legend(loc="lower left")
    _plots.save(fig, out, "final_comparison", paths)
    return paths


# -- run -----------------------------------------------------------------------

def run(config: Config, run_dir: RunDir) -> dict:
    t0 = time.perf_counter()
    parts = mnist_parts(config, "train", "valid", "test")
    splits, static = arrays(parts), config.program()
    data = {"train": splits["train"], "valid": splits["valid"]}
    init_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 2**20)  # no iteration's key
    theta0 = {"edges": config.init_scale * jax.random.normal(init_key, (4, _SIDE, _SIDE),
                                                             jnp.float64)}
    result = meta_optimize(
        lambda theta, i: _hypergrad(theta, iteration_key(config.seed, i), data, static),
        theta0, optax.adam(config.meta_lr), config.meta_iterations, run_dir,
        progress_metric="valid_error", description="augmentation")
    theta = result.hypers
    run_dir.save_arrays("hypers_final", theta)

    # Final comparison: fresh minibatch orders and t's, never used in meta-training.
    keys = jax.vmap(lambda k: iteration_key(config.seed, config.meta_iterations + k))(
        jnp.arange(config.eval_seeds))
    eval_data = dict(data, test=splits["test"])
    rows = {"none": _evaluate(theta0, keys, eval_data, static, augment=False),
            "initial": _evaluate(theta0, keys, eval_data, static),
            "learned": _evaluate(theta, keys, eval_data, static)}

    # The learned transformation on a few test digits, t from -2s to 2s, and the accuracy
    # of the Taylor scheme against 8 times as many sub-steps.
    edges0, edges = (generator_edges(th["edges"], config.generator, config.max_edge)
                     for th in (theta0, theta))
    test = parts["test"]
    pick = np.array([int(np.flatnonzero(test.labels == c)[0]) for c in (0, 2, 4, 7, 9)])
    ts = np.linspace(-2.0, 2.0, 7) * config.t_scale
    xs = jnp.asarray(np.repeat(test.images[pick], len(ts), 0).reshape(-1, _SIDE, _SIDE),
                     jnp.float64)
    tt = jnp.asarray(np.tile(ts, len(pick)))
    t_max = jnp.full_like(tt, config.t_clip * config.t_scale)
    shown, shown_fine, at_max, at_max_fine = (
        _transform(edges, t, xs, config.substeps, config.terms, refine)
        for t in (tt, t_max) for refine in (1, 8))
    run_dir.save_arrays("results", {
        "edges_initial": edges0, "edges_learned": edges, "t_values": ts,
        "digits": np.asarray(test.images[pick]),
        "transformed": np.asarray(shown).reshape(len(pick), len(ts), _SIDE, _SIDE),
        "mean_image": parts["train"].images.mean(0).reshape(_SIDE, _SIDE),
        **{f"eval_{k}": np.asarray(v) for k, v in rows.items()}})
    summary = {"meta_iterations": config.meta_iterations, "n_hyperparameters": 4 * _SIDE ** 2,
               "generator_one_norm_learned": float(ea.one_norm(edges)),
               "expm_max_abs_error_at_t_max": float(jnp.max(jnp.abs(at_max - at_max_fine))),
               "expm_max_abs_error_shown": float(jnp.max(jnp.abs(shown - shown_fine)))}
    for tag, r in rows.items():
        for i, k in enumerate(_COLUMNS):
            summary[f"{k}_{tag}"] = float(np.asarray(r)[:, i].mean())
            if k.endswith("error"):
                summary[f"{k}_{tag}_std"] = float(np.asarray(r)[:, i].std())
    summary.update(wall_time_s=time.perf_counter() - t0)
    plot(run_dir.path)
    return summary


EXPERIMENT = Experiment(
    "augmentation", "Learn a local data augmentation y = expm(tA) x (A on adjacent pixels) by "
    "hypergradient through training on the augmented images.", Config, SMOKE, run, plot)
