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
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import revlearn
from revlearn import data as rdata
from revlearn import models
from revlearn.meta import RunDir, save_figure, iteration_key, meta_optimize

from . import _expm_action as ea
from ._registry import Experiment, register
from ._config import MnistConfig
from ._validate import (
    at_least,
    check_decay,
    check_pool,
    fail,
    nonnegative,
    positive,
)

__all__ = ["Config", "run", "plot", "EXPERIMENT", "generator_edges", "meta_objective",
           "flow_field"]

_SIDE = 28


@dataclasses.dataclass(frozen=True)
class Config(MnistConfig):
    """Settings of augmentation (defaults: a few minutes on 2 CPU cores)."""

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
    meta_lr: float = 0.03
    meta_iterations: int = 40
    eval_seeds: int = 4  # trainings averaged in the final comparison

    def check(self):
        at_least(self, 1, "n_train", "n_valid", "n_test", "hidden", "batch_size", "steps",
                 "substeps", "eval_seeds")
        if self.terms < 2:
            fail("terms", self.terms, "must be >= 2 (a Taylor polynomial of degree >= 2)",
                 "pass terms >= 2, e.g. terms=8 (the default)")
        if self.batch_size > self.n_train:
            fail("batch_size", self.batch_size, f"exceeds n_train={self.n_train}",
                 "pass batch_size <= n_train")
        check_pool(self, "n_train", "n_valid", "n_test")
        check_decay("momentum", self.momentum)
        positive(self, "lr", "t_scale", "t_clip", "max_edge", "meta_lr")
        nonnegative(self, "init_scale", "penalty_strength")
        at_least(self, 0, "meta_iterations")


SMOKE = Config(n_train=100, n_valid=200, n_test=200, batch_size=20, steps=10, substeps=2,
               terms=4, meta_iterations=3, eval_seeds=2)


# -- the generator -------------------------------------------------------------

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
        return (jnp.sum(jnp.diff(edges, axis=1) ** 2) + jnp.sum(jnp.diff(edges, axis=2) ** 2))
    return jnp.zeros((), edges.dtype)


# -- the problem -----------------------------------------------------------------

class _Static(NamedTuple):
    """What fixes the compiled programs (a hashable jit static argument)."""

    learner: str
    hidden: int
    batch_size: int
    steps: int
    momentum: float
    generator: str
    penalty: str
    substeps: int
    terms: int
    augment: bool = True
    method: str = "reversible"  # or "unrolled" (tests)
    aug_dtype: str = "float32"  # of the augmented images (8-bit data; halves memory traffic)

    @classmethod
    def of(cls, config: Config, **changes) -> _Static:
        return cls(config.learner, config.hidden, config.batch_size, config.steps,
                   config.momentum, config.generator, config.penalty, config.substeps,
                   config.terms)._replace(**changes)


class _Floats(NamedTuple):
    """Float settings passed as traced arguments (no recompilation)."""

    lr: jax.Array
    t_scale: jax.Array
    t_clip: jax.Array
    max_edge: jax.Array
    penalty_strength: jax.Array

    @classmethod
    def of(cls, config: Config) -> _Floats:
        f = lambda v: jnp.asarray(v, jnp.float64)  # noqa: E731
        return cls(f(config.lr), f(config.t_scale), f(config.t_clip), f(config.max_edge),
                   f(config.penalty_strength))


def _apply(static):
    return models.logistic_apply if static.learner == "logistic" else models.mlp_apply


def _params0(static, key):
    if static.learner == "logistic":
        return [{"w": jnp.zeros((784, 10), jnp.float64), "b": jnp.zeros((10,), jnp.float64)}]
    return models.mlp_init(key, [784, static.hidden, 10], dtype=jnp.float64)


def _augmented_stream(edges, key, train, static: _Static, fl: _Floats, t_sign=1.0):
    """The T batches of (augmented images [T, B, 784], labels [T, B, 10]) of one training run."""
    x, y = train
    steps = jnp.arange(static.steps)
    k_batch, k_t = jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)
    idx = jax.vmap(lambda k: models.batch_indices(x.shape[0], static.batch_size, k, k_batch))(steps)
    dtype = jnp.dtype(static.aug_dtype)
    xb = x[idx].reshape(-1, _SIDE, _SIDE).astype(dtype)
    if static.augment:
        z = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k_t, k),
                                                 (static.batch_size,)))(steps)
        t = t_sign * fl.t_scale * jnp.clip(z, -fl.t_clip, fl.t_clip)
        xb = ea.expm_action(edges.astype(dtype), t.reshape(-1).astype(dtype), xb,
                            substeps=static.substeps, terms=static.terms)
    return xb.reshape(static.steps, static.batch_size, -1), y[idx]


def _train_loss(params, h, step, *, static):
    return models.nll(_apply(static)(params, h["x"][step]), h["y"][step])


def _train(edges, key, train, static: _Static, fl: _Floats, t_sign=1.0):
    xa, ya = _augmented_stream(edges, key, train, static, fl, t_sign)
    method = (revlearn.Reversible(min_momentum=static.momentum) if static.method == "reversible"
              else revlearn.Unrolled())
    return revlearn.sgd(functools.partial(_train_loss, static=static),
                        _params0(static, jax.random.fold_in(key, 2)), {"x": xa, "y": ya},
                        lr=fl.lr, momentum=static.momentum, steps=static.steps, method=method)


def _errors(params, x, y, static):
    logp = _apply(static)(params, x)
    return models.nll(logp, y), models.error_rate(logp, y)


def meta_objective(theta, key, data, static: _Static, fl: _Floats, t_sign=1.0):
    """(validation loss + penalty, metrics) after training on data augmented by theta["edges"].

    `t_sign=-1` flips every t (used to show the symmetry of the hypergradient at A = 0).
    """
    edges = generator_edges(theta["edges"], static.generator, fl.max_edge)
    params = _train(edges, key, data["train"], static, fl, t_sign)
    v_loss, v_err = _errors(params, *data["valid"], static)
    pen = _penalty(edges, static.penalty)
    return v_loss + fl.penalty_strength * pen, {
        "valid_loss": v_loss, "valid_error": v_err, "penalty": pen,
        "generator_one_norm": ea.one_norm(edges)}


@functools.partial(jax.jit, static_argnames="static")
def _hypergrad(theta, key, data, static: _Static, fl: _Floats, t_sign=1.0):
    (loss, metrics), grads = jax.value_and_grad(meta_objective, has_aux=True)(
        theta, key, data, static, fl, t_sign)
    return loss, grads, metrics


@functools.partial(jax.jit, static_argnames="static")
def _evaluate(theta, keys, data, static: _Static, fl: _Floats):
    """[len(keys), 4]: (valid loss, valid error, test loss, test error) per training run."""
    edges = generator_edges(theta["edges"], static.generator, fl.max_edge)

    def one(k):
        params = _train(edges, k, data["train"], static, fl)
        return jnp.stack([*_errors(params, *data["valid"], static),
                          *_errors(params, *data["test"], static)]).astype(jnp.float64)
    return jax.lax.map(one, keys)


@functools.partial(jax.jit, static_argnames=("substeps", "terms"))
def _transform(edges, t, x, substeps, terms):
    return ea.expm_action(edges, t, x, substeps=substeps, terms=terms)


# -- run -----------------------------------------------------------------------

def _splits(config: Config):
    pool = rdata.load_mnist(config.data, config.data_dir)
    parts = rdata.split(pool, {"train": config.n_train, "valid": config.n_valid,
                               "test": config.n_test}, config.seed)
    return parts, {k: (jnp.asarray(d.images, jnp.float64), jnp.asarray(d.onehot, jnp.float64))
                   for k, d in parts.items()}


def _initial_theta(config: Config) -> dict:
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 2**20)  # not a meta-iteration key
    return {"edges": config.init_scale * jax.random.normal(key, (4, _SIDE, _SIDE), jnp.float64)}


def _stats(rows: np.ndarray) -> dict:
    names = ("valid_loss", "valid_error", "test_loss", "test_error")
    return {n: (float(rows[:, i].mean()), float(rows[:, i].std())) for i, n in enumerate(names)}


def run(config: Config, run_dir: RunDir) -> dict:
    t0 = time.perf_counter()
    parts, arrays = _splits(config)
    data = {"train": arrays["train"], "valid": arrays["valid"]}
    static, fl = _Static.of(config), _Floats.of(config)
    theta0 = _initial_theta(config)

    def hypergrad_fn(theta, i):
        return _hypergrad(theta, iteration_key(config.seed, i), data, static, fl)

    result = meta_optimize(hypergrad_fn, theta0, optax.adam(config.meta_lr),
                           config.meta_iterations, run_dir, progress_metric="valid_error",
                           description="augmentation")
    theta = result.hypers
    run_dir.save_arrays("hypers_final", theta)

    # Final comparison: fresh minibatch orders and t's, never used in meta-training.
    keys = jax.vmap(lambda k: iteration_key(config.seed, config.meta_iterations + k))(
        jnp.arange(config.eval_seeds))
    eval_data = dict(data, test=arrays["test"])
    no_aug = fl._replace(t_scale=jnp.zeros_like(fl.t_scale))  # t = 0: expm(0) x = x exactly
    rows = {"none": _evaluate(theta0, keys, eval_data, static, no_aug),
            "initial": _evaluate(theta0, keys, eval_data, static, fl),
            "learned": _evaluate(theta, keys, eval_data, static, fl)}
    stats = {k: _stats(np.asarray(v)) for k, v in rows.items()}

    # The learned transformation on a few test digits, t from -2s to 2s, and the
    # accuracy of the Taylor scheme against a finer one: expm(tA) x computed as 8
    # applications of expm(tA/8) (8 m sub-steps, the same compiled program).
    edges0 = generator_edges(theta0["edges"], config.generator, config.max_edge)
    edges = generator_edges(theta["edges"], config.generator, config.max_edge)
    test = parts["test"]
    pick = np.array([int(np.flatnonzero(test.labels == c)[0]) for c in (0, 2, 4, 7, 9)])
    ts = np.linspace(-2.0, 2.0, 7) * config.t_scale
    xs = jnp.asarray(np.repeat(test.images[pick], len(ts), 0).reshape(-1, _SIDE, _SIDE),
                     jnp.float64)
    tt = jnp.asarray(np.tile(ts, len(pick)))
    t_max = jnp.full_like(tt, config.t_clip * config.t_scale)

    def transform(t, refine=1):
        y = xs
        for _ in range(refine):
            y = _transform(edges, t / refine, y, config.substeps, config.terms)
        return y

    shown = transform(tt)
    expm_err_shown = float(jnp.max(jnp.abs(shown - transform(tt, 8))))
    expm_err = float(jnp.max(jnp.abs(transform(t_max) - transform(t_max, 8))))

    run_dir.save_arrays("results", {
        "edges_initial": edges0, "edges_learned": edges, "t_values": ts,
        "digits": np.asarray(test.images[pick]),
        "transformed": np.asarray(shown).reshape(len(pick), len(ts), _SIDE, _SIDE),
        "mean_image": parts["train"].images.mean(0).reshape(_SIDE, _SIDE),
        **{f"eval_{k}": np.asarray(v) for k, v in rows.items()},
    })
    summary = {"meta_iterations": config.meta_iterations, "n_hyperparameters": 4 * _SIDE ** 2,
               "generator_one_norm_learned": float(ea.one_norm(edges)),
               "expm_max_abs_error_at_t_max": expm_err,
               "expm_max_abs_error_shown": expm_err_shown}
    for tag, st in stats.items():
        for k, (m, s) in st.items():
            summary[f"{k}_{tag}"] = m
            if k.endswith("error"):
                summary[f"{k}_{tag}_std"] = s
    summary["wall_time_s"] = time.perf_counter() - t0
    plot(run_dir.path)
    return summary


# -- plot ----------------------------------------------------------------------

def plot(path) -> list[Path]:
    """Re-render the figures from results.npz and metrics.jsonl."""
    from matplotlib.figure import Figure

    rd = RunDir(Path(path))
    res = rd.load_arrays("results")
    metrics = rd.read_metrics()
    cfg = (rd.read_config() or {}).get("config", {})
    kind = cfg.get("generator", "antisymmetric")
    out = rd.figures
    paths = []

    # 1. digits under the learned transformation
    tr, ts = res["transformed"], res["t_values"]
    n_digits, n_t = tr.shape[:2]
    lo, hi = 0.0, max(1.0, float(np.percentile(tr, 99.8)))
    fig = Figure(figsize=(1.3 * n_t + 1.2, 1.35 * n_digits + 0.8), layout="constrained")
    axes = fig.subplots(n_digits, n_t, squeeze=False)
    im = None
    for r in range(n_digits):
        for c in range(n_t):
            ax = axes[r, c]
            im = ax.imshow(tr[r, c], cmap="gray_r", vmin=lo, vmax=hi)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"t = {ts[c]:+.2f}" + (" (original)" if abs(ts[c]) < 1e-12 else ""),
                             fontsize=9)
    fig.colorbar(im, ax=axes, shrink=0.6, extend="both" if float(tr.max()) > hi else "min",
                 label="pixel value (shared scale, clipped)")
    s = cfg.get("t_scale", 1.0)
    fig.suptitle(f"Test digits under the learned transformation expm(t A) x, t from -2s to 2s "
                 f"(s = {s:g}; {kind} generator)", fontsize=10)
    paths.append(out / "transformed_digits.png")
    save_figure(fig, paths[-1], dpi=110)

    # 2. the generator: flow field and edge weights
    edges = res["edges_learned"]
    fig = Figure(figsize=(12, 5.4), layout="constrained")
    left, right = fig.subfigures(1, 2, width_ratios=[1.1, 1])
    ax = left.subplots()
    vx, vy = flow_field(edges)
    ax.imshow(res["mean_image"], cmap="gray_r", alpha=0.35)
    yy, xx = np.mgrid[0:_SIDE, 0:_SIDE]
    step = 2
    speed = np.hypot(vx, vy)
    q = ax.quiver(xx[::step, ::step], yy[::step, ::step], vx[::step, ::step], vy[::step, ::step],
                  speed[::step, ::step], cmap="viridis", angles="xy", scale_units="xy",
                  scale=max(float(speed.max()), 1e-12) / (1.8 * step), width=0.004)
    left.colorbar(q, ax=ax, shrink=0.8, label="speed (pixels per unit of t)")
    ax.set_xlim(-0.5, _SIDE - 0.5)
    ax.set_ylim(_SIDE - 0.5, -0.5)
    ax.set_xlabel("pixel column")
    ax.set_ylabel("pixel row")
    part = "" if kind == "antisymmetric" else " (antisymmetric part of A)"
    ax.set_title(f"Flow of pixel content for t > 0{part}\n"
                 "(every 2nd pixel; background: mean training image)", fontsize=10)
    axs = right.subplots(2, 2)
    lim = max(float(np.abs(edges).max()), 1e-12)
    names = ("right (j+1)", "left (j-1)", "below (i+1)", "above (i-1)")
    for k, a in enumerate(axs.ravel()):
        im = a.imshow(edges[k], cmap="RdBu_r", vmin=-lim, vmax=lim)
        a.set_title(f"neighbour {names[k]}", fontsize=9)
        a.set_xticks([])
        a.set_yticks([])
    right.colorbar(im, ax=axs, shrink=0.8, label="edge weight A[p, neighbour]")
    right.suptitle("Edge weights of the learned generator", fontsize=10)
    fig.suptitle(f"Learned generator A ({kind}, {4 * _SIDE * _SIDE:,} edge weights)")
    paths.append(out / "generator.png")
    save_figure(fig, paths[-1], dpi=110)

    # 3. meta-learning curves and the final comparison
    fig = Figure(figsize=(12, 4.2), layout="constrained")
    ax1, ax2, ax3 = fig.subplots(1, 3)
    it = np.array([m["iteration"] for m in metrics])
    none = res["eval_none"]
    if metrics:
        for ax, key, scale in ((ax1, "valid_loss", 1.0), (ax2, "valid_error", 100.0)):
            vals = scale * np.array([m[key] for m in metrics])
            ax.plot(it, vals, "o-", ms=3, color="C0", alpha=0.45,
                    label="with augmentation (one training run)")
            if len(vals) >= 5:
                smooth = np.convolve(vals, np.ones(5) / 5, mode="valid")
                ax.plot(it[2:-2], smooth, color="C0", lw=2, label="moving average of 5")
        ax1.axhline(none[:, 0].mean(), color="0.4", ls="--", label="no augmentation (mean)")
        ax2.axhline(100 * none[:, 1].mean(), color="0.4", ls="--",
                    label="no augmentation (mean)")
    ax1.set_ylabel("validation loss (mean NLL, nats)")
    ax2.set_ylabel("validation error (%)")
    for ax in (ax1, ax2):
        ax.set_xlabel("meta-iteration (one training run each)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax1.set_title("Meta-objective (without the penalty)")
    ax2.set_title("Validation error")
    labels = ("no\naugmentation", "initial\nrandom A", "learned A")
    for j, (split, col) in enumerate((("validation", 1), ("test", 3))):
        means = [100 * res[f"eval_{k}"][:, col].mean() for k in ("none", "initial", "learned")]
        stds = [100 * res[f"eval_{k}"][:, col].std() for k in ("none", "initial", "learned")]
        ax3.bar(np.arange(3) + 0.38 * j - 0.19, means, 0.36, yerr=stds, capsize=3,
                color=f"C{j}", label=split)
    ax3.set_xticks(np.arange(3), labels, fontsize=9)
    ax3.set_ylabel("error (%), mean ± std over training runs")
    ax3.set_title(f"Final comparison ({none.shape[0]} training runs each)")
    lo = min(100 * res[f"eval_{k}"][:, c].mean() for k in ("none", "initial", "learned")
             for c in (1, 3))
    ax3.set_ylim(bottom=max(0.0, lo - 4))
    ax3.legend(fontsize=8)
    ax3.grid(alpha=0.3, axis="y")
    fig.suptitle(f"Learning the augmentation ({cfg.get('learner', 'logistic')} learner, "
                 f"{cfg.get('n_train')} training images)")
    paths.append(out / "meta_curves.png")
    save_figure(fig, paths[-1], dpi=110)
    return paths


EXPERIMENT = register(Experiment(
    name="augmentation",
    description="Learn a local data augmentation y = expm(tA) x (A on adjacent pixels) by "
                "hypergradient through training on the augmented images.",
    Config=Config, smoke=SMOKE, run=run, plot=plot))
