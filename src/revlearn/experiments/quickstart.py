"""Quickstart: learn a learning-rate schedule and an L2 strength by
hypergradient descent through exactly reversible SGD.

Model: logistic regression on MNIST, w = [{"w": [784, 10], "b": [10]}], w_0 = 0.
Training (T steps of SGD with momentum, minibatch of step t drawn from
key_i = fold_in(PRNGKey(seed), i) at meta-iteration i):

    L_train(w, t) = NLL(w; batch_t) + lambda * ||w||^2
    v_{t+1} = gamma v_t - (1 - gamma) grad L_train(w_t, t),  w_{t+1} = w_t + alpha_t v_{t+1}

Hyperparameters, unconstrained: `log_lr` (log alpha_t, one per step, or, with
`n_freq > 0`, the coefficients c of log alpha = B c on the first n_freq DCT
vectors B of `revlearn.spaces.fourier_basis`) and `log_l2` (log lambda).
Meta-objective: the validation NLL after training, f(theta) = NLL(w_T; valid);
its gradient comes from `revlearn.sgd(..., method=Reversible(...))` and Adam
(optax) updates theta for `meta_iterations` iterations.

The final evaluation retrains with a minibatch order never used during
meta-training (key_N) from the initial and the learned hyperparameters, and
records the training loss at every step.
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
from revlearn.meta import RunDir, iteration_key, meta_optimize

from . import _plots
from ._config import MnistConfig
from ._float import float_train
from ._registry import Experiment
from ._splits import evaluate, mnist_splits
from ._validate import at_least, at_most, check_clip, check_decay, check_pool, check_range, positive

__all__ = ["Config", "run", "plot", "EXPERIMENT"]


@dataclasses.dataclass(frozen=True)
class Config(MnistConfig):
    """Settings of the quickstart (defaults run in about two minutes on 2 CPU cores)."""

    n_train: int = 1000
    n_valid: int = 1000
    n_test: int = 1000
    batch_size: int = 100
    steps: int = 100
    momentum: float = 0.9
    init_lr: float = 0.1
    init_l2: float = 1e-4
    n_freq: int = 0  # 0: one free log-lr per step; k > 0: k smooth DCT coefficients
    meta_lr: float = 0.1
    meta_iterations: int = 40
    clip: float | None = None

    def check(self):
        at_least(self, 1, "n_train", "n_valid", "n_test", "batch_size", "steps")
        at_most(self, "batch_size", "n_train")
        check_pool(self, "n_train", "n_valid", "n_test")
        check_decay("momentum", self.momentum)
        positive(self, "init_lr", "init_l2", why=" (it is learned in log space)")
        check_range("n_freq", self.n_freq, 0, self.steps,
                    fix=f"pass 0 (one free log-lr per step) or k in [1, steps={self.steps}]")
        positive(self, "meta_lr")
        at_least(self, 0, "meta_iterations")
        check_clip(self)

    def basis(self):
        """The DCT basis [steps, n_freq] of the smooth schedule, or None."""
        return spaces.fourier_basis(self.steps, self.n_freq, jnp.float64) if self.n_freq else None


SMOKE = Config(n_train=200, n_valid=200, n_test=200, batch_size=50, steps=10, meta_iterations=3)


# -- the problem -----------------------------------------------------------------

def _initial_hypers(config: Config) -> dict:
    log_lr = jnp.full((config.steps,), math.log(config.init_lr))
    basis = config.basis()
    if basis is not None:
        log_lr = spaces.fit_coeffs(log_lr, basis)
    return {"log_lr": log_lr, "log_l2": jnp.asarray(math.log(config.init_l2))}


def _constrained(theta: dict, basis) -> dict:
    """{"lr": [steps], "l2": scalar} from the unconstrained hyperparameters."""
    log_lr = theta["log_lr"] if basis is None else spaces.smooth_schedule(theta["log_lr"], basis)
    return spaces.constrain({"log_lr": log_lr, "log_l2": theta["log_l2"]})


def _params0():
    return [{"w": jnp.zeros((784, 10), jnp.float64), "b": jnp.zeros((10,), jnp.float64)}]


def _train_loss(params, h, step, *, batch_size):
    xb, yb = models.minibatch(h["x"], h["y"], batch_size, step, h["key"])
    return (models.nll(models.logistic_apply(params, xb), yb)
            + h["l2"] * models.l2_penalty(params, 1.0))


def _evaluate(params, data) -> dict:
    return evaluate(models.logistic_apply, params, data)


@functools.partial(jax.jit, static_argnames="static")
def _hypergrad(theta, key, data, static: Config):
    """(validation loss, d loss / d theta, metrics of the trained weights)."""

    def meta_objective(theta):
        h = _constrained(theta, static.basis())
        x, y = data["train"]
        params = revlearn.sgd(
            functools.partial(_train_loss, batch_size=static.batch_size), _params0(),
            {"l2": h["l2"], "key": key, "x": x, "y": y}, lr=h["lr"],
            momentum=static.momentum, steps=static.steps,
            method=revlearn.Reversible(min_momentum=static.momentum))
        metrics = _evaluate(params, data)
        return metrics["valid_loss"], metrics

    (loss, metrics), grads = jax.value_and_grad(meta_objective, has_aux=True)(theta)
    return loss, grads, metrics


@functools.partial(jax.jit, static_argnames="static")
def _curves(theta, key, data, static: Config):
    """Retrain, recording the full training and validation loss at every step:
    ([steps + 1] train loss, [steps + 1] validation loss, final metrics)."""
    h = _constrained(theta, static.basis())
    x, y = data["train"]

    def losses(w, state, t):
        m = _evaluate(w, data)
        return m["train_loss"], m["valid_loss"]

    w, (tr, va) = float_train(revlearn.optim.momentum(h["lr"], static.momentum),
                              functools.partial(_train_loss, batch_size=static.batch_size),
                              _params0(), {"l2": h["l2"], "key": key, "x": x, "y": y},
                              steps=static.steps, record=losses)
    return tr, va, _evaluate(w, data)


# -- run and plot --------------------------------------------------------------

def run(config: Config, run_dir: RunDir) -> dict:
    t0 = time.perf_counter()
    data = mnist_splits(config, "train", "valid", "test")
    static = config.program()
    theta0 = _initial_hypers(config)

    def hypergrad_fn(theta, iteration):
        return _hypergrad(theta, iteration_key(config.seed, iteration), data, static)

    result = meta_optimize(
        hypergrad_fn, theta0, optax.adam(config.meta_lr), config.meta_iterations,
        run_dir, clip=config.clip, progress_metric="valid_loss", description="quickstart")
    theta = result.hypers
    run_dir.save_arrays("hypers_final", theta)

    key = iteration_key(config.seed, config.meta_iterations)  # an order unseen in meta-training
    tr0, va0, before = _curves(theta0, key, data, static)
    tr1, va1, after = _curves(theta, key, data, static)
    h0, h1 = _constrained(theta0, static.basis()), _constrained(theta, static.basis())
    run_dir.save_arrays("results", {
        "lr_initial": h0["lr"], "lr_learned": h1["lr"],
        "l2_initial": h0["l2"], "l2_learned": h1["l2"],
        "train_loss_before": tr0, "train_loss_after": tr1,
        "valid_loss_before": va0, "valid_loss_after": va1,
    })
    wall = time.perf_counter() - t0
    summary = {
        "meta_iterations": config.meta_iterations,
        "l2_initial": float(h0["l2"]), "l2_learned": float(h1["l2"]),
        "lr_mean_initial": float(jnp.mean(h0["lr"])), "lr_mean_learned": float(jnp.mean(h1["lr"])),
        "wall_time_s": wall,
    }
    for tag, m in (("initial", before), ("learned", after)):
        for k, v in m.items():
            summary[f"{k}_{tag}"] = float(v)
    plot(run_dir.path)
    return summary


@_plots.styled
def plot(path) -> list[Path]:
    """Re-render the three figures from results.npz and metrics.jsonl."""
    run = _plots.saved(path, "results")
    res, out, paths = run.arrays["results"], run.run.figures, []
    steps = np.arange(len(res["lr_initial"]))

    fig, ax = _plots.figure(width=7, height=4.2)
    ax.plot(steps, res["lr_initial"], "--", color="0.5", label="initial (constant)")
    ax.plot(steps, res["lr_learned"], color="C0", lw=2, label="learned")
    lr_all = np.concatenate([res["lr_initial"], res["lr_learned"]])
    log_axis = lr_all.max() / lr_all.min() > 3
    if log_axis:
        _plots.plain_log(ax)
    ax.set_xlabel("SGD step t")
    ax.set_ylabel(r"learning rate $\alpha_t$" + (" (log scale)" if log_axis else ""))
    ax.set_title("Learned learning-rate schedule (logistic regression, MNIST)")
    l2_text = (f"L2 strength $\\lambda$: {float(res['l2_initial']):.2e} (initial) "
               f"$\\to$ {float(res['l2_learned']):.2e} (learned)")
    # in the legend's title, where no curve runs (a free-floating box hid the schedule's dip)
    ax.legend(loc="best", title=l2_text, title_fontsize=9)
    _plots.save(fig, out, "schedule", paths)

    fig, axes = _plots.figure(2, width=10, height=4.2)
    t = np.arange(len(res["train_loss_before"]))
    for ax, key, name in zip(axes, ("train_loss", "valid_loss"), ("training", "validation")):
        ax.plot(t, res[f"{key}_before"], "--", color="0.5", label="initial hyperparameters")
        ax.plot(t, res[f"{key}_after"], color="C0", lw=2, label="learned hyperparameters")
        ax.set_xlabel("SGD step t")
        ax.set_ylabel(f"{name} loss (mean NLL, nats)")
        ax.set_title(f"{name.capitalize()} loss during training")
        _plots.plain_log(ax)
        ax.legend()
    n_train = run.config.get("n_train")
    fig.suptitle("Retraining on a minibatch order unseen during meta-training"
                 + (f" ({n_train} training examples)" if n_train else ""))
    _plots.save(fig, out, "learning_curves", paths)
    _plots.save(_plots.meta_curves(run.metrics), out, "meta_curves", paths)
    return paths


EXPERIMENT = Experiment(
    "quickstart", "Learn a per-step learning-rate schedule and an L2 strength for logistic "
    "regression on MNIST (about 2 minutes).", Config, SMOKE, run, plot)
