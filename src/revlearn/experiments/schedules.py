"""Learning-rate and momentum schedules and initial scales (paper figures 2-5): per
step, per layer and per parameter type, learned by hypergradient descent through
exactly reversible SGD with momentum (`schedules`) or Adam (`adam-schedules`).

Model: tanh MLP `sizes` (784-50-50-50-10), layers l = 0 .. L-1, types tau in
{w, b}; inputs x = pixel / 255, minus the training set's mean image (`center`).
Hyperparameters, stored unconstrained (1,608 for the default net and T = 100:
2 x 4 x 2 x 100 + 8):

    log_lr[l][tau]          [T]  alpha_{t,l,tau} = exp(.)
    logit_momentum[l][tau]  [T]  gamma_{t,l,tau} = sigmoid(.)   in [min_decay, 1 - 2^-12]
      (Adam: logit_b1[l][tau] [T], beta1_{t,l,tau} = sigmoid(.)  in [min_decay, 1 - 2^-12])
    log_scale[l][tau]       ()   s_{l,tau} = exp(.)

Meta-iteration i draws key_i = iteration_key(seed, i) and, for each of the K keys
k of split(key_i, K) (K = n_average), an initial draw and a minibatch order:

    w_0 = s_{l,tau} * N(0, I)
    v_{t+1} = gamma_t v_t - (1 - gamma_t) grad NLL(w_t; batch_t),  w_{t+1} = w_t + alpha_t v_{t+1}
      (Adam: revlearn.optim.adam(alpha_t, beta1_t, b2, eps))
    f_k = NLL(w_T; training set)
    g_i = (1/K) sum_k grad_theta f_k      (revlearn.train, Reversible(min_decay=min_decay / 2))

and Adam (optax, step meta_lr), then a projection of the logit decay into
[logit(min_decay), logit(1 - 2^-12)], updates theta. Stopping rule
(`stop_on_chaos`): meta-training stops at the first i with
||g_i|| > 10 median(||g_{i-10}||, .., ||g_{i-1}||) (`revlearn.meta.is_chaotic`,
the meta-loop's chaos detector) and keeps theta_i.

Recorded: g_0 per step (the mean over the K seeds and the mean of its square), the
scales s_{l,tau} at every meta-iteration, and the training loss per step from theta_0
and from the learned theta on a key never used in meta-training (`_float.float_train`).
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
import optax

import revlearn
from revlearn import models, spaces
from revlearn.meta import (ChaosWarning, RunDir, average_over, is_chaotic, iteration_key,
                           meta_optimize)

from . import _plots
from ._config import MnistConfig
from ._float import float_train
from ._registry import Experiment, register
from ._splits import evaluate, mnist_splits
from ._validate import at_least, check_clip, check_decay, check_pool, check_range, fail, positive

__all__ = ["Config", "AdamConfig", "run", "plot", "initial_hypers", "keep_logit_in",
           "EXPERIMENT", "ADAM_EXPERIMENT"]

MAX_DECAY = 1.0 - 2.0**-12
_AT_ONCE = 25  # seeds vmapped together; more are mapped over in chunks of this many


@dataclasses.dataclass(frozen=True)
class Config(MnistConfig):
    """The paper's run: 100 steps from alpha = e^-1, gamma = 0.5 and scale e^-3, 50
    meta-iterations of Adam 0.04; `n_average` seeds (initial draw and minibatch order)
    per meta-gradient."""

    sizes: tuple[int, ...] = (784, 50, 50, 50, 10)
    steps: int = 100
    meta_iterations: int = 50
    n_average: int = 1
    n_train: int = 10000
    batch_size: int = 200
    center: bool = True
    init_log_lr: float = -1.0
    init_decay: float = 0.5  # the momentum gamma (Adam: beta1) at the start
    min_decay: float = 0.1
    init_log_scale: float = -3.0
    b2: float = 0.999  # Adam only
    eps: float = 1e-8  # Adam only
    meta_lr: float = 0.04
    clip: float | None = None
    stop_on_chaos: bool = True

    DECAY = "momentum"  # (not fields) the learned decay and its grid
    GRID = revlearn.optim.MOMENTUM

    def check(self):
        if len(self.sizes) < 2 or (self.sizes[0], self.sizes[-1]) != (784, 10) or min(
                self.sizes) < 1:
            fail("sizes", self.sizes, "must run from 784 to 10 through layer sizes >= 1",
                 "pass e.g. sizes=784,50,50,50,10")
        at_least(self, 1, "steps", "n_average")
        at_least(self, 0, "meta_iterations")
        check_range("batch_size", self.batch_size, 1, self.n_train,
                    fix=f"pass batch_size <= n_train={self.n_train}")
        check_pool(self, "n_train")
        check_range("min_decay", self.min_decay, 2 * self.GRID.smallest(), MAX_DECAY,
                    hi_open=True, fix="pass e.g. min_decay=0.1 (the buffer is sized for decays "
                    f">= min_decay / 2, on the decay's grid n/2^{self.GRID.bits})")
        check_decay("init_decay", self.init_decay, self.GRID, example=0.5)
        check_range("init_decay", self.init_decay, self.min_decay, MAX_DECAY, lo_open=True,
                    hi_open=True, fix="raise init_decay or lower min_decay")
        check_decay("b2", self.b2, revlearn.optim.FINE, example=0.999)
        positive(self, "eps", "meta_lr")
        check_clip(self)

    def rule(self, h, params0):
        """The inner optimiser with the constrained schedules h ([T] leaves), per params leaf."""
        per_leaf = lambda s: [{t: a[t].reshape(a[t].shape + (1,) * p[t].ndim) for t in a}  # noqa: E731
                              for a, p in zip(s, params0)]
        if self.DECAY == "b1":
            return revlearn.optim.adam(per_leaf(h["lr"]), b1=per_leaf(h["b1"]), b2=self.b2,
                                       eps=self.eps)
        return revlearn.optim.momentum(per_leaf(h["lr"]), per_leaf(h["momentum"]))


@dataclasses.dataclass(frozen=True)
class AdamConfig(Config):
    """`adam-schedules`: from Adam's usual alpha = 1e-3 and beta1 = 0.9 (b2, eps fixed)."""

    init_log_lr: float = math.log(1e-3)
    init_decay: float = 0.9

    DECAY = "b1"
    GRID = revlearn.optim.FINE


# One layer keeps the compile time (most of a smoke run) low; the tests cover hidden layers.
_SMOKE = dict(sizes=(784, 10), steps=6, meta_iterations=2, n_average=2, n_train=400,
              batch_size=50)
SMOKE, ADAM_SMOKE = Config(**_SMOKE), AdamConfig(**_SMOKE)


def initial_hypers(c: Config) -> dict:
    """The unconstrained hyperparameters: constant schedules and scales."""
    per_layer = lambda v, shape: [{t: jnp.full(shape, v, jnp.float64) for t in "wb"}  # noqa: E731
                                  for _ in c.sizes[1:]]
    return spaces.unconstrain({"lr": per_layer(math.exp(c.init_log_lr), (c.steps,)),
                               c.DECAY: per_layer(c.init_decay, (c.steps,)),
                               "scale": per_layer(math.exp(c.init_log_scale), ())},
                              {"lr": "log", c.DECAY: "logit", "scale": "log"})


def keep_logit_in(name: str, lo: float, hi: float) -> optax.GradientTransformation:
    """An optax step after the optimiser that projects theta[name] (a logit) back into
    [logit(lo), logit(hi)] (the update becomes clip(theta + u) - theta)."""
    a, b = math.log(lo) - math.log1p(-lo), math.log(hi) - math.log1p(-hi)

    def update(updates, state, params):
        return {**updates, name: jax.tree_util.tree_map(
            lambda u, p: jnp.clip(p + u, a, b) - p, updates[name], params[name])}, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


# -- the problem -----------------------------------------------------------------

def _data(c: Config) -> dict:
    x, y = mnist_splits(c, "train")["train"]
    return {"train": (x - jnp.mean(x, axis=0) if c.center else x, y)}


def _train_loss(params, h, step, *, batch_size):
    xb, yb = models.minibatch(h["x"], h["y"], batch_size, step, h["key"])
    return models.nll(models.mlp_apply(params, xb), yb)


def _start(theta, key, data, static: Config):
    """(the inner rule, w_0, the training loss, its inputs) of the seed `key`."""
    h = spaces.constrain(theta)
    k_init, k_batch = jax.random.split(key)
    w0 = models.mlp_init(k_init, static.sizes, scale=[(s["w"], s["b"]) for s in h["scale"]],
                         dtype=jnp.float64)
    return (static.rule(h, w0), w0, functools.partial(_train_loss, batch_size=static.batch_size),
            {"key": k_batch, "x": data["train"][0], "y": data["train"][1]})


def meta_objective(theta, key, data, static: Config, method=None):
    """(f, metrics) for one initial draw and minibatch order, both from `key`."""
    rule, w0, loss, inputs = _start(theta, key, data, static)
    method = method or revlearn.Reversible(min_decay={static.DECAY: 0.5 * static.min_decay})
    w = revlearn.train(loss, w0, inputs, optimizer=rule, steps=static.steps, method=method)
    metrics = evaluate(models.mlp_apply, w, data)
    return metrics["train_loss"], metrics


def _one(theta, key, data, static):
    (f, metrics), g = jax.value_and_grad(meta_objective, has_aux=True)(theta, key, data, static)
    return f, g, metrics, jax.tree_util.tree_map(jnp.square, g)


@functools.partial(jax.jit, static_argnames="static")
def _hypergrad(theta, key, data, static: Config):
    """The mean over K keys of (f, grad f, metrics, (grad f)^2)."""
    chunk = None if static.n_average <= _AT_ONCE else _AT_ONCE
    return average_over(_one, static.n_average, batch_size=chunk)(theta, key, data, static)


@functools.partial(jax.jit, static_argnames=("static", "every"))
def _curve(theta, key, data, static: Config, every: int = 1):
    """The training loss every `every` steps ([T + 1], NaN between; the rule's float step,
    as revlearn.train computes it up to rounding) and the metrics of w_T."""
    rule, w0, loss, inputs = _start(theta, key, data, static)
    x, y = data["train"]
    w, losses = float_train(rule, loss, w0, inputs, steps=static.steps, every=every,
                            record=lambda w, state, t: models.nll(models.mlp_apply(w, x), y))
    return (jnp.full((static.steps + 1,), jnp.nan).at[::every].set(losses),
            evaluate(models.mlp_apply, w, data))


# -- run and plot --------------------------------------------------------------

def run(c: Config, run_dir: RunDir) -> dict:
    t0 = time.perf_counter()
    data, static, theta0 = _data(c), c.program(), initial_hypers(c)
    first, stop = {}, {}

    def hypergrad_fn(theta, i):
        f, g, metrics, sq = _hypergrad(theta, iteration_key(c.seed, i), data, static)
        if i == 0:
            first.update(g=g, sq=sq)
        record = {**metrics, **{f"norm_{k}": optax.tree.norm(v) for k, v in g.items()},
                  **{f"scale_{l}{t}": jnp.exp(s[t]) for l, s in enumerate(theta["log_scale"])
                     for t in "wb"}}
        norm = float(optax.tree.norm(g))
        past = [m["hypergrad_norm"] for m in run_dir.read_metrics()]
        if c.stop_on_chaos and np.isfinite(norm) and is_chaotic(past, norm):  # theta_i is kept
            stop.update(i=i, theta=theta)
            run_dir.append_metrics({"iteration": i, "meta_loss": float(f), "hypergrad_norm": norm,
                                    "chaos": True, "stopped": True,
                                    **{k: float(v) for k, v in record.items()}})
            raise ChaosWarning(f"meta-iteration {i}: the meta-gradient exploded; stopped")
        return f, g, record

    tx = optax.chain(optax.adam(c.meta_lr), keep_logit_in(f"logit_{c.DECAY}", c.min_decay,
                                                          MAX_DECAY))
    try:
        theta = meta_optimize(hypergrad_fn, theta0, tx, c.meta_iterations, run_dir, clip=c.clip,
                              description=EXPERIMENTS[c.DECAY]).hypers
    except ChaosWarning:
        if not stop:  # a warning turned into an error, not the stopping rule
            raise
        theta = stop["theta"]
    if not first:  # meta-iteration 0 did not run here
        first.update(zip(("g", "sq"), _hypergrad(theta0, iteration_key(c.seed, 0), data,
                                                  static)[1::2]))
    n = stop.get("i", c.meta_iterations)  # meta-updates applied
    names = ("log_lr", f"logit_{c.DECAY}")
    res = {**{f"grad_{k}": first["g"][k] for k in names},
           **{f"gradsq_{k}": first["sq"][k] for k in names}}
    for tag, th in (("initial", theta0), ("learned", theta))[:1 + bool(n)]:
        curve, final = _curve(th, iteration_key(c.seed, c.meta_iterations + 1), data, static,
                              max(1, c.steps // 100))
        res[tag] = {"curve": curve, **final, **spaces.constrain(th)}
    run_dir.save_arrays("hypers_final", theta)
    run_dir.save_arrays("results", res)

    summary = {"meta_iterations": n, "stopped_by_chaos": "i" in stop,
               "n_hyperparameters": sum(x.size for x in jax.tree_util.tree_leaves(theta0))}
    for tag in ("initial", "learned")[:1 + bool(n)]:
        summary |= {f"train_{k}_{tag}": float(res[tag][f"train_{k}"]) for k in ("loss", "error")}
    for name in names:  # mean |g_0| over the weight layers: first 5, middle, last 5 steps
        g = np.mean([np.abs(layer["w"]) for layer in res[f"grad_{name}"]], axis=0)
        summary |= {f"grad_{name}_w_{part}": float(np.mean(g[sl])) if g[sl].size else 0.0
                    for part, sl in (("first5", slice(0, 5)), ("middle", slice(5, -5)),
                                     ("last5", slice(-5, None)))}
    for l, s in enumerate(res["learned"]["scale"] if n else ()):
        summary |= {f"scale_{l}{t}_learned": float(s[t]) for t in "wb"}
    summary["wall_time_s"] = time.perf_counter() - t0
    plot(run_dir.path)
    return summary


EXPERIMENTS = {"momentum": "schedules", "b1": "adam-schedules"}
_TYPE = {"w": "weights", "b": "biases"}
_DECAY = {"momentum": (r"momentum $\gamma_t$", r"\mathrm{logit}\,\gamma_t"),
          "b1": (r"Adam's $\beta_{1,t}$", r"\mathrm{logit}\,\beta_{1,t}")}


def _panels(fig_axes, rows, draw, L, layer, finish):
    """A 2 x 2 grid: rows (name, label) by columns (weights, biases); `draw(ax, name, l, t)`
    draws layer l's line, the legend of the layers goes below."""
    fig, axes = fig_axes
    for i, (name, label) in enumerate(rows):
        for j, t in enumerate("wb"):
            for l in range(L):
                draw(axes[i, j], name, l, t, dict(color=f"C{l}", label=layer(l)))
            axes[i, j].set(ylabel=label, title=f"{_TYPE[t].capitalize()}: {label}")
            axes[i, j].ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
            finish(axes[i, j], *([] if i else [""]))  # the step axis is shared
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels))
    return fig


@_plots.styled
def plot(path) -> list[Path]:
    """Re-render the figures from results.npz and metrics.jsonl."""
    run = _plots.saved(path, "results")
    res, metrics, out, paths = run.arrays["results"], run.metrics, run.run.figures, []
    cls = AdamConfig if "initial/b1/0/w" in res else Config
    names = {f.name for f in dataclasses.fields(cls)}
    c = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in run.config.items()
               if k in names})
    L, T, K, (d_label, d_logit) = len(c.sizes) - 1, c.steps, c.n_average, _DECAY[c.DECAY]
    inner, net = "Adam" if c.DECAY == "b1" else "SGD", "-".join(map(str, c.sizes))
    layer = lambda l: f"layer {l + 1} ({c.sizes[l]}\u2192{c.sizes[l + 1]})"  # noqa: E731
    learned, stopped = "learned/curve" in res, bool(metrics and metrics[-1].get("stopped"))
    per_epoch = c.n_train // c.batch_size

    def finish(ax, xlabel=f"{inner} step t"):
        if xlabel:
            ax.set_xlabel(xlabel)
        for e in range(per_epoch, T, per_epoch) if T > 2 * per_epoch else ():
            ax.axvline(e, color="0.8", lw=0.6, zorder=0)  # epoch boundaries

    def schedule(ax, name, l, t, style):
        if l == 0:
            ax.plot(res[f"initial/{name}/0/{t}"], "--", color="0.5", label="initial")
        ax.plot(res[f"learned/{name}/{l}/{t}"], lw=1.4, **style)
        ax.set_ylim(0, 1 if name == c.DECAY else None)

    if learned:  # 1. the learned schedules (paper figure 2)
        fig = _panels(_plots.figure(2, 2, width=11, height=7.2, sharex=True), (
            ("lr", r"learning rate $\alpha_t$"), (c.DECAY, d_label)), schedule, L, layer, finish)
        fig.suptitle(f"Learned {inner} schedules, {net} tanh MLP, {len(metrics) - stopped} "
                     "meta-iterations" + (" (then the chaos detector stopped it)" * stopped))
        _plots.save(fig, out, "schedules", paths)

    # 2. learning curves (paper figure 3, left) and the meta-learning curve (right)
    fig, axes = _plots.figure(3 if metrics else 1, width=15 if metrics else 6, height=4.4)
    axes = np.atleast_1d(axes)
    ax = axes[0]
    for tag, style, color in (("initial", "--", "0.4"), ("learned", "-", "C0"))[:1 + learned]:
        y = res[f"{tag}/curve"]
        ok = np.isfinite(y)
        ax.plot(np.arange(T + 1)[ok], y[ok], style, color=color, lw=2,
                label=f"{tag} hyperparameters ({y[ok][-1]:.3f} at the end)")
    finish(ax)
    ax.set(ylabel="training loss (nats)", title=f"{inner} training, a new initial draw and "
           "minibatch order")
    ax.legend()
    if metrics:
        it = np.array([m["iteration"] for m in metrics])
        norm = np.array([m["hypergrad_norm"] for m in metrics])
        chaos = np.array([bool(m.get("chaos")) for m in metrics])
        axes[1].plot(it, [m["meta_loss"] for m in metrics], "o-", ms=3, color="C0")
        axes[2].plot(it, norm, "o-", ms=3, color="C1")
        if chaos.any():
            axes[2].plot(it[chaos], norm[chaos], "x", ms=9, mew=2, color="C3",
                         label="chaos detector fires")
        for ax in axes[1:]:
            if stopped:
                ax.axvline(it[-1], color="C3", ls=":", label="meta-training stops")
            finish(ax, "meta-iteration (a new seed each)")
        axes[1].set(ylabel="final training loss (nats)", title="Meta-learning curve", ylim=(0, None))
        axes[2].set(ylabel=r"$\|\nabla_\theta f\|$", title="Meta-gradient norm")
        _plots.plain_log(axes[2])
        if chaos.any():
            axes[2].legend()
    _plots.plain_log(axes[0])
    _plots.save(fig, out, "learning_curves", paths)

    # 3. the meta-gradient per step at theta_0, mean over K seeds (paper figure 4)
    def gradient(ax, name, l, t, style):
        g = res[f"grad_{name}/{l}/{t}"]
        if l == 0:
            ax.axhline(0, color="0.3", lw=0.8)
        ax.plot(g, "o-" if T <= 100 else "-", ms=2.5, lw=1.2 if T <= 100 else 0.8, **style)
        if K > 1:
            se = np.sqrt(np.maximum(res[f"gradsq_{name}/{l}/{t}"] - g**2, 0) / (K - 1))
            ax.fill_between(np.arange(T), g - se, g + se, color=style["color"], alpha=0.25, lw=0)

    fig = _panels(_plots.figure(2, 2, width=11, height=7.2, sharex=True), (
        ("log_lr", r"$\partial f/\partial \log\alpha_t$"),
        (f"logit_{c.DECAY}", rf"$\partial f/\partial {d_logit}$")), gradient, L, layer, finish)
    fig.suptitle(f"Meta-gradient per step at the initial hyperparameters, {net}, {T} {inner} "
                 "steps: " + (f"mean over {K} seeds (band: \u00b11 standard error)" if K > 1
                              else "one seed"))
    _plots.save(fig, out, "meta_gradient", paths)

    if metrics:  # 4. the initial scales against the meta-iteration (paper figure 5)
        fig, axes = _plots.figure(2, width=10, height=4.2)
        for ax, t in zip(axes, "bw"):
            for l in range(L):
                y = [m[f"scale_{l}{t}"] for m in metrics]
                y += [] if stopped else [float(res[f"learned/scale/{l}/{t}"])]
                ax.plot(y, "o-", ms=2.5, color=f"C{l}", label=layer(l))
            for fan in sorted(set(c.sizes[:-1])) if t == "w" else ():
                ax.axhline(fan**-0.5, ls="--", color="0.35", lw=1)
                ax.annotate(f"1/\u221a{fan}", (0, fan**-0.5), xytext=(2, 3),
                            textcoords="offset points", color="0.35")
            finish(ax, "meta-iteration")
            ax.set(ylabel="initial scale (std of $w_0$)", title=f"Initial scale of the {_TYPE[t]}",
                   ylim=(0, None))
        axes[0].legend()
        _plots.save(fig, out, "initial_scales", paths)
    return paths


EXPERIMENT = Experiment(
    "schedules", "Learn per-step, per-layer learning rates and momenta and per-layer initial "
    "scales (paper fig. 2-5; 784-50-50-50-10, 100 SGD steps).", Config, SMOKE, run, plot)

ADAM_EXPERIMENT = register(Experiment(
    "adam-schedules", "The schedules experiment with Adam inside: per-step, per-layer learning "
    "rates and beta1 (b2 0.999 fixed) and initial scales, through exactly reversed Adam.",
    AdamConfig, ADAM_SMOKE, run, plot))
