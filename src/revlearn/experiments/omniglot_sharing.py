"""Omniglot multitask "architecture learning" (paper Figures 8-9): learn how much ten
networks share, layer by layer, by hypergradient descent through reversible SGD.

Tasks k = 0..9: the five alphabets of `revlearn.data.load_omniglot` and the same
five rotated by 90 degrees (task k + 5 is task k rotated). Per character, of its
20 drawings (drawers, the same for an alphabet and its rotation, drawn with
`seed`) `n_train` are for training and `n_test` for testing; at meta-iteration i
(numpy rng (seed, i)) `n_valid` of each character's training drawings are held out
as the validation set and the rest train. Inputs: ink minus the mean training image.

Model: one MLP per task, 784-hidden-55 (tanh, log-softmax). The trained
parameters are "whitened" weights z_k; task k's weights at layer l are the mix

    w_{k,l} = sum_j T_l[k, j] z_{j,l}        (weights and biases alike)

    L_train(z) = sum_k NLL_k(w_k; train_k) + exp(log_l2) ||z||^2
    z_0 ~ exp(log_init_scale) N(0, I)  (key_i),  T steps of SGD with momentum (full batch)

The hyperparameters are the three 10x10 mixing matrices T_l (L2 and the init scale
stay fixed, as in the paper's script), started at (1 - s) I + s 11^T/10 with
s = init_sharing; meta-objective: mean over tasks of the validation NLL; plain
gradient descent with step meta_lr. Baselines, trained once with the same z_0:
"separate" (T_l = I) and "tied first layer" (T_0 = 11^T/10, T_1 = T_2 = I). All
variants are finally trained on all n_train drawings and scored on the test ones.
The figure shows each layer's sharing as the correlation matrix of T_l T_l^T.
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
from ._config import ExperimentConfig
from ._registry import Experiment
from ._validate import at_least, check_decay, check_range, fail, positive

__all__ = ["Config", "run", "plot", "EXPERIMENT"]

N_OUT = 55  # the paper's output layer: the largest alphabet of Omniglot (here at most 40 used)
PAPER = {"separate": (0.61, 1.34), "tied": (0.90, 1.25), "learned": (0.60, 1.13)}
VARIANTS = {"separate": "separate networks", "tied": "tied first layer",
            "initial": "initial mix (not learned)", "learned": "learned sharing"}


@dataclasses.dataclass(frozen=True)
class Config(ExperimentConfig):
    """Settings (the paper's script except `hidden` and `dtype`: see the results page)."""

    hidden: tuple[int, ...] = (400, 200)
    steps: int = 50
    lr: float = 1.0
    momentum: float = 0.9
    log_l2: float = -4.0
    log_init_scale: float = -2.0
    init_sharing: float = 0.5
    meta_iterations: int = 20
    meta_lr: float = 0.2
    n_train: int = 12  # drawings per character for training (n_valid of them held out)
    n_valid: int = 2
    n_test: int = 3
    dtype: Literal["float32", "float64"] = "float64"

    def check(self):
        at_least(self, 1, "steps", "n_valid", "n_test")
        at_least(self, 0, "meta_iterations")
        if not self.hidden or min(self.hidden) < 1:
            fail("hidden", self.hidden, "must list positive widths", "pass e.g. hidden=400,200")
        if self.n_valid >= self.n_train:
            fail("n_valid", self.n_valid, f"must be < n_train={self.n_train}",
                 "hold out fewer drawings, e.g. n_valid=2")
        if self.n_train + self.n_test > 20:
            fail("n_test", self.n_test, f"with n_train={self.n_train} exceeds the 20 drawings "
                 "of a character", "pass n_train + n_test <= 20")
        check_decay("momentum", self.momentum)
        positive(self, "lr", "meta_lr")
        check_range("init_sharing", self.init_sharing, 0.0, 1.0)


SMOKE = Config(hidden=(16,), steps=4, meta_iterations=2, n_train=3, n_valid=1, n_test=1)


# -- the tasks -----------------------------------------------------------------------

def _tasks(config: Config):
    """(pool, lookup [task, character, drawer] -> row, characters per task, drawer
    orders per alphabet [chars, 20]: the first n_train train, the next n_test test)."""
    pool = rdata.load_omniglot()
    lookup = np.zeros((len(pool.names), pool.character.max() + 1, 20), np.int64)
    lookup[pool.task, pool.character, pool.drawer] = np.arange(len(pool.task))
    chars = tuple(int(pool.character[pool.task == t].max()) + 1 for t in range(len(pool.names)))
    rng = np.random.default_rng(config.seed)
    order = [rng.permuted(np.tile(np.arange(20), (c, 1)), axis=1) for c in chars[:5]]
    return pool, lookup, chars, order


def _rows(tasks, drawers) -> np.ndarray:
    """Pool rows of the drawers [chars, k] of each alphabet, task after task."""
    _, lookup, chars, _ = tasks
    return np.concatenate([lookup[t, np.arange(c)[:, None], drawers[t % 5]].ravel()
                           for t, c in enumerate(chars)])


def _split(tasks, drawers, mean, dtype):
    """(x, one-hot y) of the drawers [chars, k] of each alphabet."""
    pool, rows = tasks[0], _rows(tasks, drawers)
    return (jnp.asarray(pool.images[rows] - mean, dtype),
            jax.nn.one_hot(pool.character[rows], N_OUT, dtype=dtype))


# -- the model -----------------------------------------------------------------------

def _mixing(s: float, identity_layers=(), tied_layers=()) -> np.ndarray:
    """[3, 10, 10]: (1 - s) I + s 11^T/10 per layer (then I / 11^T/10 where listed)."""
    t = np.stack([(1 - s) * np.eye(10) + s * np.full((10, 10), 0.1)] * 3)
    t[list(identity_layers)], t[list(tied_layers)] = np.eye(10), np.full((10, 10), 0.1)
    return t


def _weights(z, transform):
    """Each task's weights: layer l of task k is sum_j transform[l, k, j] z[l][j]."""
    return [{n: jnp.tensordot(t.astype(v.dtype), v, axes=1) for n, v in layer.items()}
            for t, layer in zip(transform, z)]


def _task_scores(w, x, y, chars):
    """[2, tasks]: each task's mean NLL and error rate on its block of (x, y)."""
    per, out, start = x.shape[0] // sum(chars), [], 0
    for k, c in enumerate(chars):
        logp = models.mlp_apply(jax.tree.map(lambda v: v[k], w), x[start:start + c * per])
        yk = y[start:start + c * per]
        out.append(jnp.stack([models.nll(logp, yk), models.error_rate(logp, yk).astype(x.dtype)]))
        start += c * per
    return jnp.stack(out, axis=1)


def _train(transform, key, x, y, static: Config, chars):
    sizes, dtype = [784, *static.hidden, N_OUT], jnp.dtype(static.dtype)
    z0 = jax.vmap(lambda k: models.mlp_init(k, sizes, math.exp(static.log_init_scale), dtype))(
        jax.random.split(key, len(chars)))

    def loss(z, h, step):
        scores = _task_scores(_weights(z, h["T"]), jax.lax.stop_gradient(h["x"]), h["y"], chars)
        return jnp.sum(scores[0]) + math.exp(static.log_l2) * models.l2_penalty(z, 1.0)

    return revlearn.sgd(loss, z0, {"T": transform, "x": x, "y": y}, lr=static.lr,
                        momentum=static.momentum, steps=static.steps,
                        method=revlearn.Reversible(min_momentum=static.momentum))


def _scores(transform, z, data, chars) -> dict:
    w = _weights(z, transform)
    out = {}
    for split, (x, y) in data.items():
        s = jnp.mean(_task_scores(w, x, y, chars), axis=1)
        out[f"{split}_loss"], out[f"{split}_error"] = s[0], s[1]
    return out


@functools.partial(jax.jit, static_argnames=("static", "chars"))
def _hypergrad(transform, key, data, static: Config, chars):
    def objective(transform):
        m = _scores(transform, _train(transform, key, *data["train"], static, chars), data, chars)
        return m["valid_loss"], m

    (loss, metrics), grad = jax.value_and_grad(objective, has_aux=True)(transform)
    return loss, grad, metrics


@functools.partial(jax.jit, static_argnames=("static", "chars"))
def _final(transform, key, data, static: Config, chars):
    return _scores(transform, _train(transform, key, *data["train"], static, chars), data, chars)


# -- run and plot --------------------------------------------------------------------

def _correlation(t: np.ndarray) -> np.ndarray:
    c = t @ t.T
    d = np.sqrt(np.diag(c))
    return c / (d[:, None] * d[None, :])


def run(config: Config, run_dir: RunDir) -> dict:
    t0 = time.perf_counter()
    tasks = _tasks(config)
    pool, lookup, chars, order = tasks
    static, dtype = config.program(), jnp.dtype(config.dtype)
    trainval = [o[:, :config.n_train] for o in order]
    test = [o[:, config.n_train:config.n_train + config.n_test] for o in order]
    mean = pool.images[_rows(tasks, trainval)].mean(axis=0)
    test_data, n = _split(tasks, test, mean, dtype), config.n_train - config.n_valid

    def hypergrad_fn(transform, i):
        rng = np.random.default_rng([config.seed, i])  # each character's held-out drawings
        perm = [np.take_along_axis(o, rng.permuted(np.tile(np.arange(config.n_train), (len(o), 1)),
                                                   axis=1), axis=1) for o in trainval]
        data = {"train": _split(tasks, [p[:, :n] for p in perm], mean, dtype),
                "valid": _split(tasks, [p[:, n:] for p in perm], mean, dtype), "test": test_data}
        return _hypergrad(transform, iteration_key(config.seed, i), data, static, chars)

    result = meta_optimize(hypergrad_fn, jnp.asarray(_mixing(config.init_sharing)),
                           optax.sgd(config.meta_lr), config.meta_iterations, run_dir,
                           progress_metric="valid_loss", description="omniglot-sharing")
    t_meta = time.perf_counter() - t0
    transforms = {"separate": _mixing(0.0), "tied": _mixing(0.0, tied_layers=[0]),
                  "initial": _mixing(config.init_sharing), "learned": np.asarray(result.hypers)}
    data = {"train": _split(tasks, trainval, mean, dtype), "test": test_data}
    key = iteration_key(config.seed, config.meta_iterations)  # an init unseen in meta-training
    summary = {"meta_iterations": config.meta_iterations, "meta_time_s": t_meta}
    for name, t in transforms.items():
        for k, v in _final(jnp.asarray(t), key, data, static, chars).items():
            summary[f"{name}_{k}"] = float(v)
    top = _correlation(transforms["learned"][-1])
    pairs = np.eye(10, k=5, dtype=bool) | np.eye(10, k=-5, dtype=bool)
    summary["top_corr_rotation_pairs"] = float(top[pairs].mean())
    summary["top_corr_other_pairs"] = float(top[~pairs & ~np.eye(10, dtype=bool)].mean())
    run_dir.save_arrays("results", {
        **{f"T_{v}": t for v, t in transforms.items()},
        **{f"test_loss_{v}": summary[f"{v}_test_loss"] for v in transforms},
        "examples": pool.images[lookup[:, :15, 0]]})
    run_dir.write_json("tasks", {"names": pool.names, "characters": chars})
    summary["wall_time_s"] = time.perf_counter() - t0
    plot(run_dir.path)
    return summary


@_plots.styled
def plot(path) -> list[Path]:
    """Re-render sharing.png, tasks.png and meta_curves.png from the run folder."""
    run = _plots.saved(path, "results")
    res, out, paths = run.arrays["results"], run.run.figures, []
    names = run.run.read_json("tasks")["names"]
    labels = [n[:3] + ("'" if "rotated" in n else "") for n in names]
    rows = ["separate", "tied", "learned"]
    fig, axes = _plots.figure(3, 3, width=8.2, height=8.4)
    for r, name in enumerate(rows):
        for l, layer in enumerate(("input", "middle", "output")):
            ax = axes[r, l]
            im = ax.imshow(_correlation(res[f"T_{name}"][l]), cmap="RdBu_r", vmin=-1, vmax=1)
            ax.set_xticks(range(10), labels if r == 2 else [], rotation=90, fontsize=7)
            ax.set_yticks(range(10), labels if l == 0 else [], fontsize=7)
            ax.grid(False)
            if r == 0:
                ax.set_title(f"{layer} weights")
        axes[r, 0].set_ylabel(f"{VARIANTS[name]}\ntest loss {float(res[f'test_loss_{name}']):.2f}")
    fig.colorbar(im, ax=axes, shrink=0.5, label="correlation of the tasks' weights")
    fig.suptitle("Weight sharing between tasks ( ' = rotated by 90 degrees)")
    _plots.save(fig, out, "sharing", paths)

    fig, ax = _plots.figure(width=8, height=5)
    ex = res["examples"].reshape(10, 15, 28, 28)
    ax.imshow(ex.transpose(0, 2, 1, 3).reshape(280, 420), cmap="binary")
    ax.set_yticks(np.arange(10) * 28 + 14, names)
    ax.set_xticks([])
    ax.grid(False)
    ax.set_title("The ten tasks: the first 15 characters of each alphabet (drawer 1)")
    _plots.save(fig, out, "tasks", paths)
    _plots.save(_plots.meta_curves(run.metrics, "ten networks"), out, "meta_curves", paths)
    return paths


EXPERIMENT = Experiment(
    "omniglot-sharing", "Learn how ten Omniglot networks (5 alphabets, each also rotated) "
    "share weights, layer by layer (paper fig. 8-9).", Config, SMOKE, run, plot)
