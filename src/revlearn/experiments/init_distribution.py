"""Learned initial weight distributions: one piecewise-linear inverse CDF per
layer and per parameter type, learned by hypergradient descent through exactly
reversible SGD.

Distribution of group g (e.g. the weights of layer 0), with K bins of equal
probability 1/K, a reference scale s_g (1/sqrt(fan-in) for weights,
`bias_scale` for biases) and unconstrained hyperparameters (`offset` c_g,
`log_width` l_g [K]):

    knots     q_k = c_g + sum_{j<k} exp(l_g,j) - sum_{j<K/2} exp(l_g,j)   (k = 0 .. K)
    F^-1(u)   = s_g * (q_k + (u K - k) exp(l_g,k)),   k = floor(u K)
    density   p(w) = 1 / (K s_g exp(l_g,k))   for w in s_g [q_k, q_{k+1})

F^-1 is monotone (every width is positive) and differentiable in (c_g, l_g) at
fixed u; the offset c_g is the knot q_{K//2} (the median for even K), so
widening a bin moves only the knots on its side of the median. At
meta-iteration i every initial weight is w0_j = F_g^-1(u_j), u_j ~ U(0, 1) drawn
from key_i = iteration_key(seed, i), and training runs T steps of

    v_{t+1} = gamma v_t - (1 - gamma) grad NLL(w_t; batch_t),   w_{t+1} = w_t + alpha v_{t+1}

The meta-objective is f = NLL(w_T) on the whole training set (`objective="valid"`:
the validation set); df/dw0 comes from `revlearn.sgd(..., method=Reversible())`,
df/d(c_g, l_g) = sum_j df/dw0_j dF^-1(u_j)/d(c_g, l_g), and Adam takes the
meta-step, decayed from meta_lr to meta_lr * meta_lr_end along a cosine.

Initial hyperparameters: q_k = Phi^-1(0.005 + 0.99 k / K), the quantiles of a
standard normal truncated to its central 99%, i.e. w0 ~ s_g N(0, 1) approximately.
Roughness of a density: sqrt(mean_k (l_{k+1} - 2 l_k + l_{k-1})^2) over the inner bins.
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
from matplotlib import patheffects
from matplotlib.ticker import MaxNLocator

import revlearn
from revlearn import models
from revlearn.meta import RunDir, iteration_key, meta_optimize

from . import _plots
from ._config import MnistConfig
from ._float import float_train
from ._registry import Experiment
from ._splits import evaluate, mnist_splits
from ._validate import at_least, at_most, check_clip, check_decay, check_pool, check_range, positive

__all__ = ["Config", "run", "plot", "quantile", "density", "roughness", "initial_hypers",
           "sample_params", "meta_objective", "EXPERIMENT"]

TAIL = 0.005  # the initial knots span the central 1 - 2 * TAIL of a normal
SPLITS, TAGS = ("train", "valid"), ("initial", "learned")
TYPES = {"w": "weights", "b": "biases"}


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
        at_most(self, "batch_size", "n_train")
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

    def scales(self) -> list[dict]:
        """The reference scale s_g of each layer's weights and biases."""
        return [{"w": 1.0 / math.sqrt(n_in), "b": self.bias_scale} for n_in in self.sizes[:-1]]


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
    edges = np.asarray(quantile(jnp.linspace(0.0, 1.0, len(log_width) + 1), offset,
                                jnp.asarray(log_width), scale))
    return edges, 1.0 / (len(log_width) * np.diff(edges))


def roughness(log_width) -> float:
    """RMS second difference of the log bin widths over the inner bins (0.063 at the start)."""
    lw = np.asarray(log_width, np.float64)[1:-1]
    return float(np.sqrt(np.mean(np.diff(lw, 2) ** 2))) if lw.size > 2 else 0.0


def initial_hypers(sizes, n_bins: int) -> list[dict]:
    """One {"offset", "log_width"} per layer and type, knots at normal quantiles."""
    u = TAIL + (1 - 2 * TAIL) * np.arange(n_bins + 1) / n_bins
    q = np.asarray(jax.scipy.special.ndtri(jnp.asarray(u, jnp.float64)))
    one = {"offset": jnp.asarray(q[n_bins // 2], jnp.float64),
           "log_width": jnp.asarray(np.log(np.diff(q)), jnp.float64)}
    return [{"w": dict(one), "b": dict(one)} for _ in range(len(sizes) - 1)]


def sample_params(theta, key, static: Config) -> list[dict]:
    """w0 = F^-1(u; theta) per layer and type, u ~ U(0, 1) from `key`."""
    sizes, out = static.sizes, []
    for k, n_in, n_out, th, s in zip(jax.random.split(key, len(sizes) - 1), sizes[:-1],
                                     sizes[1:], theta, static.scales()):
        kw, kb = jax.random.split(k)
        u = {"w": jax.random.uniform(kw, (n_in, n_out), jnp.float64),
             "b": jax.random.uniform(kb, (n_out,), jnp.float64)}
        out.append({t: quantile(u[t], th[t]["offset"], th[t]["log_width"], s[t]) for t in "wb"})
    return out


def _train_loss(params, h, step, *, batch_size):
    xb, yb = models.minibatch(h["x"], h["y"], batch_size, step, h["key"])
    return models.nll(models.mlp_apply(params, xb), yb)


def meta_objective_of_params0(params0, key, data, static: Config, method=None):
    """(f(w_T), metrics): train from params0 with the minibatch order of `key`."""
    x, y = data["train"]
    w = revlearn.sgd(functools.partial(_train_loss, batch_size=static.batch_size), params0,
                     {"key": key, "x": x, "y": y}, lr=static.lr, momentum=static.momentum,
                     steps=static.steps, method=method or revlearn.Reversible())
    metrics = evaluate(models.mlp_apply, w, data, SPLITS)
    return metrics[f"{static.objective}_loss"], metrics


def meta_objective(theta, key, data, static: Config, method=None):
    """(f, metrics) for the distribution theta; `key` picks both the draw and the order."""
    k_init, k_batch = jax.random.split(key)
    return meta_objective_of_params0(sample_params(theta, k_init, static), k_batch, data,
                                     static, method)


@functools.partial(jax.jit, static_argnames="static")
def _hypergrad(theta, key, data, static: Config):
    """(f, df/dtheta, metrics, w0, df/dw0) for the draw and order of `key`: df/dtheta is
    the chain rule through F^-1 applied to the gradient w.r.t. each initial weight."""
    k_init, k_batch = jax.random.split(key)
    w0, pullback = jax.vjp(lambda th: sample_params(th, k_init, static), theta)
    (loss, metrics), g_w0 = jax.value_and_grad(meta_objective_of_params0, has_aux=True)(
        w0, k_batch, data, static)
    return loss, pullback(g_w0)[0], metrics, w0, g_w0


@functools.partial(jax.jit, static_argnames="static")
def _curve(theta, key, data, static: Config):
    """(training loss on the whole training set after 0 .. T steps, final metrics) for
    one draw and minibatch order."""
    k_init, k_batch = jax.random.split(key)
    x, y = data["train"]
    w, losses = float_train(
        revlearn.optim.momentum(static.lr, static.momentum),
        functools.partial(_train_loss, batch_size=static.batch_size),
        sample_params(theta, k_init, static), {"key": k_batch, "x": x, "y": y},
        steps=static.steps, record=lambda w, state, t: models.nll(models.mlp_apply(w, x), y))
    return losses, evaluate(models.mlp_apply, w, data, SPLITS)


# -- run and plot --------------------------------------------------------------

def _groups(config: Config) -> list[tuple[int, str]]:
    return [(l, t) for l in range(len(config.sizes) - 1) for t in TYPES]


def run(config: Config, run_dir: RunDir) -> dict:
    t0 = time.perf_counter()
    data = mnist_splits(config, *SPLITS)
    static = config.program()
    theta0 = initial_hypers(config.sizes, config.n_bins)
    step_size = optax.cosine_decay_schedule(config.meta_lr, max(1, config.meta_iterations),
                                            alpha=config.meta_lr_end)
    result = meta_optimize(
        lambda th, i: _hypergrad(th, iteration_key(config.seed, i), data, static)[:3], theta0,
        optax.adam(step_size), config.meta_iterations, run_dir, clip=config.clip,
        progress_metric="meta_loss", description="init-distribution")
    run_dir.save_arrays("hypers_final", result.hypers)

    # Evaluation on draws and minibatch orders never used in meta-training.
    n, res = config.meta_iterations, {}
    keys = [iteration_key(config.seed, n + 1 + j) for j in range(config.n_curve_draws)]
    for tag, th in zip(TAGS, (theta0, result.hypers)):
        curves, finals = zip(*(jax.device_get(_curve(th, k, data, static)) for k in keys))
        w0, grad = _hypergrad(th, iteration_key(config.seed, n), data, static)[3:]
        res[tag] = {"curves": np.stack(curves), "theta": th, "w0": w0, "grad": grad,
                    **{m: np.array([f[m] for f in finals]) for m in finals[0]}}
    run_dir.save_arrays("results", res)

    summary = {"model": config.model, "meta_iterations": n}
    summary.update({f"{m}_{tag}": float(np.mean(res[tag][m])) for tag in TAGS
                    for m in ("train_loss", "valid_loss", "train_error", "valid_error")})
    for l, t in _groups(config):
        summary.update({f"std_{tag}_layer{l}_{t}": float(np.std(res[tag]["w0"][l][t]))
                        for tag in TAGS})
        summary[f"roughness_learned_layer{l}_{t}"] = roughness(
            res["learned"]["theta"][l][t]["log_width"])
    summary["wall_time_s"] = time.perf_counter() - t0
    plot(run_dir.path)
    return summary


def _panels(config: Config):
    """(figure, [(axis, layer, type)]): one row per layer, weights left, biases right."""
    rows = len(config.sizes) - 1
    fig, axes = _plots.figure(2, rows, width=10, height=3.3 * rows + 1)
    return fig, [(ax, l, t) for ax, (l, t) in zip(np.ravel(axes), _groups(config))]


@_plots.styled
def plot(path) -> list[Path]:
    """Re-render the figures from results.npz and metrics.jsonl."""
    run = _plots.saved(path, "results")
    res, out, paths, config = run.arrays["results"], run.run.figures, [], Config(**run.config)
    net = ("one-layer model (logistic regression)" if config.model == "logistic"
           else f"MLP 784-{config.hidden}-10")
    get = lambda tag, what, l, t: np.ravel(res[f"{tag}/{what}/{l}/{t}"])  # noqa: E731

    # 1. learned densities beside the histograms of sampled weights
    fig, panels = _panels(config)
    for ax, l, t in panels:
        w = get("learned", "w0", l, t)
        ax.hist(w, bins=min(60, max(8, int(np.sqrt(w.size)))), density=True, color="C0",
                alpha=0.35, label="histogram of one draw from the learned distribution")
        for tag, style in zip(TAGS, ({"color": "0.35", "ls": "--", "lw": 1.3},
                                     {"color": "C0", "lw": 1.8})):
            edges, heights = density(get(tag, "theta", l, f"{t}/offset")[0],
                                     get(tag, "theta", l, f"{t}/log_width"),
                                     config.scales()[l][t])
            ax.stairs(heights, edges, label=f"{tag} density", **style)
        per = w.size / config.n_bins
        per = f"{per:,.0f}" if per >= 10 else f"{per:.2g}"
        ax.set_title(f"layer {l} {TYPES[t]}: {w.size:,} values, {per} per bin")
        ax.set(xlabel="initial value $w_0$", ylabel="probability density")
    fig.legend(*panels[0][0].get_legend_handles_labels(), loc="outside lower center", ncols=3)
    fig.suptitle(f"Initial-weight distributions of the {net}, "
                 f"{config.meta_iterations} meta-iterations")
    _plots.save(fig, out, "densities", paths)

    # 2. learning curves before and after
    fig, ax = _plots.figure(width=7, height=4.3)
    for tag, color, ls in zip(TAGS, ("0.35", "C0"), ("--", "-")):
        c = res[f"{tag}/curves"]
        t = np.arange(c.shape[1])
        ax.plot(t, c.mean(0), ls, color=color, lw=2,
                label=f"{tag} distribution (mean of {c.shape[0]} draws)")
        ax.fill_between(t, c.min(0), c.max(0), color=color, alpha=0.2)
    _plots.plain_log(ax)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(0, c.shape[1] - 1)
    ax.set(xlabel="SGD step t", ylabel="training loss (mean NLL, all training examples)",
           title="Training from initial weights drawn from each distribution\n"
                 "(draws and minibatch orders unseen in meta-training; band: min to max)")
    ax.legend()
    _plots.save(fig, out, "learning_curves", paths)

    # 3. hypergradient w.r.t. each initial weight against its magnitude
    fig, panels = _panels(config)
    rng = np.random.default_rng(0)
    halo = [patheffects.withStroke(linewidth=4, foreground="w")]
    for ax, l, t in panels:
        points = []  # (|w0|, signed gradient, colour) of both distributions, mixed below
        for tag, color, line in zip(TAGS, ("C7", "C1"), ("k", "C3")):
            w, d = get(tag, "w0", l, t), get(tag, "grad", l, t)
            r = np.sign(w) * d  # > 0: the meta-objective wants |w0| smaller
            idx = rng.permutation(w.size)[:4000]
            points += [(np.abs(w[i]), r[i], color) for i in idx]
            corr = np.corrcoef(np.abs(w), r)[0, 1] if w.size > 2 else np.nan
            ax.scatter([], [], s=12, color=color, label=f"{tag} (correlation {corr:+.2f})")
            if w.size >= 200:  # means over 12 bins of equal count
                bins = np.array_split(np.argsort(np.abs(w)), 12)
                ax.plot([np.abs(w)[i].mean() for i in bins], [r[i].mean() for i in bins],
                        color=line, lw=2, zorder=3, path_effects=halo,
                        label=f"{tag}: mean in 12 bins of $|w_0|$")
        mag, rad, colors = zip(*(points[i] for i in rng.permutation(len(points))))
        big = len(points) > 200
        ax.scatter(mag, rad, c=colors, s=4 if big else 14,
                   alpha=0.4 if big else 0.8, lw=0, zorder=2)
        ax.axhline(0, color="k", lw=0.6)
        ax.set(xlabel="magnitude of the initial value $|w_0|$",
               ylabel=r"sign$(w_0)\,\partial f / \partial w_0$", title=f"layer {l} {TYPES[t]}")
        ax.legend(fontsize=7)
    fig.suptitle("Hypergradient with respect to each initial weight, > 0: 'shrink this weight'"
                 "\n(one draw of each distribution; at most 4,000 points each)")
    _plots.save(fig, out, "hypergradient_scatter", paths)

    # 4. meta-learning curve
    fig, ax = _plots.figure(width=7, height=4)
    it, f = (np.array([m[k] for m in run.metrics]) for k in ("iteration", "meta_loss"))
    ax.plot(it, f, color="C0", alpha=0.35, lw=0.8, label="each meta-iteration (fresh draw)")
    if (k := len(f) // 20) > 1:
        ax.plot(it[k - 1:], np.convolve(f, np.ones(k) / k, mode="valid"), color="C0", lw=2,
                label=f"running mean of {k}")
    ax.legend()
    ax.set(xlabel="meta-iteration", title=f"Meta-learning curve, {net}",
           ylabel=f"meta-objective: final {_plots.SPLIT_NAMES[config.objective]} loss (nats)")
    _plots.save(fig, out, "meta_curve", paths)
    return paths


EXPERIMENT = Experiment(
    "init-distribution", "Learn a piecewise-linear initial-weight distribution per layer and "
    "type ([784, 50, 10], 20 steps).", Config, SMOKE, run, plot)
