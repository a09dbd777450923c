"""Learned initial weight distributions: one piecewise-linear inverse CDF per
layer and per parameter type, learned by hypergradient descent through exactly
reversible SGD (lab notebook: "see if we can optimize the initial distribution
of weights. Look at gradient wrt individual weights as a function of their
magnitude").

Distribution of group g (e.g. the weights of layer 0), with K bins of equal
probability 1/K, a reference scale s_g (1/sqrt(fan-in) for weights,
`bias_scale` for biases) and unconstrained hyperparameters (`offset` c_g,
`log_width` l_g [K]):

    knots     q_k = c_g + sum_{j<k} exp(l_g,j) - sum_{j<K/2} exp(l_g,j)   (k = 0 .. K)
    F^-1(u)   = s_g * (q_k + (u K - k) exp(l_g,k)),   k = floor(u K)
    density   p(w) = 1 / (K s_g exp(l_g,k))   for w in s_g [q_k, q_{k+1})

The inverse CDF is monotone by construction (every width is positive) and is
differentiable in (c_g, l_g) at fixed u. The offset c_g is the knot q_{K//2}
(the median for even K), so widening a bin moves only the knots on its side of the median:
with the lowest knot as the offset instead, widening any bin would shift the
mean too, and for the output layer, whose mean is a symmetry of the loss
(adding a constant to every output weight adds the same number to every
logit), nothing would pull the mean back. At meta-iteration i every initial
weight is w0_j = F_g^-1(u_j) with fresh u_j ~ U(0, 1) drawn from
key_i = iteration_key(seed, i) (reparameterisation), training runs T steps of

    v_{t+1} = gamma v_t - (1 - gamma) grad NLL(w_t; batch_t),   w_{t+1} = w_t + alpha v_{t+1}

and the meta-objective f = NLL(w_T) on the whole training set (or the
validation set, `objective="valid"`). Its gradient w.r.t. params0 comes from
`revlearn.sgd(..., method=Reversible())`; the chain rule through F^-1 gives
the gradient w.r.t. (c_g, l_g), and Adam (optax) takes the meta-step, its step
size decayed from meta_lr to meta_lr * meta_lr_end along a cosine (the
gradients of fresh draws are noisy, and Adam's normalisation turns noise into
full-size steps).

The initial hyperparameters place the knots at the quantiles of a standard
normal truncated to its central 99% (q_k = Phi^-1(0.005 + 0.99 k / K)), i.e.
w0 ~ s_g N(0, 1) approximately.
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

from ._float import float_train
from ._registry import Experiment, register
from ._config import MnistConfig
from ._validate import (
    at_least,
    check_clip,
    check_decay,
    check_pool,
    check_range,
    fail,
    positive,
)

__all__ = ["Config", "run", "plot", "quantile", "density", "roughness", "initial_hypers",
           "EXPERIMENT"]

TAIL = 0.005  # the initial knots span the central 1 - 2 * TAIL of a normal


@dataclasses.dataclass(frozen=True)
class Config(MnistConfig):
    """Settings (the original's [784, 50, 10] net, 1,000 examples, 20 steps, batch 250)."""

    model: Literal["mlp", "logistic"] = "mlp"  # logistic: the one-layer variant [784, 10]
    hidden: int = 50
    n_train: int = 1000
    n_valid: int = 1000
    batch_size: int = 250
    steps: int = 20
    lr: float = 1.0
    momentum: float = 0.9
    n_bins: int = 20
    bias_scale: float = 0.1  # reference scale of the biases (weights: 1/sqrt(fan-in))
    objective: Literal["train", "valid"] = "train"
    meta_lr: float = 0.02
    meta_lr_end: float = 0.1  # cosine decay of the meta-step to this fraction of meta_lr
    meta_iterations: int = 200
    clip: float | None = None
    n_curve_draws: int = 5  # fresh draws for the before/after learning curves

    def check(self):
        at_least(self, 1, "hidden", "n_train", "n_valid", "batch_size", "steps", "n_bins",
                 "n_curve_draws")
        if self.batch_size > self.n_train:
            fail("batch_size", self.batch_size, f"exceeds n_train={self.n_train}",
                 "pass batch_size <= n_train")
        check_pool(self, "n_train", "n_valid")
        check_decay("momentum", self.momentum)
        positive(self, "lr", "bias_scale", "meta_lr")
        check_range("meta_lr_end", self.meta_lr_end, 0, 1,
                    fix="pass the final fraction of meta_lr, e.g. meta_lr_end=0.1 (the default)")
        at_least(self, 0, "meta_iterations")
        check_clip(self)

    @property
    def sizes(self) -> tuple[int, ...]:
        return (784, 10) if self.model == "logistic" else (784, self.hidden, 10)


# One layer keeps the compile time (most of a smoke run) low; the tests cover the MLP.
SMOKE = Config(model="logistic", n_train=200, n_valid=200, batch_size=50, steps=5, n_bins=8,
               meta_iterations=3, n_curve_draws=2)


# -- the distribution ------------------------------------------------------------

def quantile(u, offset, log_width, scale=1.0):
    """F^-1(u) of the piecewise-linear inverse CDF (module docstring), elementwise in u."""
    n_bins = log_width.shape[-1]
    width = jnp.exp(log_width)
    cum = jnp.concatenate([jnp.zeros((1,), width.dtype), jnp.cumsum(width)])
    knots = offset + cum - cum[n_bins // 2]
    pos = u * n_bins
    k = jnp.clip(jnp.floor(pos).astype(jnp.int32), 0, n_bins - 1)
    return scale * (knots[k] + (pos - k) * width[k])


def density(offset, log_width, scale=1.0):
    """(edges [K + 1], heights [K]): the piecewise-constant density of F."""
    width = np.exp(np.asarray(log_width, np.float64))
    cum = np.concatenate([[0.0], np.cumsum(width)])
    edges = scale * (float(offset) + cum - cum[len(width) // 2])
    return edges, 1.0 / (len(width) * scale * width)


def roughness(log_width) -> float:
    """How jagged a learned density is: the root mean square second difference of the
    log bin widths (= of the log density) over the inner bins (0.063 at the start)."""
    lw = np.asarray(log_width, np.float64)[1:-1]
    return float(np.sqrt(np.mean(np.diff(lw, 2) ** 2))) if lw.size > 2 else 0.0


def _normal_knots(n_bins: int) -> np.ndarray:
    u = TAIL + (1 - 2 * TAIL) * np.arange(n_bins + 1) / n_bins
    return np.asarray(jax.scipy.special.ndtri(jnp.asarray(u, jnp.float64)))


def initial_hypers(sizes, n_bins: int) -> list[dict]:
    """One {"offset", "log_width"} per layer and type, knots at normal quantiles."""
    q = _normal_knots(n_bins)
    one = {"offset": jnp.asarray(q[n_bins // 2], jnp.float64),
           "log_width": jnp.asarray(np.log(np.diff(q)), jnp.float64)}
    return [{"w": dict(one), "b": dict(one)} for _ in range(len(sizes) - 1)]


class _Static(NamedTuple):
    """Settings that fix the compiled programs (a hashable jit static argument)."""

    sizes: tuple
    steps: int
    batch_size: int
    lr: float
    momentum: float
    bias_scale: float
    objective: str

    @classmethod
    def of(cls, c: Config) -> _Static:
        return cls(c.sizes, c.steps, c.batch_size, c.lr, c.momentum, c.bias_scale, c.objective)

    def scales(self) -> list[dict]:
        return [{"w": 1.0 / math.sqrt(n_in), "b": self.bias_scale} for n_in in self.sizes[:-1]]


def _uniforms(key, sizes) -> list[dict]:
    keys = jax.random.split(key, len(sizes) - 1)
    out = []
    for k, n_in, n_out in zip(keys, sizes[:-1], sizes[1:]):
        kw, kb = jax.random.split(k)
        out.append({"w": jax.random.uniform(kw, (n_in, n_out), jnp.float64),
                    "b": jax.random.uniform(kb, (n_out,), jnp.float64)})
    return out


def sample_params(theta, key, static: _Static) -> list[dict]:
    """w0 = F^-1(u; theta) per layer and type, u ~ U(0, 1) from `key`."""
    u = _uniforms(key, static.sizes)
    return [{t: quantile(u[l][t], theta[l][t]["offset"], theta[l][t]["log_width"], s[t])
             for t in ("w", "b")} for l, s in enumerate(static.scales())]


def _train_loss(params, h, step, *, batch_size):
    xb, yb = models.minibatch(h["x"], h["y"], batch_size, step, h["key"])
    return models.nll(models.mlp_apply(params, xb), yb)


def _evaluate(params, data) -> dict:
    out = {}
    for name in ("train", "valid"):
        x, y = data[name]
        logp = models.mlp_apply(params, x)
        out[f"{name}_loss"] = models.nll(logp, y)
        out[f"{name}_error"] = models.error_rate(logp, y)
    return out


def _train(params0, key, data, static: _Static, method):
    x, y = data["train"]
    return revlearn.sgd(functools.partial(_train_loss, batch_size=static.batch_size), params0,
                        {"key": key, "x": x, "y": y}, lr=static.lr, momentum=static.momentum,
                        steps=static.steps, method=method)


def meta_objective_of_params0(params0, key, data, static: _Static, method=None):
    """(f(w_T), metrics): train from params0 with the minibatch order of `key`."""
    method = method or revlearn.Reversible()
    metrics = _evaluate(_train(params0, key, data, static, method), data)
    return metrics[f"{static.objective}_loss"], metrics


def meta_objective(theta, key, data, static: _Static, method=None):
    """(f, metrics) for the distribution theta; `key` picks both the draw and the order."""
    k_init, k_batch = jax.random.split(key)
    return meta_objective_of_params0(sample_params(theta, k_init, static), k_batch, data,
                                     static, method)


@functools.partial(jax.jit, static_argnames="static")
def _hypergrad(theta, key, data, static: _Static):
    """(f, d f / d theta, metrics, w0, d f / d w0) for the draw and order of `key`.

    The gradient w.r.t. theta is the chain rule through F^-1 applied to the
    gradient w.r.t. each individual initial weight (which is returned too)."""
    k_init, k_batch = jax.random.split(key)
    w0, pullback = jax.vjp(lambda th: sample_params(th, k_init, static), theta)
    (loss, metrics), g_w0 = jax.value_and_grad(meta_objective_of_params0, has_aux=True)(
        w0, k_batch, data, static)
    (g_theta,) = pullback(g_w0)
    return loss, g_theta, metrics, w0, g_w0


@functools.partial(jax.jit, static_argnames="static")
def _curve(theta, key, data, static: _Static):
    """(training loss on the whole training set at steps 0 .. T, final metrics) for one
    draw and minibatch order (the momentum rule's float step, as revlearn.sgd computes it
    up to rounding)."""
    k_init, k_batch = jax.random.split(key)
    w0 = sample_params(theta, k_init, static)
    x, y = data["train"]
    full = lambda w, state, t: models.nll(models.mlp_apply(w, x), y)  # noqa: E731
    w, losses = float_train(revlearn.optim.momentum(static.lr, static.momentum),
                            functools.partial(_train_loss, batch_size=static.batch_size), w0,
                            {"key": k_batch, "x": x, "y": y}, steps=static.steps, record=full)
    return losses, _evaluate(w, data)


# -- run and plot --------------------------------------------------------------

def _splits(config: Config):
    pool = rdata.load_mnist(config.data, config.data_dir)
    parts = rdata.split(pool, {"train": config.n_train, "valid": config.n_valid}, config.seed)
    return {k: (jnp.asarray(d.images, jnp.float64), jnp.asarray(d.onehot, jnp.float64))
            for k, d in parts.items()}


def _groups(sizes):
    return [(l, t) for l in range(len(sizes) - 1) for t in ("w", "b")]


def run(config: Config, run_dir: RunDir) -> dict:
    t0 = time.perf_counter()
    data = _splits(config)
    static = _Static.of(config)
    theta0 = initial_hypers(config.sizes, config.n_bins)

    def hypergrad_fn(theta, i):
        return _hypergrad(theta, iteration_key(config.seed, i), data, static)[:3]

    step_size = optax.cosine_decay_schedule(config.meta_lr, max(1, config.meta_iterations),
                                            alpha=config.meta_lr_end)
    result = meta_optimize(hypergrad_fn, theta0, optax.adam(step_size),
                           config.meta_iterations, run_dir, clip=config.clip,
                           progress_metric="meta_loss", description="init-distribution")
    theta = result.hypers
    run_dir.save_arrays("hypers_final", theta)

    # Evaluation on draws and minibatch orders never used in meta-training.
    n = config.meta_iterations
    keys = [iteration_key(config.seed, n + 1 + j) for j in range(config.n_curve_draws)]
    res = {}
    for tag, th in (("initial", theta0), ("learned", theta)):
        curves, finals = zip(*(jax.device_get(_curve(th, k, data, static)) for k in keys))
        res[f"curves_{tag}"] = np.stack(curves)
        res.update({f"{m}_{tag}": np.array([f[m] for f in finals]) for m in finals[0]})
        _, _, _, w0, g = _hypergrad(th, iteration_key(config.seed, n), data, static)
        for l, t in _groups(config.sizes):
            res[f"w0_{tag}_{l}{t}"] = np.asarray(w0[l][t]).ravel()
            res[f"grad_{tag}_{l}{t}"] = np.asarray(g[l][t]).ravel()
    scales = static.scales()
    for l, t in _groups(config.sizes):
        res[f"scale_{l}{t}"] = np.asarray(scales[l][t])
        for tag, th in (("initial", theta0), ("learned", theta)):
            res[f"offset_{tag}_{l}{t}"] = np.asarray(th[l][t]["offset"])
            res[f"log_width_{tag}_{l}{t}"] = np.asarray(th[l][t]["log_width"])
    run_dir.save_arrays("results", res)

    summary = {"model": config.model, "meta_iterations": n}
    for tag in ("initial", "learned"):
        for m in ("train_loss", "valid_loss", "train_error", "valid_error"):
            summary[f"{m}_{tag}"] = float(np.mean(res[f"{m}_{tag}"]))
    for l, t in _groups(config.sizes):
        for tag in ("initial", "learned"):
            w = res[f"w0_{tag}_{l}{t}"]
            summary[f"std_{tag}_layer{l}_{t}"] = float(np.std(w))
        summary[f"roughness_learned_layer{l}_{t}"] = roughness(res[f"log_width_learned_{l}{t}"])
    summary["wall_time_s"] = time.perf_counter() - t0
    plot(run_dir.path)
    return summary


_TYPE_NAME = {"w": "weights", "b": "biases"}


def plot(path) -> list[Path]:
    """Re-render the figures from results.npz and metrics.jsonl."""
    from matplotlib.figure import Figure

    rd = RunDir(Path(path))
    res = rd.load_arrays("results")
    metrics = rd.read_metrics()
    cfg = (rd.read_config() or {}).get("config", {})
    groups = sorted({k[len("scale_"):] for k in res if k.startswith("scale_")})
    n_layers = len({g[:-1] for g in groups})
    out = rd.figures
    paths = []
    title_net = ("one-layer model (logistic regression)" if cfg.get("model") == "logistic"
                 else "MLP " + "-".join(str(n) for n in
                                        (784, cfg.get("hidden", 50), 10)))
    n_it = cfg.get("meta_iterations", len(metrics))

    # 1. learned densities beside the histograms of sampled weights
    fig = Figure(figsize=(10, 3.2 * n_layers + 0.6), layout="constrained")
    axes = np.asarray(fig.subplots(n_layers, 2, squeeze=False))
    for l in range(n_layers):
        for j, t in enumerate(("w", "b")):
            ax, g = axes[l, j], f"{l}{t}"
            scale = float(res[f"scale_{g}"])
            w = res[f"w0_learned_{g}"]
            e1, h1 = density(res[f"offset_learned_{g}"], res[f"log_width_learned_{g}"], scale)
            e0, h0 = density(res[f"offset_initial_{g}"], res[f"log_width_initial_{g}"], scale)
            bins = min(60, max(8, int(np.sqrt(w.size))))
            ax.hist(w, bins=bins, density=True, color="C0", alpha=0.35,
                    label=f"histogram of {w.size} sampled values")
            ax.stairs(h1, e1, color="C0", lw=1.8, label="learned density")
            ax.stairs(h0, e0, color="0.4", ls="--", lw=1.2, label="initial density")
            ax.set_title(f"layer {l} {_TYPE_NAME[t]} ({w.size} values)")
            ax.set_xlabel("initial value $w_0$")
            ax.set_ylabel("probability density")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="upper right")
    fig.suptitle(f"Initial-weight distributions, {title_net}, {n_it} meta-iterations\n"
                 "and a histogram of one draw from the learned one")
    paths.append(out / "densities.png")
    save_figure(fig, paths[-1], dpi=110)

    # 2. learning curves before and after
    fig = Figure(figsize=(7, 4.3), layout="constrained")
    ax = fig.subplots()
    for tag, color, ls in (("initial", "0.4", "--"), ("learned", "C0", "-")):
        c = res[f"curves_{tag}"]
        t = np.arange(c.shape[1])
        m = c.mean(0)
        ax.plot(t, m, ls, color=color, lw=2,
                label=f"{tag} distribution (mean of {c.shape[0]} draws)")
        ax.fill_between(t, c.min(0), c.max(0), color=color, alpha=0.2)
    ax.set_yscale("log")
    ax.set_xlabel("SGD step t")
    ax.set_ylabel("training loss (mean NLL on all training examples, nats)")
    ax.set_title("Training with initial weights drawn from each distribution\n"
                 "(fresh draws and minibatch orders; band: min to max)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    paths.append(out / "learning_curves.png")
    save_figure(fig, paths[-1], dpi=110)

    # 3. hypergradient w.r.t. each initial weight against its magnitude
    fig = Figure(figsize=(10, 3.2 * n_layers + 0.6), layout="constrained")
    axes = np.asarray(fig.subplots(n_layers, 2, squeeze=False))
    rng = np.random.default_rng(0)
    for l in range(n_layers):
        for j, t in enumerate(("w", "b")):
            ax, g = axes[l, j], f"{l}{t}"
            for tag, color, marker in (("initial", "0.45", "o"), ("learned", "C1", "o")):
                w, d = res[f"w0_{tag}_{g}"], res[f"grad_{tag}_{g}"]
                radial = np.sign(w) * d  # > 0: the meta-objective wants |w0| smaller
                idx = rng.permutation(w.size)[:4000]
                corr = np.corrcoef(np.abs(w), radial)[0, 1] if w.size > 2 else np.nan
                ax.scatter(np.abs(w[idx]), radial[idx], s=4 if w.size > 100 else 12,
                           alpha=0.35 if w.size > 100 else 0.8, color=color, lw=0,
                           label=f"{tag} distribution (correlation {corr:+.2f})")
                if w.size >= 200:  # binned means
                    edges = np.quantile(np.abs(w), np.linspace(0, 1, 13))
                    which = np.clip(np.searchsorted(edges, np.abs(w), side="right") - 1, 0, 11)
                    centre = [np.abs(w)[which == k].mean() for k in range(12)]
                    mean = [radial[which == k].mean() for k in range(12)]
                    ax.plot(centre, mean, "-", color="k" if tag == "initial" else "C3", lw=1.8,
                            label=f"{tag}: mean in 12 bins of |w0|")
            ax.axhline(0, color="k", lw=0.6)
            ax.set_xlabel("magnitude of the initial value $|w_0|$")
            ax.set_ylabel(r"sign$(w_0)\,\partial f / \partial w_0$ (nats per unit)")
            ax.set_title(f"layer {l} {_TYPE_NAME[t]}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, markerscale=2.5)
    fig.suptitle("Hypergradient of the meta-objective with respect to each initial weight\n"
                 "signed so that > 0 means 'shrink this weight' (one draw; at most 4,000 "
                 "points per panel)")
    paths.append(out / "hypergradient_scatter.png")
    save_figure(fig, paths[-1], dpi=110)

    # 4. meta-learning curve
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    if metrics:
        it = np.array([m["iteration"] for m in metrics])
        f = np.array([m["meta_loss"] for m in metrics])
        ax.plot(it, f, color="C0", alpha=0.35, lw=0.8, label="each meta-iteration (fresh draw)")
        w = max(1, len(f) // 20)
        if len(f) >= w > 1:
            sm = np.convolve(f, np.ones(w) / w, mode="valid")
            ax.plot(it[w - 1:], sm, color="C0", lw=2, label=f"running mean of {w}")
        ax.legend()
    obj = "validation" if cfg.get("objective") == "valid" else "training"
    ax.set_xlabel("meta-iteration")
    ax.set_ylabel(f"meta-objective: final {obj} loss (nats)")
    ax.set_title("Meta-learning curve")
    ax.grid(alpha=0.3)
    paths.append(out / "meta_curve.png")
    save_figure(fig, paths[-1], dpi=110)
    return paths


EXPERIMENT = register(Experiment(
    name="init-distribution",
    description="Learn a piecewise-linear initial-weight distribution per layer and type "
                "([784, 50, 10], 20 steps).",
    Config=Config, smoke=SMOKE, run=run, plot=plot))
