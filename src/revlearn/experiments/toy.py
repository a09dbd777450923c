"""The toy picture (paper figure 1): hyperparameter optimisation on a 2-D loss,
and why the training run must be reversed exactly.

Loss (the paper's, `experiments/Jan_25_Figure_1`): a tilted Rosenbrock valley
squashed by a sigmoid, w = (w1, w2):

    R(w) = 100 (w2 - w1^2)^2 + (1 - w1)^2 + 200 w1,    f(w) = 800 sigmoid(R(w) / 500)

Training: T steps of SGD with momentum from w_0 = (1.4, 3.9), v_0 = 0, full
gradient, a learning rate and a momentum per step:

    v_{t+1} = gamma_t v_t - (1 - gamma_t) grad f(w_t),   w_{t+1} = w_t + alpha_t v_{t+1}

Hyperparameters, unconstrained: `log_lr` [T] (alpha_t = exp) and
`logit_momentum` [T] (gamma_t = sigmoid). Meta-objective: the final loss f(w_T);
its gradient comes from `revlearn.sgd(..., method=Reversible(...))`, and SGD with
momentum updates theta as the paper's `simple_sgd` does:

    u_{i+1} = mu u_i - (1 - mu) d f(w_T) / d theta_i,   theta_{i+1} = theta_i + eta u_{i+1}

(`optax.sgd(eta (1 - mu), mu)`). The training run of every meta-iteration is drawn.

Reversal (the authors' `Jan_25_Figure_1/4_naive_reverse` setting: constant
alpha, gamma, T_r steps). The run is made forward and then undone,

    w_t = w_{t+1} - alpha_t v_{t+1},   v_t = (v_{t+1} + (1 - gamma_t) grad f(w_t)) / gamma_t,

naively in float16, float32 and float64: the rounding error of every step is
multiplied by 1/gamma_t, so after reversing to step t it is about
eps prod_{s=t}^{T_r-1} 1/gamma_s. The exact reversal is the one inside
`Reversible`'s backward pass (fixed point plus information buffer); its states
are read out through a probe: with path_fn(w, probe, t) = probe_t . w and
probe = 0, d (path sum) / d probe_t is the w_t that the backward pass recovered.
`revlearn.check_reversal` confirms that w_0, v_0 and the buffer come back
bit-for-bit.
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
from matplotlib import colormaps

import revlearn
from revlearn import spaces
from revlearn.exact._grid import on_grid
from revlearn.meta import RunDir, meta_optimize

from . import _plots
from ._config import ExperimentConfig
from ._float import float_train
from ._registry import Experiment
from ._validate import at_least, check_decay, fail, positive

__all__ = ["Config", "run", "plot", "EXPERIMENT", "loss", "hypergrad", "naive_roundtrip",
           "reversible"]

DTYPES = ("float16", "float32", "float64")


@dataclasses.dataclass(frozen=True)
class Config(ExperimentConfig):
    """Settings of `toy`: the paper's figure 1 and its naive-reversal experiment (seconds)."""

    steps: int = 50
    w0: tuple[float, float] = (1.4, 3.9)
    init_log_lr: float = -4.5
    init_momentum: float = 0.99
    meta_lr: float = 0.01  # the paper's simple_sgd step
    meta_momentum: float = 0.9
    meta_iterations: int = 3
    reverse_steps: int = 46
    reverse_log_lr: float = -5.5
    reverse_momentum: float = 0.8
    min_momentum: float = 0.5  # sizes Reversible's buffer: momentum must stay above it

    def check(self):
        at_least(self, 1, "steps", "reverse_steps")
        at_least(self, 0, "meta_iterations")
        positive(self, "meta_lr")
        for name in ("init_momentum", "meta_momentum", "reverse_momentum", "min_momentum"):
            check_decay(name, getattr(self, name))
        for name in ("init_momentum", "reverse_momentum"):
            if getattr(self, name) <= self.min_momentum:
                fail(name, getattr(self, name), f"must exceed min_momentum={self.min_momentum} "
                     "(Reversible's buffer is sized for momentum >= min_momentum)",
                     f"raise {name} or lower min_momentum")


SMOKE = Config(steps=10, meta_iterations=2, reverse_steps=10)


# -- the problem -----------------------------------------------------------------

def loss(w):
    """f(w) = 800 sigmoid(R(w) / 500) of w [2]."""
    x, y = w[0], w[1]
    return 800.0 * jax.nn.sigmoid((100.0 * (y - x * x) ** 2 + (1.0 - x) ** 2 + 200.0 * x) / 500.0)


def _loss_fn(w, hypers, step):
    return loss(w)


def _probe_fn(w, hypers, step):
    return jnp.dot(hypers["probe"][step], w)


def reversible(min_momentum: float) -> revlearn.Reversible:
    """Exact reversal with the backward gradient the forward pass's own computation (the CPU
    default rounded this elementwise gradient differently in the two passes: see the page)."""
    return revlearn.Reversible(min_momentum=min_momentum, vjp_in_branch=False)


def _theta(lr, momentum) -> dict:
    lr, momentum = jnp.asarray(lr, jnp.float64), jnp.asarray(momentum, jnp.float64)
    return {"log_lr": jnp.log(lr), "logit_momentum": jnp.log(momentum) - jnp.log1p(-momentum)}


@functools.partial(jax.jit, static_argnames=("min_momentum",))
def hypergrad(theta, w0, *, min_momentum: float):
    """(f(w_T), d f(w_T) / d theta, the w_t [T, 2] recovered by the exact reversal)."""
    steps = theta["log_lr"].shape[0]

    def objective(theta, probe):
        h = spaces.constrain(theta)
        wT, path = revlearn.sgd(_loss_fn, w0, {"probe": probe}, lr=h["lr"],
                                momentum=h["momentum"], steps=steps, path_fn=_probe_fn,
                                method=reversible(min_momentum))
        return loss(wT) + path  # path = 0 (probe = 0); its derivative reads out w_t

    probe = jnp.zeros((steps, 2), jnp.float64)
    value, (g, recovered) = jax.value_and_grad(objective, argnums=(0, 1))(theta, probe)
    return value, g, recovered


@jax.jit
def forward_path(w0, lr, momentum):
    """w_0 .. w_T [T+1, 2] in float64 (the momentum rule's own float step)."""
    return float_train(revlearn.optim.momentum(lr, momentum), _loss_fn, w0, steps=lr.shape[0],
                       record=lambda w, state, t: w)[1]


@functools.partial(jax.jit, static_argnames="dtype")
def naive_roundtrip(w0, lr, momentum, dtype: str):
    """Train forward and undo it step by step, all in `dtype`, with the momentum on the
    grid every revlearn method uses: (forward w [T+1, 2], reversed w [T+1, 2])."""
    dt = jnp.dtype(dtype)
    a, m = lr.astype(dt), on_grid(momentum, revlearn.optim.MOMENTUM).astype(dt)

    def fwd(carry, xs):
        w, v = carry
        v = xs[1] * v - (1 - xs[1]) * jax.grad(loss)(w)
        return (w + xs[0] * v, v), w + xs[0] * v

    def bwd(carry, xs):
        w, v = carry
        w = w - xs[0] * v
        return (w, (v + (1 - xs[1]) * jax.grad(loss)(w)) / xs[1]), w

    w0 = w0.astype(dt)
    (wT, vT), ws = jax.lax.scan(fwd, (w0, jnp.zeros_like(w0)), (a, m))
    back = jax.lax.scan(bwd, (wT, vT), (a, m), reverse=True)[1]
    return jnp.concatenate([w0[None], ws]), jnp.concatenate([back, wT[None]])


# -- run -------------------------------------------------------------------------

def run(config: Config, run_dir: RunDir) -> dict:
    t0 = time.perf_counter()
    w0 = jnp.asarray(config.w0, jnp.float64)
    theta0 = _theta(jnp.full(config.steps, math.exp(config.init_log_lr)),
                    jnp.full(config.steps, config.init_momentum))

    def hypergrad_fn(theta, iteration):
        value, g, _ = hypergrad(theta, w0, min_momentum=config.min_momentum)
        h = spaces.constrain(theta)
        return value, g, {"final_loss": value, "lr": h["lr"], "momentum": h["momentum"]}

    meta_opt = optax.sgd(config.meta_lr * (1 - config.meta_momentum), config.meta_momentum)
    result = meta_optimize(hypergrad_fn, theta0, meta_opt, config.meta_iterations, run_dir,
                           progress_metric="final_loss", description="toy")
    arrays, summary = {}, {}
    for i, h in enumerate(sorted(result.history, key=lambda r: r["iteration"])
                          + [spaces.constrain(result.hypers)]):  # + after the last update
        lr, mom = np.asarray(h["lr"]), np.asarray(h["momentum"])
        path = np.asarray(forward_path(w0, jnp.asarray(lr), jnp.asarray(mom)))
        arrays.update({f"meta{i}/lr": lr, f"meta{i}/momentum": mom, f"meta{i}/path": path})
        summary[f"final_loss_meta{i}"] = float(loss(path[-1]))
        summary[f"w_T_meta{i}"] = [round(float(c), 4) for c in path[-1]]

    # the reversal experiment
    lr = jnp.full(config.reverse_steps, math.exp(config.reverse_log_lr))
    mom = jnp.full(config.reverse_steps, config.reverse_momentum)
    recovered, f64 = hypergrad(_theta(lr, mom), w0, min_momentum=config.min_momentum)[2], \
        np.asarray(forward_path(w0, lr, mom))
    exact = np.concatenate([np.asarray(recovered), f64[-1:]])
    check = revlearn.check_reversal(_loss_fn, w0, None, lr=lr, momentum=mom,
                                    steps=config.reverse_steps,
                                    method=reversible(config.min_momentum))
    arrays.update({"reverse/exact": exact, "reverse/momentum": np.asarray(mom),
                   "reverse/bit_exact": np.asarray(check.passed), "reverse/float64_path": f64})
    summary.update({"exact_reversal_bit_exact": bool(check.passed),
                    "exact_reversal_max_weight_error_ulps": int(check.max_weight_error_ulps)})
    for dt in DTYPES:
        fw, back = (np.asarray(a, np.float64) for a in naive_roundtrip(w0, lr, mom, dt))
        arrays.update({f"reverse/{dt}_forward": fw, f"reverse/{dt}_naive": back})
        summary[f"naive_{dt}_error_at_w0"] = float(np.linalg.norm(back[0] - fw[0]))
    summary["exact_max_dev_from_float64_path"] = float(np.abs(exact - f64).max())
    summary["wall_time_s"] = time.perf_counter() - t0
    run_dir.save_arrays("results", arrays)
    plot(run_dir.path)
    return summary


# -- plot ------------------------------------------------------------------------

def _contours(ax, *paths, margin=0.3):
    """Loss contours in a window round the paths (finite points within 50 of 0)."""
    allw = np.concatenate([p[np.all(np.abs(p) < 50, axis=1)] for p in paths])
    lo, hi = allw.min(0) - margin, allw.max(0) + margin
    X, Y = np.meshgrid(np.linspace(lo[0], hi[0], 300), np.linspace(lo[1], hi[1], 300))
    Z = np.asarray(jax.vmap(jax.vmap(loss))(jnp.stack([X, Y], -1)))
    cs = ax.contourf(X, Y, Z, levels=np.linspace(0, 800, 17), cmap="Greys_r", alpha=0.5)
    ax.contour(X, Y, Z, levels=np.linspace(0, 800, 17), colors="0.55", linewidths=0.4)
    ax.set(xlim=(lo[0], hi[0]), ylim=(lo[1], hi[1]), xlabel="weight $w_1$", ylabel="weight $w_2$")
    return cs


@_plots.styled
def plot(path) -> list[Path]:
    """Re-render the two figures from results.npz."""
    run = _plots.saved(path, "results")
    res, out, paths = run.arrays["results"], run.run.figures, []
    n = len([k for k in res if k.endswith("/path") and k.startswith("meta")])
    colors = [colormaps["plasma"](0.85 * k / max(1, n - 1)) for k in range(n)]

    fig, (ax1, ax2, ax3) = _plots.figure(3, width=15, height=5.2,
                                         gridspec_kw={"width_ratios": [1.4, 1, 1]})
    paper_window = np.array([[-1, 0], [2.4, 4.5]]) + [[0.3, 0.3], [-0.3, -0.3]]
    fig.colorbar(_contours(ax1, paper_window, *(res[f"meta{i}/path"] for i in range(n))),
                 ax=ax1, label="loss f(w)", shrink=0.85)
    for i, c in enumerate(colors):
        w = res[f"meta{i}/path"]
        last = i == n - 1 and n > 1
        ax1.plot(w[:, 0], w[:, 1], ".--" if last else ".-", color=c, ms=4, lw=1.3,
                 label=f"meta-iteration {i}{' (after the last update)' if last else ''}: "
                       f"f(w_T) = {float(loss(jnp.asarray(w[-1]))):.0f}")
        ax1.plot(*w[-1], "o", color=c, ms=8, mec="k", mew=0.7)
        for ax, key in ((ax2, "lr"), (ax3, "momentum")):
            ax.plot(res[f"meta{i}/{key}"], "--" if last else "-", color=c,
                    label=f"meta-iteration {i}")
    steps = len(res["meta0/lr"])
    ax1.plot(*res["meta0/path"][0], "k*", ms=14, label=f"start $w_0$ (circles: $w_{{{steps}}}$)")
    ax1.set_title(f"Training runs ({steps} steps, one dot per step) as the\n"
                  "per-step learning rates and momenta are learned")
    ax1.legend(loc="upper left", fontsize=7)
    for ax, what in ((ax2, r"learning rate $\alpha_t$"), (ax3, r"momentum $\gamma_t$")):
        ax.set(xlabel="SGD step t", ylabel=what, title=f"Schedule: {what}")
        ax.legend()
    fig.suptitle("Hyperparameter optimisation through exactly reversed training "
                 "(the paper's figure 1; meta-objective: the final training loss)")
    _plots.save(fig, out, "trajectories", paths)

    fig, (ax1, ax2) = _plots.figure(2, width=13, height=5.2)
    f64, ex = res["reverse/float64_path"], res["reverse/exact"]
    fw16, nv16 = res["reverse/float16_forward"], res["reverse/float16_naive"]
    _contours(ax1, f64, fw16, nv16)
    ax1.plot(fw16[:, 0], fw16[:, 1], "-", color="C0", lw=5, alpha=0.35,
             label="forward run $w_0 \\to w_T$ (float16)")
    ax1.plot(nv16[:, 0], nv16[:, 1], ".-", color="C1", ms=4, lw=1,
             label="naive float16 reversal $w_T \\to w_0$")
    ax1.plot(ex[:, 0], ex[:, 1], "o", mfc="none", mec="k", ms=6, mew=1, zorder=3,
             label="exact reversal $w_T \\to w_0$ of the run in fixed point")
    ax1.plot(*f64[0], "k*", ms=14, zorder=4, label="start $w_0$")
    bit = "recovers $w_0, v_0$ bit-for-bit" if bool(res["reverse/bit_exact"]) \
        else "DID NOT recover $w_0$ exactly"
    ax1.set_title(f"Undoing {len(f64) - 1} steps ($\\gamma$ = "
                  f"{float(res['reverse/momentum'][0]):g}): exact reversal {bit}")
    ax1.legend(loc="upper left", fontsize=7)
    t = np.arange(len(f64))
    gam = revlearn.optim.applied(res["reverse/momentum"], revlearn.optim.MOMENTUM)
    growth = np.concatenate([np.cumprod(1 / gam[::-1])[::-1], [1.0]])
    for k, dt in enumerate(DTYPES):
        err = np.linalg.norm(res[f"reverse/{dt}_naive"] - res[f"reverse/{dt}_forward"], axis=1)
        ax2.plot(t, np.maximum(err, 1e-18), "o-", color=f"C{k + 1}", ms=3,
                 label=f"naive {dt} reversal")
        ax2.plot(t, np.finfo(dt).eps * growth, ":", color=f"C{k + 1}", lw=1.2)
    ax2.plot(t, np.maximum(np.linalg.norm(ex - f64, axis=1), 1e-18), "s", color="k", ms=3,
             label="exact reversal vs the float64 run\n(fixed-point vs float rounding)")
    ax2.plot([], [], ":", color="0.3", label=r"$\epsilon \prod_{s \geq t} 1/\gamma_s$ per dtype")
    ax2.set_yscale("log")
    ax2.set(ylim=(1e-19, 1e2), xlabel="step t (the reversal runs from t = T down to 0)",
            ylabel=r"$\|w_t^{\rm reversed} - w_t^{\rm forward}\|$ (log scale; 0 drawn at 1e-18)",
            title="Error of the reversed state, per step")
    ax2.invert_xaxis()
    ax2.legend(loc="upper left", fontsize=7)
    fig.suptitle("Naive floating-point reversal loses the path; exact reversal retraces it")
    _plots.save(fig, out, "reversal", paths)
    return paths


EXPERIMENT = Experiment(
    "toy", "Paper figure 1: learned per-step schedules on the paper's 2-D loss, and naive "
    "float16/32/64 reversal against exact reversal (seconds).", Config, SMOKE, run, plot)
