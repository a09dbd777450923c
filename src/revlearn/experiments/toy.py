"""The toy picture (paper figure 1): hyperparameter optimisation on a 2-D loss,
and why the training run must be reversed exactly.

Loss: Himmelblau's function, scaled (four minima, f = 0 at each):

    f(w) = ((w1^2 + w2 - 11)^2 + (w1 + w2^2 - 7)^2) / 128

(its gradient is written out by hand so that it has the same bits in the
forward and the reverse pass: see `loss_grad`).

Training: T = 50 steps of SGD with momentum from w_0 (full gradient, no noise),
with a learning rate and a momentum per step:

    v_{t+1} = gamma_t v_t - (1 - gamma_t) grad f(w_t),   w_{t+1} = w_t + alpha_t v_{t+1}

Hyperparameters, unconstrained: `log_lr` [T] (alpha_t = exp) and
`logit_momentum` [T] (gamma_t = sigmoid). Meta-objective: the final loss f(w_T);
its gradient comes from `revlearn.sgd(..., method=Reversible(...))` and Adam
(optax) updates the hyperparameters. Trajectories are drawn at a few
meta-iterations ("snapshots").

Reversal. Beside the forward path w_0 .. w_T (float64), two reversals from the
final state:

* naive: the same update run backwards in float64,
      w_t = w_{t+1} - alpha_t v_{t+1},   v_t = (v_{t+1} + (1 - gamma_t) grad f(w_t)) / gamma_t,
  whose rounding errors are multiplied by 1/gamma_t at every step, so the error
  after reversing to step t grows like prod_{s=t}^{T-1} 1/gamma_s;
* exact: the reversal inside `Reversible`'s backward pass (fixed point plus
  information buffer). Its states are read out through a probe: with
  path_fn(w, probe, t) = probe_t . w and probe = 0, the derivative of the path
  sum with respect to probe_t is the w_t that the backward pass recovered,
  and it costs nothing extra in the hypergradient computation.
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

import revlearn
from revlearn import spaces
from revlearn.exact._grid import on_grid
from revlearn.meta import RunDir, save_figure, meta_optimize

from ._float import float_train
from ._registry import Experiment, register
from ._config import ExperimentConfig
from ._validate import at_least, check_decay, fail, positive

__all__ = ["Config", "run", "plot", "EXPERIMENT", "loss", "loss_grad", "float_forward",
           "naive_reverse", "hypergrad"]


@dataclasses.dataclass(frozen=True)
class Config(ExperimentConfig):
    """Settings of `toy` (the defaults run in seconds)."""

    steps: int = 50
    w0: tuple[float, float] = (-0.27, -1.2)  # just below the local maximum
    init_lr: float = 0.3
    init_momentum: float = 0.5
    min_momentum: float = 0.01  # sizes Reversible's buffer: momentum must stay above it
    meta_lr: float = 0.1
    meta_iterations: int = 30
    snapshots: tuple[int, ...] = (0, 1, 3, 10, 30)

    def check(self):
        at_least(self, 1, "steps")
        positive(self, "init_lr", why=" (it is learned in log space)")
        check_decay("init_momentum", self.init_momentum, example=0.5)
        check_decay("min_momentum", self.min_momentum, example=0.01)
        if self.init_momentum <= self.min_momentum:
            fail("init_momentum", self.init_momentum, f"must exceed min_momentum="
                 f"{self.min_momentum} (Reversible's buffer is sized for momentum >= "
                 "min_momentum)", "raise init_momentum or lower min_momentum")
        positive(self, "meta_lr")
        at_least(self, 0, "meta_iterations")
        if not self.snapshots or any(not 0 <= s <= self.meta_iterations for s in self.snapshots):
            fail("snapshots", self.snapshots, f"must be meta-iterations in [0, meta_iterations="
                 f"{self.meta_iterations}]", "pass e.g. snapshots=0,1,2")


SMOKE = Config(meta_iterations=2, snapshots=(0, 1, 2))


# -- the problem -----------------------------------------------------------------

@jax.custom_jvp
def loss(w):
    """Scaled Himmelblau function of w [2]: ((w1^2 + w2 - 11)^2 + (w1 + w2^2 - 7)^2) / 128."""
    x, y = w[0], w[1]
    return ((x * x + y - 11.0) ** 2 + (x + y * y - 7.0) ** 2) / 128.0


def loss_grad(w):
    """grad f(w) [2], written so that its bits cannot depend on how XLA compiles it.

    Exact reversal recomputes grad f(w_t) in the backward pass, where XLA fuses
    it with the Hessian-vector product; for an elementwise polynomial the
    compiler may then contract a*b + c into a fused multiply-add in one program
    and not in the other, and a one-ulp difference breaks the reversal
    (`ReversibleError`, reversal drift). Every inexact product is therefore
    materialised (`optimization_barrier`) before it is added; the remaining
    products (by 2, 4) and the division by 128 are exact.
    """
    bar = jax.lax.optimization_barrier
    x, y = w[0], w[1]
    a = bar(x * x) + y - 11.0
    b = x + bar(y * y) - 7.0
    return jnp.stack([bar(4.0 * x * a) + 2.0 * b, 2.0 * a + bar(4.0 * y * b)]) / 128.0


@loss.defjvp
def _loss_jvp(primals, tangents):
    (w,), (dw,) = primals, tangents
    return loss(w), jnp.dot(loss_grad(w), dw)


def _loss_fn(w, hypers, step):
    return loss(w)


def _probe_fn(w, hypers, step):
    return jnp.dot(hypers["probe"][step], w)


def _rounded(gamma):
    """Momentum as every revlearn method applies it: round(gamma * 2^16) / 2^16."""
    return on_grid(gamma, revlearn.optim.MOMENTUM)


def initial_hypers(config: Config) -> dict:
    return {"log_lr": jnp.full((config.steps,), math.log(config.init_lr)),
            "logit_momentum": jnp.full((config.steps,),
                                       math.log(config.init_momentum / (1 - config.init_momentum)))}


@functools.partial(jax.jit, static_argnames=("min_momentum",))
def hypergrad(theta, w0, *, min_momentum: float):
    """(f(w_T), d f(w_T) / d theta, the w_t [T, 2] recovered by the exact reversal)."""
    steps = theta["log_lr"].shape[0]

    def objective(theta, probe):
        h = spaces.constrain(theta)
        wT, path = revlearn.sgd(_loss_fn, w0, {"probe": probe}, lr=h["lr"],
                                momentum=h["momentum"], steps=steps, path_fn=_probe_fn,
                                method=revlearn.Reversible(min_momentum=min_momentum))
        return loss(wT) + path  # path = 0 (probe = 0); its derivative reads out w_t

    probe = jnp.zeros((steps, 2), jnp.float64)
    value, (g, recovered) = jax.value_and_grad(objective, argnums=(0, 1))(theta, probe)
    return value, g, recovered


@jax.jit
def float_forward(w0, lr, momentum):
    """The plain float64 forward pass (the momentum rule's float step): w [T+1, 2], v [T+1, 2]."""
    _, (ws, vs) = float_train(revlearn.optim.momentum(lr, momentum), _loss_fn, w0,
                              steps=lr.shape[0], record=lambda w, state, t: (w, state.v))
    return ws, vs


@jax.jit
def naive_reverse(wT, vT, lr, momentum):
    """Run the update backwards in float64 from (w_T, v_T): w [T+1, 2] (index t = step t)."""
    gamma = _rounded(momentum)

    def step(carry, xs):
        w, v = carry
        a, m = xs
        w = w - a * v
        v = (v + (1 - m) * jax.grad(loss)(w)) / m
        return (w, v), w

    _, ws = jax.lax.scan(step, (wT, vT), (lr, gamma), reverse=True)
    return jnp.concatenate([ws, wT[None]])


# -- run -------------------------------------------------------------------------

def run(config: Config, run_dir: RunDir) -> dict:
    t0 = time.perf_counter()
    w0 = jnp.asarray(config.w0, jnp.float64)
    theta0 = initial_hypers(config)

    def hypergrad_fn(theta, iteration):
        value, g, _ = hypergrad(theta, w0, min_momentum=config.min_momentum)
        h = spaces.constrain(theta)
        return value, g, {"final_loss": value, "lr": h["lr"], "momentum": h["momentum"]}

    result = meta_optimize(hypergrad_fn, theta0, optax.adam(config.meta_lr),
                           config.meta_iterations, run_dir, progress_metric="final_loss",
                           description="toy")
    history = {int(r["iteration"]): r for r in result.history}
    final_h = spaces.constrain(result.hypers)

    def hypers_at(i):
        if i == config.meta_iterations:
            return np.asarray(final_h["lr"]), np.asarray(final_h["momentum"])
        return np.asarray(history[i]["lr"]), np.asarray(history[i]["momentum"])

    arrays = {"snapshots": np.asarray(config.snapshots, np.int64),
              "meta_loss": np.asarray([history[i]["meta_loss"] for i in sorted(history)])}
    summary = {}
    for i in config.snapshots:
        lr, mom = hypers_at(i)
        ws, vs = float_forward(w0, jnp.asarray(lr), jnp.asarray(mom))
        naive = naive_reverse(ws[-1], vs[-1], jnp.asarray(lr), jnp.asarray(mom))
        theta = {"log_lr": jnp.log(jnp.asarray(lr)),
                 "logit_momentum": jnp.log(jnp.asarray(mom)) - jnp.log1p(-jnp.asarray(mom))}
        value, _, recovered = hypergrad(theta, w0, min_momentum=config.min_momentum)
        # `hypergrad` already raises unless the reversal is bit-exact; the explicit
        # check (one compilation) is made for the run drawn in the reversal figure.
        check = revlearn.check_reversal(
            _loss_fn, w0, None, lr=jnp.asarray(lr),
            momentum=jnp.asarray(mom), steps=config.steps,
            method=revlearn.Reversible(min_momentum=config.min_momentum)) \
            if i == config.snapshots[0] else None
        exact = np.concatenate([np.asarray(recovered), np.asarray(ws[-1:])])
        arrays[f"snap{i}/lr"] = lr
        arrays[f"snap{i}/momentum"] = mom
        arrays[f"snap{i}/forward"] = np.asarray(ws)
        arrays[f"snap{i}/naive"] = np.asarray(naive)
        arrays[f"snap{i}/exact"] = exact
        if check is not None:
            arrays[f"snap{i}/exact_bitwise"] = np.asarray(check.passed)
            summary["exact_reversal_bit_exact"] = bool(check.passed)
            summary["exact_reversal_max_weight_error_ulps"] = int(check.max_weight_error_ulps)
        naive_err = np.linalg.norm(np.asarray(naive) - np.asarray(ws), axis=1)
        exact_err = np.linalg.norm(exact - np.asarray(ws), axis=1)
        summary[f"final_loss_iter{i}"] = float(loss(ws[-1]))
        summary[f"naive_reversal_error_w0_iter{i}"] = float(naive_err[0])
        summary[f"exact_reversal_max_dev_from_float_path_iter{i}"] = float(exact_err.max())
        summary[f"mean_momentum_iter{i}"] = float(np.mean(mom))
    summary["wall_time_s"] = time.perf_counter() - t0
    run_dir.save_arrays("results", arrays)
    plot(run_dir.path)
    return summary


# -- plot ------------------------------------------------------------------------

def _contours(ax, lo=(-5.0, -5.0), hi=(5.0, 5.0)):
    x = np.linspace(lo[0], hi[0], 300)
    y = np.linspace(lo[1], hi[1], 300)
    X, Y = np.meshgrid(x, y)
    Z = np.asarray(loss(jnp.stack([jnp.asarray(X), jnp.asarray(Y)])))
    cs = ax.contourf(X, Y, np.log10(Z + 1e-3), levels=20, cmap="Greys_r", alpha=0.55)
    ax.contour(X, Y, np.log10(Z + 1e-3), levels=20, colors="0.5", linewidths=0.4)
    return cs


def plot(path) -> list[Path]:
    """Re-render the two figures from results.npz."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    rd = RunDir(Path(path))
    res = rd.load_arrays("results")
    snaps = [int(s) for s in res["snapshots"]]
    cmap = colormaps["plasma"]
    colors = [cmap(0.85 * k / max(1, len(snaps) - 1)) for k in range(len(snaps))]
    paths = []

    fig = Figure(figsize=(13, 5.2), layout="constrained")
    ax1, ax2, ax3 = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.3, 1, 1]})
    paths_w = np.concatenate([res[f"snap{i}/forward"] for i in snaps])
    lo = np.maximum(paths_w.min(0) - 0.7, -5.0)
    hi = np.minimum(paths_w.max(0) + 0.7, 5.0)
    cs = _contours(ax1, lo, hi)
    fig.colorbar(cs, ax=ax1, label=r"$\log_{10}$ (loss + $10^{-3}$)", shrink=0.8)
    for i, c in zip(snaps, colors):
        w = res[f"snap{i}/forward"]
        ax1.plot(w[:, 0], w[:, 1], ".-", color=c, ms=4, lw=1.2,
                 label=f"meta-iteration {i}: final loss {_fmt(w[-1])}")
        ax1.plot(*w[-1], "o", color=c, ms=7, mec="k", mew=0.6)
    w0 = res[f"snap{snaps[0]}/forward"][0]
    n_steps = res[f"snap{snaps[0]}/forward"].shape[0] - 1
    ax1.plot(*w0, "k*", ms=12, label=f"start $w_0$ (circles: $w_{{{n_steps}}}$)")
    ax1.set_xlim(lo[0], hi[0])
    ax1.set_ylim(lo[1], hi[1])
    ax1.set_xlabel("weight $w_1$")
    ax1.set_ylabel("weight $w_2$")
    ax1.set_title(f"Training trajectories ({n_steps} steps, one dot per step)\n"
                  "as the per-step schedules are learned")
    ax1.legend(fontsize=7, loc="lower right")
    steps = np.arange(len(res[f"snap{snaps[0]}/lr"]))
    for i, c in zip(snaps, colors):
        ax2.plot(steps, res[f"snap{i}/lr"], color=c, label=f"meta-iteration {i}")
        ax3.plot(steps, res[f"snap{i}/momentum"], color=c, label=f"meta-iteration {i}")
    ax2.set_yscale("log")
    ax2.set_xlabel("SGD step t")
    ax2.set_ylabel(r"learning rate $\alpha_t$ (log scale)")
    ax2.set_title("Learned learning-rate schedule")
    ax3.set_xlabel("SGD step t")
    ax3.set_ylabel(r"momentum $\gamma_t$")
    ax3.set_title("Learned momentum schedule")
    for ax in (ax2, ax3):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle("Hyperparameter optimisation through exactly reversed training "
                 "(scaled Himmelblau function; meta-objective: final loss)")
    paths.append(rd.figures / "trajectories.png")
    save_figure(fig, paths[-1], dpi=110)

    shown = snaps[0]
    fig = Figure(figsize=(12, 5), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    fw, nv, ex = res[f"snap{shown}/forward"], res[f"snap{shown}/naive"], res[f"snap{shown}/exact"]
    allw = np.concatenate([fw, nv[np.all(np.abs(nv) < 6, axis=1)]])
    lo, hi = allw.min(0) - 0.6, allw.max(0) + 0.6
    _contours(ax1, lo, hi)
    ax1.plot(fw[:, 0], fw[:, 1], "-", color="C0", lw=5, alpha=0.35,
             label="forward path $w_0 \\to w_T$ (float64)")
    ax1.plot(nv[:, 0], nv[:, 1], ".-", color="C3", ms=4, lw=1,
             label="naive float64 reversal $w_T \\to w_0$")
    ax1.plot(ex[:, 0], ex[:, 1], "o", mfc="none", mec="C0", ms=7, mew=1.2, zorder=3,
             label="exact reversal $w_T \\to w_0$ (fixed point + buffer)")
    ax1.plot(*fw[0], "k*", ms=13, zorder=4, label="start $w_0$")
    ax1.set_xlim(lo[0], hi[0])
    ax1.set_ylim(lo[1], hi[1])
    ax1.set_xlabel("weight $w_1$")
    ax1.set_ylabel("weight $w_2$")
    bit = "recovers $w_0, v_0$ bit-for-bit" if bool(res[f"snap{shown}/exact_bitwise"]) \
        else "DID NOT recover $w_0$ exactly"
    ax1.set_title(f"Reversing the training run of meta-iteration {shown}:\nexact reversal {bit}")
    ax1.legend(fontsize=8, loc="lower right")
    t = np.arange(fw.shape[0])
    for i, c in zip(snaps, colors):
        f, n, e = res[f"snap{i}/forward"], res[f"snap{i}/naive"], res[f"snap{i}/exact"]
        err = np.linalg.norm(n - f, axis=1)
        ax2.plot(t, np.maximum(err, 1e-18), ".-", color=c, ms=3,
                 label=f"naive, meta-iteration {i}")
        gam = revlearn.optim.applied(res[f"snap{i}/momentum"], revlearn.optim.MOMENTUM)
        bound = np.finfo(np.float64).eps * np.concatenate([np.cumprod(1 / gam[::-1])[::-1], [1.0]])
        ax2.plot(t, bound, ":", color=c, lw=1)
        if i == snaps[-1]:
            ex_err = np.linalg.norm(e - f, axis=1)
            ax2.plot(t, np.maximum(ex_err, 1e-18), "s", color="C0", ms=3,
                     label="exact reversal vs the float64 path (fixed-point\n"
                           "rounding only; every snapshot alike)")
    ax2.plot([], [], ":", color="0.3",
             label=r"naive bound $\epsilon_{64} \prod_{s \geq t} 1/\gamma_s$ (same colours)")
    ax2.set_yscale("log")
    ax2.set_ylim(1e-19, 1e4)
    ax2.text(0.98, 0.97, "curves leaving the top have diverged", transform=ax2.transAxes,
             ha="right", va="top", fontsize=7, color="0.3")
    ax2.set_xlabel("step t (reversal runs from t = T down to 0)")
    ax2.set_ylabel(r"$\|w_t^{\rm reversed} - w_t^{\rm forward}\|$ (log scale; 0 drawn at 1e-18)")
    ax2.set_title("Error of the reversed state, per step")
    ax2.invert_xaxis()
    ax2.grid(alpha=0.3, which="both")
    ax2.legend(fontsize=7, loc="upper left")
    fig.suptitle("Naive floating-point reversal loses the path; exact reversal retraces it")
    paths.append(rd.figures / "reversal.png")
    save_figure(fig, paths[-1], dpi=110)
    return paths


def _fmt(w) -> str:
    return f"{float(loss(jnp.asarray(w))):.2g}"


EXPERIMENT = register(Experiment(
    name="toy",
    description="Paper figure 1: learned per-step schedules on a 2-D loss, and naive float "
                "reversal against exact reversal (seconds).",
    Config=Config, smoke=SMOKE, run=run, plot=plot))
