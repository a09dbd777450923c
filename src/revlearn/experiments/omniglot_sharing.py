"""Omniglot multitask "architecture learning" (paper Figures 8-9): learn how much ten
networks share, layer by layer, by hypergradient descent through reversible SGD.

Tasks: the five alphabets of `revlearn.data.load_omniglot` and the same five rotated
by 90 degrees (task k + 5 is task k rotated). Of each character's 20 drawings (drawn
with `seed`; the same drawers for an alphabet and its rotation) `n_train` train and
`n_test` test; meta-iteration i holds out `n_valid` of each character's training
drawings (numpy rng (seed, i, 0)) as its validation set. Inputs: ink minus the mean
training image. Model: one 784-hidden-55 tanh MLP per task whose weights (and biases)
at layer l mix the trained "whitened" weights z of all ten:

    w_{k,l} = sum_j T_l[k, j] z_{j,l},   L_train(z) = sum_k NLL_k(w_k) + exp(log_l2) ||z||^2

z_0 ~ exp(log_init_scale) N(0, I) (rng (seed, i, 1)), `steps` full-batch steps of SGD
with momentum. Hyperparameters: the per-layer 10x10 mixings T_l, from (1 - s) I +
s 11^T/10 (s = init_sharing); L2 and the init scale stay fixed, as in the paper's
script. Meta-objective: the validation NLL averaged over tasks, by plain gradient
descent (step meta_lr). Baselines: "separate" (T_l = I) and "tied first layer" (T_0 =
11^T/10, T_1.. = I). Every variant is finally trained on all n_train drawings from one
fresh z_0 and scored on the test drawings. Sharing is shown as corr(T_l T_l^T).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
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
from revlearn.meta import RunDir, meta_optimize

from . import _plots
from ._config import ExperimentConfig
from ._float import float_train
from ._registry import Experiment
from ._validate import at_least, check_decay, check_range, fail, positive

__all__ = ["EXPERIMENT", "Config", "plot", "run"]

N_OUT = 55  # the paper's output layer (Omniglot's largest alphabet; these use at most 40)
PAPER = {"separate": (0.61, 1.34), "tied": (0.90, 1.25), "learned": (0.60, 1.13)}
VARIANTS = {"separate": "separate networks", "tied": "tied first layer",
            "initial": "initial mix (not learned)", "learned": "learned sharing"}


@dataclasses.dataclass(frozen=True)
class Config(ExperimentConfig):
    """The paper's script's settings, in float32 (see docs/experiments/omniglot-sharing.md)."""

    hidden: tuple[int, ...] = (400, 200)
    steps: int = 50
    lr: float = 1.0
    momentum: float = 0.9
    log_l2: float = -4.0
    log_init_scale: float = -2.0
    init_sharing: float = 0.5
    meta_iterations: int = 20
    meta_lr: float = 0.2
    n_train: int = 12  # drawings per character for training, n_valid of them held out
    n_valid: int = 2
    n_test: int = 3
    dtype: Literal["float32", "float64"] = "float32"

    def check(self):
        at_least(self, 1, "steps", "n_valid", "n_test")
        at_least(self, 2, "n_train")
        at_least(self, 0, "meta_iterations")
        if not self.hidden or min(self.hidden) < 1:
            fail("hidden", self.hidden, "must list positive widths", "pass e.g. hidden=400,200")
        if self.n_valid >= self.n_train:
            fail("n_valid", self.n_valid, f"must be < n_train={self.n_train} (the drawings it is "
                 "held out of)", f"pass n_valid <= {self.n_train - 1}")
        if self.n_train + self.n_test > 20:
            fail("n_test", self.n_test, f"with n_train={self.n_train} exceeds a character's 20 "
                 "drawings", "pass n_train + n_test <= 20")
        check_decay("momentum", self.momentum)
        positive(self, "lr", "meta_lr")
        check_range("init_sharing", self.init_sharing, 0.0, 1.0)


SMOKE = Config(hidden=(16,), steps=4, meta_iterations=2, n_train=3, n_valid=1, n_test=1)


# -- the tasks -----------------------------------------------------------------------

def _tasks(config: Config):
    """(pool, rows(drawers) -> per task the pool rows of the drawers [chars, k] of its
    alphabet, characters per task, per alphabet a drawer order [chars, 20])."""
    pool = rdata.load_omniglot()
    lookup = np.zeros((10, pool.character.max() + 1, 20), np.int64)
    lookup[pool.task, pool.character, pool.drawer] = np.arange(len(pool.task))
    chars = tuple(int(pool.character[pool.task == t].max()) + 1 for t in range(10))
    rng = np.random.default_rng(config.seed)
    order = [rng.permuted(np.tile(np.arange(20), (c, 1)), axis=1) for c in chars[:5]]
    return pool, lambda d: [lookup[t, np.arange(c)[:, None], d[t % 5]].ravel()
                            for t, c in enumerate(chars)], chars, order


def _groups(chars) -> list[tuple[np.ndarray, int]]:
    """Tasks of similar size run as one vmapped net: (task indices, characters padded to)
    per group, sizes within 25% (here the 8 tasks of 22-26 characters, and Korean's 2)."""
    groups = []
    for t in sorted(range(len(chars)), key=lambda t: chars[t]):
        if groups and chars[t] <= 1.25 * chars[groups[-1][0]]:
            groups[-1].append(t)
        else:
            groups.append([t])
    return [(np.array(g), max(chars[t] for t in g)) for g in groups]


def _split(tasks, drawers, mean, dtype) -> list[tuple]:
    """Per group: (x [tasks, P, 784], one-hot y [tasks, P, 55]) of the drawers [chars, k]
    of each alphabet, zero-padded to P = k * the group's largest count (y = 0: no loss)."""
    pool, rows, chars, _ = tasks
    out, rows = [], rows(drawers)
    for idx, c in _groups(chars):
        x = np.zeros((len(idx), c * drawers[0].shape[1], 784), np.float32)
        y = np.zeros(x.shape[:2] + (N_OUT,), np.float32)
        for i, r in enumerate(rows[t] for t in idx):
            x[i, :len(r)] = pool.images[r] - mean
            y[i, :len(r)] = rdata.one_hot(pool.character[r], N_OUT)
        out.append((jnp.asarray(x, dtype), jnp.asarray(y, dtype)))
    return out


# -- the model -----------------------------------------------------------------------

def _mixing(s: float, layers: int, tied_first: bool = False) -> np.ndarray:
    """[layers, 10, 10]: (1 - s) I + s 11^T/10 per layer; `tied_first`: 11^T/10 at layer 0."""
    t = np.stack([(1 - s) * np.eye(10) + s * np.full((10, 10), 0.1)] * layers)
    if tied_first:
        t[0] = np.full((10, 10), 0.1)
    return t


def _weights(z, transform):
    """The tasks' weights: layer l of task k is sum_j transform[l, k, j] z[l][j]."""
    return [{n: jnp.tensordot(t.astype(v.dtype), v, axes=1) for n, v in layer.items()}
            for t, layer in zip(transform, z)]


def _task_scores(z, transform, data, chars):
    """[2, tasks]: each task's mean NLL and error rate on `data` (one (x, y) per group)."""
    parts, groups = [], _groups(chars)
    for (idx, _), (x, y) in zip(groups, data):
        logp = jax.vmap(models.mlp_apply)(_weights(z, transform[:, idx]), x)
        wrong = (jnp.argmax(logp, -1) != jnp.argmax(y, -1)) & (jnp.sum(y, -1) > 0)
        parts.append(jnp.stack([-jnp.sum(logp * y, axis=(1, 2)), jnp.sum(wrong, axis=1)])
                     / jnp.sum(y, axis=(1, 2)))
    return jnp.concatenate(parts, axis=1)[:, np.argsort(np.concatenate([g for g, _ in groups]))]


def _init(config: Config, i: int) -> list[dict]:
    """Standard normal z_0 of meta-iteration i (numpy: jax.random compiles slowly here)."""
    rng, sizes = np.random.default_rng([config.seed, i, 1]), [784, *config.hidden, N_OUT]
    return [{"w": rng.standard_normal((10, a, b)), "b": rng.standard_normal((10, b))}
            for a, b in itertools.pairwise(sizes)]


def _problem(transform, z0, train, static: Config, chars):
    """(loss_fn, scaled z_0, hypers) of a training run with mixing `transform`."""
    def loss(z, h, step):
        scores = _task_scores(z, h["T"], jax.lax.stop_gradient(h["data"]), chars)
        return jnp.sum(scores[0]) + math.exp(static.log_l2) * models.l2_penalty(z, 1.0)

    z0 = jax.tree.map(lambda a: (math.exp(static.log_init_scale) * a).astype(static.dtype), z0)
    return loss, z0, {"T": transform, "data": train}


def _scores(transform, z, data, chars) -> dict:
    s = {k: jnp.mean(_task_scores(z, transform, g, chars), axis=1) for k, g in data.items()}
    return {f"{k}_{m}": v[j] for k, v in s.items() for j, m in enumerate(("loss", "error"))}


@functools.partial(jax.jit, static_argnames=("static", "chars"))
def _hypergrad(transform, z0, data, static: Config, chars):
    """(validation loss, its gradient w.r.t. the mixing, metrics), by exact reversal."""
    def objective(transform):
        loss, w0, h = _problem(transform, z0, data["train"], static, chars)
        z = revlearn.sgd(loss, w0, h, lr=static.lr, momentum=static.momentum, steps=static.steps,
                         method=revlearn.Reversible())
        m = _scores(transform, z, data, chars)
        return m["valid_loss"], m

    (loss, metrics), grad = jax.value_and_grad(objective, has_aux=True)(transform)
    return loss, grad, metrics


@functools.partial(jax.jit, static_argnames=("static", "chars"))
def _final(transform, z0, data, static: Config, chars):
    """Train in float (no derivative needed), scored after every step: {metric: [steps + 1]}."""
    loss, w0, h = _problem(transform, z0, data["train"], static, chars)
    record = lambda z, state, t: _scores(transform, z, data, chars)
    return float_train(revlearn.optim.momentum(static.lr, static.momentum), loss, w0, h,
                       steps=static.steps, record=record)[1]


# -- run and plot --------------------------------------------------------------------

def _correlation(t: np.ndarray) -> np.ndarray:
    """The tasks' correlation under the mixing t: t t^T scaled to a unit diagonal."""
    c = t @ t.T
    return c / np.sqrt(np.outer(np.diag(c), np.diag(c)))


def _sharing(transform: np.ndarray) -> dict:
    """Per layer: mean correlation of the five (alphabet, rotation) pairs and of the other
    pairs, and for how many of the ten tasks the rotation is the most correlated task."""
    out, pairs = {}, np.eye(10, k=5, dtype=bool) | np.eye(10, k=-5, dtype=bool)
    for l, t in enumerate(transform):
        c = _correlation(t)
        np.fill_diagonal(c, -np.inf)
        out[f"layer{l}_corr_rotation_pairs"] = float(c[pairs].mean())
        out[f"layer{l}_corr_other_pairs"] = float(c[~pairs & np.isfinite(c)].mean())
        partner = np.argmax(c, axis=1) == (np.arange(10) + 5) % 10
        out[f"layer{l}_partner_is_rotation"] = int(np.sum(partner))
    return out


def run(config: Config, run_dir: RunDir) -> dict:
    t0, cpu0 = time.perf_counter(), time.process_time()
    tasks = _tasks(config)
    pool, rows, chars, order = tasks
    static, dtype, n = config.program(), jnp.dtype(config.dtype), config.n_train - config.n_valid
    trainval = [o[:, :config.n_train] for o in order]
    mean = pool.images[np.concatenate(rows(trainval))].mean(axis=0)
    test = _split(tasks, [o[:, config.n_train:config.n_train + config.n_test] for o in order],
                  mean, dtype)

    def hypergrad_fn(transform, i):
        rng = np.random.default_rng([config.seed, i, 0])
        held = [rng.permuted(o, axis=1) for o in trainval]  # per character: n_valid held out
        data = {"train": _split(tasks, [h[:, :n] for h in held], mean, dtype),
                "valid": _split(tasks, [h[:, n:] for h in held], mean, dtype), "test": test}
        return _hypergrad(transform, _init(config, i), data, static, chars)

    layers = len(config.hidden) + 1
    theta0 = _mixing(config.init_sharing, layers)
    result = meta_optimize(hypergrad_fn, jnp.asarray(theta0), optax.sgd(config.meta_lr),
                           config.meta_iterations, run_dir, progress_metric="valid_loss",
                           description="omniglot-sharing")
    summary = {"meta_iterations": config.meta_iterations, "meta_time_s": time.perf_counter() - t0}
    transforms = {"separate": _mixing(0.0, layers), "tied": _mixing(0.0, layers, tied_first=True),
                  "initial": theta0, "learned": np.asarray(result.hypers)}
    data = {"train": _split(tasks, trainval, mean, dtype), "test": test}
    z0 = _init(config, config.meta_iterations)  # an init unseen in meta-training
    arrays = {"examples": pool.images[np.concatenate([r[:15 * config.n_train:config.n_train]
                                                      for r in rows(trainval)])]}
    for name, t in transforms.items():  # one compiled program for the four
        curves = _final(jnp.asarray(t), z0, data, static, chars)
        summary.update({f"{name}_{k}": float(v[-1]) for k, v in curves.items()})
        arrays.update({f"{name}_{k}": v for k, v in curves.items()}, **{f"T_{name}": t})
    summary.update(_sharing(transforms["learned"]))
    run_dir.save_arrays("results", arrays)
    run_dir.write_json("tasks", {"names": pool.names, "characters": chars})
    plot(run_dir.path)
    summary.update(wall_time_s=time.perf_counter() - t0, cpu_time_s=time.process_time() - cpu0)
    return summary


@_plots.styled
def plot(path) -> list[Path]:
    """Re-render sharing, tasks, final_training and meta_curves.png from the run folder."""
    run = _plots.saved(path, "results")
    names = run.run.read_json("tasks")["names"]
    res, out, paths = run.arrays["results"], run.run.figures, []
    labels = [n.split()[0].split("_")[-1][:3] + ("'" if "rotated" in n else "") for n in names]
    layers = ["input", *["middle"] * (len(res["T_learned"]) - 2), "output"]
    fig, axes = _plots.figure(len(layers), 3, width=2.5 * len(layers) + 1.6, height=7.6)
    for r, name in enumerate(("separate", "tied", "learned")):
        for l, layer in enumerate(layers):
            ax = axes[r, l]
            im = ax.imshow(_correlation(res[f"T_{name}"][l]), cmap="RdBu_r", vmin=-1, vmax=1)
            ax.set_xticks(range(10), labels if r == 2 else [], rotation=90, fontsize=7)
            ax.set_yticks(range(10), labels if l == 0 else [], fontsize=7)
            ax.grid(False)
            ax.set_title(f"{layer} weights" if r == 0 else "")
        axes[r, 0].set_ylabel(f"{VARIANTS[name]}\ntest loss {res[f'{name}_test_loss'][-1]:.2f}"
                              f" (paper {PAPER[name][1]:.2f})", fontsize=9)
    fig.colorbar(im, ax=axes, shrink=0.5, label="correlation of two tasks' weights")
    fig.suptitle("Weight sharing between the ten tasks (X' = alphabet X rotated by 90 degrees)")
    _plots.save(fig, out, "sharing", paths)

    fig, ax = _plots.figure(width=8, height=5)
    ax.imshow(res["examples"].reshape(10, 15, 28, 28).transpose(0, 2, 1, 3).reshape(280, 420),
              cmap="binary")
    ax.set(xticks=[], yticks=np.arange(10) * 28 + 14, yticklabels=names,
           title="The ten tasks: one training drawing of each of the first 15 characters")
    ax.grid(False)
    _plots.save(fig, out, "tasks", paths)

    fig, axes = _plots.figure(2, width=10, height=4)
    for ax, split, what in zip(axes, ("train", "test"), ("training", "test")):
        for i, (name, label) in enumerate(VARIANTS.items()):
            ax.plot(res[f"{name}_{split}_loss"], color=f"C{i}", label=label)
        ax.set(xlabel="SGD step t", ylabel=f"{what} loss (mean NLL over tasks, nats)",
               title=f"{what.capitalize()} loss during the final training")
        ax.legend()
    _plots.save(fig, out, "final_training", paths)
    _plots.save(_plots.meta_curves(run.metrics, "ten networks"), out, "meta_curves", paths)
    return paths


EXPERIMENT = Experiment(
    "omniglot-sharing", "Learn how ten Omniglot networks (5 alphabets, each also rotated) "
    "share weights, layer by layer (paper fig. 8-9).", Config, SMOKE, run, plot)
