"""Learning-rate and momentum schedules (paper figures 2 and 3): per step, per
layer and per parameter type, plus per-layer initial scales, learned by
hypergradient descent through exactly reversible SGD, or (`optimizer="adam"`,
the `adam-schedules` experiment) through exactly reversible Adam.

Model: tanh MLP `sizes` (784-50-50-50-10), layers l = 0 .. L-1, types
tau in {w, b}. Hyperparameters, stored unconstrained (1,608 for the default net
and 100 steps: 2 x 4 x 2 x 100 + 8):

    log_lr[l][tau]          [T]  alpha_{t,l,tau} = exp(.)
    logit_momentum[l][tau]  [T]  gamma_{t,l,tau} = sigmoid(.)  (kept in [min_momentum, 1 - 2^-12])
      (Adam: logit_b1[l][tau] [T], beta1_{t,l,tau} = sigmoid(.), kept in [min_b1, 1 - 2^-12])
    log_scale[l][tau]       ()   s_{l,tau} = exp(.)

Meta-iteration i draws key_i = iteration_key(seed, i) and, for each of the K
keys k of `split(key_i, K)` (K = n_average; 1 in mode "learn"), a new initial
draw and minibatch order:

    w_0 = s_{l,tau} * N(0, I)                                 (reparameterised)
    v_{t+1} = gamma_t v_t - (1 - gamma_t) grad NLL(w_t; batch_t),  w_{t+1} = w_t + alpha_t v_{t+1}
      (Adam: revlearn.optim.adam(alpha_t, beta1_t, b2, eps), b2 and eps fixed)
    f_k = NLL(w_T; training set)   (or the validation set, objective="valid")

The meta-gradient (1/K) sum_k grad f_k comes from `revlearn.train(...,
method=Reversible(min_decay=...))` (momentum, or Adam's b1, is traced, so its
buffer is sized from a bound) averaged with `revlearn.meta.average_over`; Adam
(optax) takes the meta-step, followed by a projection that keeps the logit of
the decay inside [logit(min), logit(1 - 2^-12)], so the decay never falls below
the bound the buffer was sized for.

Modes (fields left at None take the mode's value):

    mode      sizes             steps  meta_iterations  n_average
    learn     784-50-50-50-10   100    50               1     (paper fig. 2-3)
    averaged  784-50-50-50-10   100    4                10    (meta-gradient per step)
    long      784-50-10         1000   0                4     (20 epochs of 10,000)

Every mode also records the meta-gradient per step at the initial
hyperparameters (averaged over its K keys) and at the learned ones. The
learning curves retrain in floating point with the rule's own step
(`_float.float_train`).
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
from revlearn import models, spaces
from revlearn.meta import RunDir, save_figure, average_over, iteration_key, meta_optimize

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

__all__ = ["Config", "AdamConfig", "run", "plot", "initial_hypers", "constrained",
           "keep_momentum_in", "keep_logit_in", "EXPERIMENT", "ADAM_EXPERIMENT"]

MAX_MOMENTUM = 1.0 - 2.0**-12

_MODE_DEFAULTS = {
    #          sizes                    steps  meta_iterations  n_average
    "learn": ((784, 50, 50, 50, 10), 100, 50, 1),
    "averaged": ((784, 50, 50, 50, 10), 100, 4, 10),
    "long": ((784, 50, 10), 1000, 0, 4),
}

#: Per inner optimiser: the decay whose schedule is learned beside the learning rate, and
#: the initial log learning rate when `init_log_lr` is None (momentum: the paper's -1;
#: Adam: its usual 1e-3, which trains steadily over 100 steps, from 2.30 to 0.61 nats).
DECAY = {"momentum": "momentum", "adam": "b1"}
_INIT_LOG_LR = {"momentum": -1.0, "adam": math.log(1e-3)}


@dataclasses.dataclass(frozen=True)
class Config(MnistConfig):
    """Settings of the paper's run (10,000 examples, batch 200, Adam 0.04, log alpha -1,
    gamma 0.5, log scale -3). Fields left at None take the mode's value (module docstring);
    `init_log_lr` left at None takes the optimizer's. `init_momentum`, `min_momentum` apply
    to optimizer="momentum"; `init_b1`, `min_b1`, `b2`, `eps` to optimizer="adam"."""

    optimizer: Literal["momentum", "adam"] = "momentum"
    mode: Literal["learn", "averaged", "long"] = "learn"
    sizes: tuple[int, ...] | None = None
    steps: int | None = None
    meta_iterations: int | None = None
    n_average: int | None = None  # seeds (init draw + minibatch order) per meta-gradient
    n_train: int = 10000
    n_valid: int = 0
    batch_size: int = 200
    objective: Literal["train", "valid"] = "train"
    init_log_lr: float | None = None
    init_momentum: float = 0.5
    init_log_scale: float = -3.0
    min_momentum: float = 0.1
    init_b1: float = 0.9
    min_b1: float = 0.1
    b2: float = 0.999
    eps: float = 1e-8
    meta_lr: float = 0.04
    clip: float | None = None
    curve_examples: int = 2000  # training examples on which learning curves are evaluated

    def check(self):
        r = self.resolved()
        if len(r.sizes) < 2 or r.sizes[0] != 784 or r.sizes[-1] != 10 or min(r.sizes) < 1:
            fail("sizes", r.sizes, "must start with 784, end with 10 and hold layer sizes >= 1",
                 "pass e.g. sizes=784,50,50,50,10, or sizes=none for the mode's")
        at_least(r, 1, "steps", "n_average")
        at_least(r, 0, "meta_iterations", "n_valid")
        check_range("batch_size", self.batch_size, 1, self.n_train,
                    fix=f"pass batch_size <= n_train={self.n_train}")
        check_pool(self, "n_train", "n_valid")
        if self.objective == "valid" and self.n_valid < 1:
            fail("n_valid", self.n_valid, "leaves no validation set for objective='valid'",
                 "set n_valid >= 1 and n_train + n_valid <= 10000 (e.g. n_train=8000, "
                 "n_valid=2000)")
        # Every decay must lie on its grid (also the settings of the other optimizer, which
        # are not used); the order of the start value and the lower bound only matters for
        # the optimizer that learns them.
        check_decay("min_momentum", self.min_momentum, example=0.1)
        check_decay("init_momentum", self.init_momentum, example=0.5)
        if self.optimizer == "momentum" and not (
                self.min_momentum < self.init_momentum < MAX_MOMENTUM):
            fail("init_momentum", self.init_momentum, f"must lie in (min_momentum="
                 f"{self.min_momentum}, {MAX_MOMENTUM}) (the learned momentum is kept in "
                 "[min_momentum, 1 - 2^-12])", "raise init_momentum or lower min_momentum")
        # the buffer is sized for b1 >= min_b1 / 2, which must lie on b1's grid
        lo = 2 * revlearn.optim.FINE.smallest()
        if not lo <= self.min_b1 < MAX_MOMENTUM:
            fail("min_b1", self.min_b1, f"must lie in [{lo}, {MAX_MOMENTUM}) (Reversible "
                 "sizes its buffer for b1 >= min_b1 / 2, which must lie on b1's grid "
                 f"n/2^{revlearn.optim.FINE.bits})", "pass e.g. min_b1=0.1 (the default)")
        check_decay("init_b1", self.init_b1, revlearn.optim.FINE, example=0.9)
        if self.optimizer == "adam" and not self.min_b1 < self.init_b1 < MAX_MOMENTUM:
            fail("init_b1", self.init_b1, f"must lie in (min_b1={self.min_b1}, "
                 f"{MAX_MOMENTUM}) (the learned b1 is kept in [min_b1, 1 - 2^-12])",
                 "raise init_b1 or lower min_b1")
        check_decay("b2", self.b2, revlearn.optim.FINE, example=0.999)
        positive(self, "eps")
        positive(self, "meta_lr")
        check_clip(self)
        at_least(self, 1, "curve_examples")

    def resolved(self) -> Config:
        """This config with every None replaced by the mode's (or the optimizer's) value."""
        sizes, steps, meta_iterations, n_average = _MODE_DEFAULTS[self.mode]
        pick = lambda v, d: d if v is None else v  # noqa: E731
        return dataclasses.replace(
            self, sizes=tuple(pick(self.sizes, sizes)), steps=pick(self.steps, steps),
            meta_iterations=pick(self.meta_iterations, meta_iterations),
            n_average=pick(self.n_average, n_average),
            init_log_lr=pick(self.init_log_lr, _INIT_LOG_LR[self.optimizer])) if None in (
                self.sizes, self.steps, self.meta_iterations, self.n_average,
                self.init_log_lr) else self

    @property
    def decay(self) -> str:
        """The learned decay: "momentum" or "b1"."""
        return DECAY[self.optimizer]

    def decay_init_and_min(self) -> tuple[float, float]:
        return ((self.init_b1, self.min_b1) if self.optimizer == "adam"
                else (self.init_momentum, self.min_momentum))


@dataclasses.dataclass(frozen=True)
class AdamConfig(Config):
    """`adam-schedules`: the same settings with Adam as the inner optimiser (lr 1e-3 and
    b1 0.9 at the start, b2 0.999 and eps 1e-8 fixed)."""

    optimizer: Literal["momentum", "adam"] = "adam"


# One layer keeps the compile time (most of a smoke run) low; the tests cover hidden layers.
SMOKE = Config(sizes=(784, 10), steps=6, meta_iterations=2, n_average=2, n_train=400,
               batch_size=50, curve_examples=200)
ADAM_SMOKE = AdamConfig(sizes=(784, 10), steps=6, meta_iterations=2, n_average=2, n_train=400,
                        batch_size=50, curve_examples=200)


# -- hyperparameters -------------------------------------------------------------

def initial_hypers(config: Config) -> dict:
    """The unconstrained hyperparameters: constant schedules and scales."""
    c = config.resolved()
    L, T = len(c.sizes) - 1, c.steps
    init, _ = c.decay_init_and_min()
    logit = math.log(init) - math.log1p(-init)
    sched = lambda v: [{t: jnp.full((T,), v, jnp.float64) for t in ("w", "b")}  # noqa: E731
                       for _ in range(L)]
    return {"log_lr": sched(c.init_log_lr), f"logit_{c.decay}": sched(logit),
            "log_scale": [{t: jnp.asarray(c.init_log_scale, jnp.float64) for t in ("w", "b")}
                          for _ in range(L)]}


def constrained(theta: dict) -> dict:
    """{"lr": [{w: [T], b: [T]}], "momentum" (or "b1"): same, "scale": [{w: (), b: ()}]}."""
    return spaces.constrain(theta)


def keep_logit_in(name: str, lo: float, hi: float) -> optax.GradientTransformation:
    """An optax step after the optimiser that projects theta[name] (a logit) back into
    [logit(lo), logit(hi)] (the update becomes clip(theta + u) - theta)."""
    a, b = math.log(lo) - math.log1p(-lo), math.log(hi) - math.log1p(-hi)

    def update(updates, state, params):
        if params is None:
            raise ValueError(f"keep_logit_in({name!r}) needs the current hyperparameters "
                             "(params)")
        proj = jax.tree_util.tree_map(lambda u, p: jnp.clip(p + u, a, b) - p,
                                      updates[name], params[name])
        return {**updates, name: proj}, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def keep_momentum_in(lo: float, hi: float) -> optax.GradientTransformation:
    """`keep_logit_in("logit_momentum", lo, hi)`."""
    return keep_logit_in("logit_momentum", lo, hi)


def _per_leaf(schedule, params):
    """[T] schedule leaves reshaped to the unambiguous form [T, 1, ..., 1] of each leaf."""
    return [{t: s[t].reshape(s[t].shape + (1,) * p[t].ndim) for t in s}
            for s, p in zip(schedule, params)]


# -- the problem -----------------------------------------------------------------

class _Static(NamedTuple):
    """Settings that fix the compiled programs (a hashable jit static argument)."""

    sizes: tuple
    steps: int
    batch_size: int
    n_average: int
    objective: str
    optimizer: str
    min_decay: float   # min_momentum or min_b1
    b2: float
    eps: float
    curve_every: int

    @classmethod
    def of(cls, c: Config) -> _Static:
        c = c.resolved()
        return cls(tuple(c.sizes), c.steps, c.batch_size, c.n_average, c.objective,
                   c.optimizer, c.decay_init_and_min()[1], c.b2, c.eps,
                   max(1, c.steps // 100))

    def method(self):
        # The decay is traced, so its buffer is sized from a bound below the projected
        # range: gamma (b1) >= min_decay always holds (rounding included).
        return revlearn.Reversible(min_decay={DECAY[self.optimizer]: 0.5 * self.min_decay})

    def rule(self, h, params0):
        """The inner optimiser with the constrained schedules h, per params leaf."""
        lr = _per_leaf(h["lr"], params0)
        if self.optimizer == "adam":
            return revlearn.optim.adam(lr, b1=_per_leaf(h["b1"], params0), b2=self.b2,
                                       eps=self.eps)
        return revlearn.optim.momentum(lr, _per_leaf(h["momentum"], params0))


def _params0(h, key, sizes):
    return models.mlp_init(key, sizes, scale=[(s["w"], s["b"]) for s in h["scale"]],
                           dtype=jnp.float64)


def _train_loss(params, h, step, *, batch_size):
    xb, yb = models.minibatch(h["x"], h["y"], batch_size, step, h["key"])
    return models.nll(models.mlp_apply(params, xb), yb)


def _evaluate(params, data) -> dict:
    out = {}
    for name in data:
        if name == "curve":
            continue
        x, y = data[name]
        logp = models.mlp_apply(params, x)
        out[f"{name}_loss"] = models.nll(logp, y)
        out[f"{name}_error"] = models.error_rate(logp, y)
    return out


def meta_objective(theta, key, data, static: _Static, method=None):
    """(f, metrics) for one initial draw and minibatch order, both from `key`."""
    h = constrained(theta)
    k_init, k_batch = jax.random.split(key)
    params0 = _params0(h, k_init, static.sizes)
    x, y = data["train"]
    params = revlearn.train(functools.partial(_train_loss, batch_size=static.batch_size),
                            params0, {"key": k_batch, "x": x, "y": y},
                            optimizer=static.rule(h, params0), steps=static.steps,
                            method=method or static.method())
    metrics = _evaluate(params, data)
    return metrics[f"{static.objective}_loss"], metrics


def _one(theta, key, data, static):
    (loss, metrics), grads = jax.value_and_grad(meta_objective, has_aux=True)(
        theta, key, data, static)
    sq = jax.tree_util.tree_map(jnp.square, grads)
    return loss, grads, metrics, sq


@functools.partial(jax.jit, static_argnames="static")
def _hypergrad(theta, key, data, static: _Static):
    """Mean over K keys of (f, grad f, metrics, (grad f)^2)."""
    return average_over(_one, static.n_average)(theta, key, data, static)


@functools.partial(jax.jit, static_argnames="static")
def _curve(theta, key, data, static: _Static):
    """Training loss on data["curve"] every `curve_every` steps ([T + 1], NaN between; the
    rule's float step, as revlearn.train computes it up to rounding) and the metrics of w_T."""
    h = constrained(theta)
    k_init, k_batch = jax.random.split(key)
    w0 = _params0(h, k_init, static.sizes)
    x, y = data["train"]
    xc, yc = data["curve"]
    full = lambda w, state, t: models.nll(models.mlp_apply(w, xc), yc)  # noqa: E731
    w, losses = float_train(static.rule(h, w0),
                            functools.partial(_train_loss, batch_size=static.batch_size), w0,
                            {"key": k_batch, "x": x, "y": y}, steps=static.steps, record=full,
                            every=static.curve_every)
    curve = jnp.full((static.steps + 1,), jnp.nan, losses.dtype)
    curve = curve.at[jnp.arange(losses.shape[0]) * static.curve_every].set(losses)
    return curve, _evaluate(w, data)


# -- run and plot --------------------------------------------------------------

def _splits(c: Config):
    pool = rdata.load_mnist(c.data, c.data_dir)
    sizes = {"train": c.n_train} | ({"valid": c.n_valid} if c.n_valid else {})
    parts = rdata.split(pool, sizes, c.seed)
    data = {k: (jnp.asarray(d.images, jnp.float64), jnp.asarray(d.onehot, jnp.float64))
            for k, d in parts.items()}
    n = min(c.curve_examples, c.n_train)
    data["curve"] = (data["train"][0][:n], data["train"][1][:n])
    return data


def run(config: Config, run_dir: RunDir) -> dict:
    t0 = time.perf_counter()
    c = config.resolved()
    data = _splits(c)
    static = _Static.of(c)
    theta0 = initial_hypers(c)
    first = {}

    def hypergrad_fn(theta, i):
        loss, grads, metrics, sq = _hypergrad(theta, iteration_key(c.seed, i), data, static)
        if i == 0:
            first.update(grads=grads, sq=sq)
        return loss, grads, metrics

    dn = c.decay
    optimizer = optax.chain(optax.adam(c.meta_lr),
                            keep_logit_in(f"logit_{dn}", c.decay_init_and_min()[1], MAX_MOMENTUM))
    result = meta_optimize(hypergrad_fn, theta0, optimizer, c.meta_iterations, run_dir,
                           clip=c.clip, progress_metric="meta_loss",
                           description=f"{_NAME[c.optimizer]} ({c.mode})")
    theta = result.hypers
    run_dir.save_arrays("hypers_final", theta)
    n = c.meta_iterations

    # The meta-gradient per step at the initial (= meta-iteration 0) and learned hypers.
    if not first:
        _, grads, _, sq = _hypergrad(theta0, iteration_key(c.seed, 0), data, static)
        first.update(grads=grads, sq=sq)
    if n:
        _, g_end, _, sq_end = _hypergrad(theta, iteration_key(c.seed, n), data, static)
    else:  # nothing was learned: the learned hyperparameters are the initial ones
        g_end, sq_end = first["grads"], first["sq"]

    res = {}
    for tag, th in (("initial", theta0), ("learned", theta)):
        curve, final = jax.device_get(_curve(th, iteration_key(c.seed, n + 1), data, static))
        res[f"curve_{tag}"] = curve
        res.update({f"{k}_{tag}": np.asarray(v) for k, v in final.items()})
        h = constrained(th)
        for l in range(len(c.sizes) - 1):
            for t in ("w", "b"):
                res[f"lr_{tag}_{l}{t}"] = np.asarray(h["lr"][l][t])
                res[f"{dn}_{tag}_{l}{t}"] = np.asarray(h[dn][l][t])
                res[f"scale_{tag}_{l}{t}"] = np.asarray(h["scale"][l][t])
    for tag, g, sq in (("initial", first["grads"], first["sq"]), ("learned", g_end, sq_end)):
        for name in ("log_lr", f"logit_{dn}"):
            for l in range(len(c.sizes) - 1):
                for t in ("w", "b"):
                    res[f"grad_{name}_{tag}_{l}{t}"] = np.asarray(g[name][l][t])
                    res[f"gradsq_{name}_{tag}_{l}{t}"] = np.asarray(sq[name][l][t])
    res["curve_every"] = np.asarray(static.curve_every)
    run_dir.save_arrays("results", res)

    n_hypers = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(theta0))
    summary = {"optimizer": c.optimizer, "mode": c.mode, "sizes": "-".join(map(str, c.sizes)),
               "steps": c.steps, "meta_iterations": n, "n_average": c.n_average,
               "n_hyperparameters": n_hypers}
    for tag in ("initial", "learned")[:1 + bool(n)]:
        for k in sorted(k for k in res if k.endswith(f"_{tag}") and k.split("_")[0] in
                        ("train", "valid")):
            summary[k] = float(res[k])
    # where the meta-gradient at the initial hyperparameters is large: mean |.| over the
    # weight layers, in the first 5, the middle and the last 5 steps
    for name, short in (("log_lr", "lr"), (f"logit_{dn}", dn)):
        g = np.mean([np.abs(res[f"grad_{name}_initial_{l}w"]) for l in range(len(c.sizes) - 1)],
                    axis=0)
        summary[f"grad_{short}_w_first5"] = float(np.mean(g[:5]))
        summary[f"grad_{short}_w_middle"] = float(np.mean(g[5:-5])) if len(g) > 10 else 0.0
        summary[f"grad_{short}_w_last5"] = float(np.mean(g[-5:]))
    if n:
        h = constrained(theta)
        for l in range(len(c.sizes) - 1):
            summary[f"scale_learned_layer{l}_w"] = float(h["scale"][l]["w"])
            summary[f"inv_sqrt_fan_in_layer{l}"] = 1.0 / math.sqrt(c.sizes[l])
    summary["wall_time_s"] = time.perf_counter() - t0
    plot(run_dir.path)
    return summary


_TYPE = {"w": "weights", "b": "biases"}
_NAME = {"momentum": "schedules", "adam": "adam-schedules"}
#: per learned decay: (axis label, name in titles, its logit's name, meta-gradient label)
_DECAY_LABEL = {"momentum": (r"momentum $\gamma_t$", "momentum", "logit momentum",
                             r"$\partial f/\partial\,\mathrm{logit}\,\gamma_t$"),
                "b1": (r"Adam's $\beta_{1,t}$", "beta1", "logit beta1",
                       r"$\partial f/\partial\,\mathrm{logit}\,\beta_{1,t}$")}


def _blocks(x, *ys, size):
    """Means over consecutive blocks of `size` steps (a trailing partial block is kept)."""
    if size == 1:
        return (x, *ys)
    n = -(-len(x) // size)
    edges = np.arange(n) * size
    return tuple(np.add.reduceat(np.asarray(a, np.float64), edges)
                 / np.diff(np.append(edges, len(x))) for a in (x, *ys))


def _net(sizes) -> str:
    return "-".join(map(str, sizes))


def plot(path) -> list[Path]:
    """Re-render the figures from results.npz and metrics.jsonl."""
    from matplotlib.figure import Figure

    rd = RunDir(Path(path))
    res = rd.load_arrays("results")
    metrics = rd.read_metrics()
    raw = (rd.read_config() or {}).get("config", {})
    known = {f.name for f in dataclasses.fields(Config)}
    c = Config(**{k: tuple(v) if isinstance(v, list) else v
                  for k, v in raw.items() if k in known}).resolved()
    L = len(c.sizes) - 1
    out = rd.figures
    paths = []
    T = len(res["lr_initial_0w"])
    dn = c.decay
    d_axis, d_title, d_logit, d_grad = _DECAY_LABEL[dn]
    inner = "Adam" if c.optimizer == "adam" else "SGD"
    step_label = f"{inner} step t"
    steps = np.arange(T)
    colors = [f"C{l}" for l in range(L)]
    per_epoch = c.n_train // c.batch_size

    def epochs(ax):
        if T > 2 * per_epoch:
            for e in range(per_epoch, T, per_epoch):
                ax.axvline(e, color="0.85", lw=0.6, zorder=0)

    learned = bool(metrics)  # meta_iterations = 0 (mode "long"): nothing was learned
    if learned:  # 1. learned schedules, 2. initial scales against 1/sqrt(fan-in)
        fig = Figure(figsize=(11, 7), layout="constrained")
        axes = fig.subplots(2, 2, sharex=True)
        for j, t in enumerate(("w", "b")):
            for i, (name, label) in enumerate((("lr", r"learning rate $\alpha_t$"),
                                               (dn, d_axis))):
                ax = axes[i, j]
                ax.plot(steps, res[f"{name}_initial_0{t}"], "--", color="0.5", label="initial")
                for l in range(L):
                    ax.plot(steps, res[f"{name}_learned_{l}{t}"], color=colors[l], lw=1.6,
                            label=f"layer {l} ({c.sizes[l]}\u2192{c.sizes[l + 1]})")
                if name == "lr":
                    ax.set_yscale("log")
                else:
                    ax.set_ylim(0, 1)
                ax.set_ylabel(label)
                what = "learning rate" if name == "lr" else d_title
                ax.set_title(f"{what[0].upper() + what[1:]} of the {_TYPE[t]}")
                ax.grid(alpha=0.3, which="both")
                epochs(ax)
                if i == 1:
                    ax.set_xlabel(step_label)
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncol=L + 1, fontsize=9)
        fig.suptitle(f"Learned {inner} schedules, {_net(c.sizes)} tanh MLP, "
                     f"{len(metrics)} meta-iterations"
                     + (f" (meta-gradient averaged over {c.n_average} seeds)" if c.n_average > 1
                        else ""))
        paths.append(out / "schedules.png")
        save_figure(fig, paths[-1], dpi=100)

        # 2. initial scales against 1/sqrt(fan-in)
        fig = Figure(figsize=(6.5, 4.3), layout="constrained")
        ax = fig.subplots()
        layers = np.arange(L)
        ax.plot(layers, [float(res[f"scale_initial_{l}w"]) for l in layers], "--", color="0.5",
                label="initial (weights and biases)")
        ax.plot(layers, [float(res[f"scale_learned_{l}w"]) for l in layers], "o-", color="C0",
                ms=7, label="learned, weights")
        ax.plot(layers, [float(res[f"scale_learned_{l}b"]) for l in layers], "s-", color="C1",
                ms=6, label="learned, biases")
        ax.plot(layers, [1 / math.sqrt(c.sizes[l]) for l in layers], "k*", ms=11,
                label=r"$1/\sqrt{\mathrm{fan\ in}}$ heuristic")
        ax.set_xticks(layers, [f"layer {l}\nfan-in {c.sizes[l]}" for l in layers])
        ax.set_yscale("log")
        ax.set_ylabel("initial scale (std of $w_0$)")
        ax.set_title("Learned initial scales")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        paths.append(out / "initial_scales.png")
        save_figure(fig, paths[-1], dpi=100)

    # 3. learning curves before and after
    fig = Figure(figsize=(7, 4.3), layout="constrained")
    ax = fig.subplots()
    every = int(res["curve_every"])
    for tag, style, color in (("initial", "--", "0.4"), ("learned", "-", "C0"))[:1 + learned]:
        y = res[f"curve_{tag}"]
        x = np.arange(len(y))
        ok = np.isfinite(y)
        ax.plot(x[ok], y[ok], style, color=color, lw=2, label=f"{tag} hyperparameters")
    ax.set_yscale("log")
    ax.set_xlabel(step_label)
    ax.set_ylabel("training loss (mean NLL, nats)")
    n_curve = min(c.curve_examples, c.n_train)
    ax.set_title(f"{inner} training curves on a fresh initial draw and minibatch order\n"
                 f"(loss on {n_curve} training examples"
                 + (f", every {every} steps)" if every > 1 else ")"))
    ax.grid(alpha=0.3, which="both")
    epochs(ax)
    ax.legend()
    paths.append(out / "learning_curves.png")
    save_figure(fig, paths[-1], dpi=100)

    # 4. the meta-gradient per step, at the initial and (if any were learned) the learned
    # hyperparameters
    from matplotlib.lines import Line2D

    K = c.n_average
    block = max(1, T // 100)
    for tag in (("initial", "learned") if metrics else ("initial",)):
        fig = Figure(figsize=(11, 7), layout="constrained")
        axes = fig.subplots(2, 2, sharex=True)
        for i, (name, label) in enumerate((("log_lr", r"$\partial f/\partial \log\alpha_t$"),
                                           (f"logit_{dn}", d_grad))):
            for j, t in enumerate(("w", "b")):
                ax = axes[i, j]
                for l in range(L):
                    g = res[f"grad_{name}_{tag}_{l}{t}"]
                    se = np.sqrt(np.maximum(res[f"gradsq_{name}_{tag}_{l}{t}"] - g**2, 0)
                                 / max(K - 1, 1))
                    x, mag, se = _blocks(steps, np.abs(g), se, size=block)
                    ax.plot(x, mag, color=colors[l], lw=1.3, label=f"layer {l}")
                    if block == 1:
                        up = g > 0
                        ax.plot(steps[up], np.abs(g[up]), "^", color=colors[l], ms=3.5)
                    if K > 1:
                        ax.plot(x, se, ":", color=colors[l], lw=0.9, alpha=0.8)
                ax.set_yscale("log")
                ax.set_ylabel("|" + label + "| (nats)")
                ax.set_title(f"{_TYPE[t].capitalize()}: meta-gradient w.r.t. "
                             + ("log learning rate" if name == "log_lr" else d_logit))
                ax.grid(alpha=0.3, which="both")
                epochs(ax)
                if i == 1:
                    ax.set_xlabel(step_label)
        handles, labels = axes[0, 0].get_legend_handles_labels()
        if block == 1:
            handles.append(Line2D([], [], ls="", marker="^", color="0.3", ms=4))
            labels.append("gradient > 0 (wants a smaller value)")
        if K > 1:
            handles.append(Line2D([], [], ls=":", color="0.3"))
            labels.append("dotted: standard error of the mean")
        fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=9)
        what = (f"magnitude of the mean over {K} seeds (initial draw and minibatch order)"
                if K > 1 else "magnitude, one seed")
        if block > 1:
            what += f", averaged over blocks of {block} steps"
        fig.suptitle(f"Meta-gradient per step at the {tag} hyperparameters, {_net(c.sizes)}, "
                     f"{T} {inner} steps\n({what})")
        paths.append(out / ("meta_gradient.png" if tag == "initial"
                            else "meta_gradient_learned.png"))
        save_figure(fig, paths[-1], dpi=100)

    # 5. meta-learning curve
    if metrics:
        fig = Figure(figsize=(7, 4), layout="constrained")
        ax = fig.subplots()
        it = [m["iteration"] for m in metrics]
        obj = "validation" if c.objective == "valid" else "training"
        ax.plot(it, [m["meta_loss"] for m in metrics], "o-", ms=3, color="C0")
        ax.set_xlabel("meta-iteration (a new seed each)")
        ax.set_ylabel(f"final {obj} loss (nats)")
        ax.set_yscale("log")
        ax.set_title("Meta-objective during meta-training")
        ax.grid(alpha=0.3, which="both")
        paths.append(out / "meta_curve.png")
        save_figure(fig, paths[-1], dpi=100)
    return paths


EXPERIMENT = register(Experiment(
    name="schedules",
    description="Learn per-step, per-layer learning rates, momenta and initial scales "
                "(paper fig. 2-3; 784-50-50-50-10, 100 steps).",
    Config=Config, smoke=SMOKE, run=run, plot=plot))

ADAM_EXPERIMENT = register(Experiment(
    name="adam-schedules",
    description="The schedules experiment with Adam inside: per-step, per-layer learning rates "
                "and beta1 (b2 0.999 fixed) and initial scales, through exactly reversed Adam.",
    Config=AdamConfig, smoke=ADAM_SMOKE, run=run, plot=plot))
