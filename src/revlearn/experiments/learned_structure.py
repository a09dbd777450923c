"""Learned structure: the regulariser that turns a fully connected layer into a
convolution, made learnable ("convnets are just a fancy form of regularisation
of fully-connected nets; to appear soon: generalisations of convnets").

Model: a tanh net 784 - H - 10 whose H = G * G * C first-layer units sit on a
G x G grid over the 28 x 28 image, C channels per position: unit u = (gy, gx, c)
sits at pixel pos_u = (s gy + s/2, s gx + s/2), s = 28 / G, and its weight
from pixel p is W[p, u]. Every (pixel, unit) pair has a relative offset
d = p - pos_u in [-27, 27]^2. The training loss is

    L_train(w, t) = NLL(w; batch_t)
                    + sum_{p, u} lambda[p - pos_u] W[p, u]^2                  (offset L2)
                    + sum_{u ~ u'} sum_p tau[p - pos_u] (W[p, u] - W[p + pos_u' - pos_u, u'])^2
                    + lambda_out ||W_out||^2

where u ~ u' runs over the pairs of horizontally or vertically neighbouring
units of the same channel (pixels outside the image have no weight, so those
terms are absent). A convnet with kernel k and stride s is the limit
lambda[d] = inf outside the k x k window, tau[d] = inf inside it. Here the
hyperparameters theta = (log lambda [55, 55], log tau [55, 55], log lambda_out;
log space with a soft ceiling at `max_strength`, see `strengths`) start flat
(no structure: a strong uniform L2 `init_l2` and tie `init_tie`, so the
hypergradient has to choose where to relax them) and are learned by
hypergradient descent (Adam) on the validation NLL after T steps of SGD with
momentum, the hypergradient coming from
`revlearn.sgd(..., method=Reversible(...))`. At meta-iteration i the initial
weights and the minibatch order are drawn from key_i = fold_in(PRNGKey(seed), i),
so the hyperparameters must work for any initialisation.

Baselines, same data, same T, batch, alpha and gamma: the same fully connected
net with one global L2 on all weights (lambda = lambda_out = const, tau = 0) and
a convnet (`revlearn.models.convnet`, one strided convolution with the same C
channels on the same G x G grid, then the same dense layer), each with the
global L2 of `l2_grid` (and, for the convnet, the kernel size of
`conv_kernels`) that has the lowest validation loss. Every model is
evaluated on `n_eval` keys (initialisation and minibatch order) never used in
meta-training, metrics averaged over them.
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

from . import _plots
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

__all__ = ["Config", "run", "plot", "EXPERIMENT", "Geometry", "geometry", "structure_penalty",
           "active_counts", "strengths"]

SIDE = 28
N_OFF = 2 * SIDE - 1  # offsets -27 .. 27 along each axis
_SPLITS, _SPLIT_NAMES = tuple(_plots.SPLIT_NAMES), _plots.SPLIT_NAMES


@dataclasses.dataclass(frozen=True)
class Config(MnistConfig):
    """Settings of `learned-structure` (defaults: a few minutes on 2 CPU cores)."""

    grid: int = 7            # G: units on a G x G grid (28 must be a multiple of G)
    channels: int = 4        # C: units per grid position
    n_train: int = 1000
    n_valid: int = 2000
    n_test: int = 5000
    batch_size: int = 100
    steps: int = 100
    lr: float = 0.5
    momentum: float = 0.9
    init_l2: float = 1e-2     # a strong flat start: the hypergradient relaxes it where it hurts
    init_tie: float = 1e-1
    max_strength: float = 1.0  # soft ceiling of every strength (keeps SGD stable at lr 0.5)
    meta_lr: float = 0.4
    meta_iterations: int = 25
    l2_grid: tuple[float, ...] = (0.0, 1e-4, 1e-3, 1e-2)
    conv_kernels: tuple[int, ...] = (5, 9, 13)  # empty: no convnet baseline
    n_eval: int = 3
    clip: float | None = None

    def check(self):
        at_least(self, 1, "grid", "channels", "n_train", "n_valid", "n_test", "batch_size",
                 "steps", "n_eval")
        if SIDE % self.grid:
            fail("grid", self.grid, f"must divide {SIDE} (1, 2, 4, 7, 14 or 28), so the units "
                 "sit on a regular grid over the image", "pass e.g. grid=7 (the default)")
        if self.batch_size > self.n_train:
            fail("batch_size", self.batch_size, f"exceeds n_train={self.n_train}",
                 "pass batch_size <= n_train")
        check_pool(self, "n_train", "n_valid", "n_test")
        check_decay("momentum", self.momentum)
        positive(self, "lr", "meta_lr", "max_strength")
        for name in ("init_l2", "init_tie"):
            check_range(name, getattr(self, name), 0, self.max_strength, lo_open=True,
                        hi_open=True, fix=f"pass a strength in (0, max_strength="
                        f"{self.max_strength}) (it is learned in log space)")
        if any(k < 1 for k in self.conv_kernels):
            fail("conv_kernels", self.conv_kernels, "must list kernel sizes >= 1",
                 "pass e.g. conv_kernels=5,9,13, or conv_kernels= for no convnet baseline")
        if not self.l2_grid or any(not 0 <= g < self.max_strength for g in self.l2_grid):
            fail("l2_grid", self.l2_grid, f"must list L2 strengths in [0, max_strength="
                 f"{self.max_strength})", "pass e.g. l2_grid=0,1e-4,1e-3,1e-2 (the default)")
        at_least(self, 0, "meta_iterations")
        check_clip(self)


SMOKE = Config(grid=7, channels=1, n_train=200, n_valid=200, n_test=200, batch_size=50, steps=6,
               meta_iterations=2, l2_grid=(1e-3,), conv_kernels=(), n_eval=1)


# -- geometry --------------------------------------------------------------------

class Geometry(NamedTuple):
    """Index arrays of the grid of units (numpy; offsets flattened as
    (dy + 27) * 55 + (dx + 27)).

    Attributes:
      grid, channels, stride: G, C, s.
      positions: [G] pixel coordinate of grid row / column g: s g + s // 2.
      l2_index: [784, H] the offset of every (pixel, unit) pair.
      tie_h_index: [28, 28 - s, G, G - 1] the offset (relative to the left unit)
        of every horizontally neighbouring pair at every pixel of the left unit.
      tie_v_index: [28 - s, 28, G - 1, G] the same for vertical pairs.
      l2_count, tie_count: [55, 55] how many terms each offset's strength weighs.
    """

    grid: int
    channels: int
    stride: int
    positions: np.ndarray
    l2_index: np.ndarray
    tie_h_index: np.ndarray
    tie_v_index: np.ndarray
    l2_count: np.ndarray
    tie_count: np.ndarray

    @property
    def hidden(self) -> int:
        return self.grid * self.grid * self.channels


@functools.lru_cache(maxsize=8)
def geometry(grid: int, channels: int) -> Geometry:
    """The geometry of a G x G grid of units with C channels over a 28 x 28 image."""
    s = SIDE // grid
    pos = s * np.arange(grid) + s // 2
    off = np.arange(SIDE)[:, None] - pos[None, :] + SIDE - 1      # [28, G]: p - pos + 27
    # (pixel y, pixel x, unit y, unit x) -> offset index, then channels
    idx = off[:, None, :, None] * N_OFF + off[None, :, None, :]    # [28, 28, G, G]
    l2_index = np.repeat(idx[..., None], channels, axis=-1).reshape(SIDE * SIDE, -1)
    tie_h = idx[:, : SIDE - s, :, : grid - 1]
    tie_v = idx[: SIDE - s, :, : grid - 1, :]
    l2_count = np.bincount(l2_index.ravel(), minlength=N_OFF * N_OFF).reshape(N_OFF, N_OFF)
    tie_count = channels * (np.bincount(tie_h.ravel(), minlength=N_OFF * N_OFF)
                            + np.bincount(tie_v.ravel(), minlength=N_OFF * N_OFF))
    return Geometry(grid, channels, s, pos, l2_index.astype(np.int32),
                    tie_h.astype(np.int32), tie_v.astype(np.int32), l2_count,
                    tie_count.reshape(N_OFF, N_OFF))


def active_counts(geom: Geometry, active: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """How many terms of each offset's L2 and tie strength involve a pixel that is
    non-zero in some training image (`active`: bool [784]); [55, 55] each. Offsets
    with none only ever weigh weights from blank pixels, which the training data
    cannot move, so their hypergradient is (almost) zero."""
    active = np.asarray(active, bool).reshape(-1)
    if active.shape != (SIDE * SIDE,):
        raise ValueError(f"active must have {SIDE * SIDE} pixels, got {active.shape}")
    size = N_OFF * N_OFF
    l2 = np.bincount(geom.l2_index[active].ravel(), minlength=size)
    a2, s, g = active.reshape(SIDE, SIDE), geom.stride, geom.grid
    pair_h = (a2[:, : SIDE - s] | a2[:, s:])[:, :, None, None] & np.ones((1, 1, g, g - 1), bool)
    pair_v = (a2[: SIDE - s, :] | a2[s:, :])[:, :, None, None] & np.ones((1, 1, g - 1, g), bool)
    tie = geom.channels * (np.bincount(geom.tie_h_index[pair_h], minlength=size)
                           + np.bincount(geom.tie_v_index[pair_v], minlength=size))
    return l2.reshape(N_OFF, N_OFF), tie.reshape(N_OFF, N_OFF)


def structure_penalty(w: jax.Array, l2_offset: jax.Array, tie_offset: jax.Array,
                      geom: Geometry) -> jax.Array:
    """The offset L2 plus the tying penalty of a first layer w [784, H] (see the
    module docstring), with strengths l2_offset, tie_offset [55, 55]."""
    g, c, s = geom.grid, geom.channels, geom.stride
    pen = jnp.sum(l2_offset.reshape(-1)[geom.l2_index] * w ** 2)
    w5 = w.reshape(SIDE, SIDE, g, g, c)
    tie = tie_offset.reshape(-1)
    if g > 1:
        dh = w5[:, : SIDE - s, :, : g - 1, :] - w5[:, s:, :, 1:, :]
        dv = w5[: SIDE - s, :, : g - 1, :, :] - w5[s:, :, 1:, :, :]
        pen = pen + jnp.sum(tie[geom.tie_h_index][..., None] * dh ** 2)
        pen = pen + jnp.sum(tie[geom.tie_v_index][..., None] * dv ** 2)
    return pen


# -- the problem -----------------------------------------------------------------

class _Static(NamedTuple):
    """The settings that fix the compiled programs (hashable: a jit static argument)."""

    steps: int
    batch_size: int
    lr: float
    momentum: float
    grid: int
    channels: int
    max_strength: float
    conv_kernel: int

    @classmethod
    def of(cls, config: Config, conv_kernel: int = 5) -> _Static:
        return cls(config.steps, config.batch_size, config.lr, config.momentum, config.grid,
                   config.channels, config.max_strength, conv_kernel)

    @property
    def geom(self) -> Geometry:
        return geometry(self.grid, self.channels)


def _splits(config: Config) -> dict[str, tuple[jax.Array, jax.Array]]:
    pool = rdata.load_mnist(config.data, config.data_dir)
    parts = rdata.split(pool, {"train": config.n_train, "valid": config.n_valid,
                               "test": config.n_test}, config.seed)
    return {k: (jnp.asarray(d.images, jnp.float64), jnp.asarray(d.onehot, jnp.float64))
            for k, d in parts.items()}


def strengths(theta: dict, cap: float) -> dict:
    """{"l2_offset", "tie_offset", "l2_out"} from theta {"log_l2_offset", ...}:
    log space with a soft ceiling, strength = cap * sigmoid(u - log cap)
    = exp(u) / (1 + exp(u) / cap), which is exp(u) while exp(u) << cap and
    never exceeds cap (strong tying at lr alpha would make SGD diverge)."""
    return {k[len("log_"):]: cap * jax.nn.sigmoid(u - math.log(cap)) for k, u in theta.items()}


def _uncap(value: float, cap: float) -> float:
    """The inverse of `strengths` for one value in [0, cap)."""
    if not 0 <= value < cap:
        raise ValueError(f"strength {value} must lie in [0, max_strength={cap})")
    return math.log(value) - math.log1p(-value / cap) if value > 0 else -np.inf


def initial_hypers(config: Config) -> dict:
    """Flat maps: no structure, a fully connected net with L2 init_l2 and tie init_tie."""
    f64 = jnp.float64  # explicit dtypes: a weakly typed leaf would recompile after one update
    cap = config.max_strength
    return {"log_l2_offset": jnp.full((N_OFF, N_OFF), _uncap(config.init_l2, cap), f64),
            "log_tie_offset": jnp.full((N_OFF, N_OFF), _uncap(config.init_tie, cap), f64),
            "log_l2_out": jnp.asarray(_uncap(config.init_l2, cap), f64)}


def global_l2_hypers(l2: float, cap: float) -> dict:
    """The fully connected baseline in the same parameterisation: lambda = l2
    everywhere (first and output layer), no tying."""
    u = _uncap(l2, cap)
    f64 = jnp.float64
    return {"log_l2_offset": jnp.full((N_OFF, N_OFF), u, f64),
            "log_tie_offset": jnp.full((N_OFF, N_OFF), -np.inf, f64),
            "log_l2_out": jnp.asarray(u, f64)}


def _fc_loss(params, h, step, *, static: _Static):
    xb, yb = models.minibatch(h["x"], h["y"], static.batch_size, step, h["key"])
    return (models.nll(models.mlp_apply(params, xb), yb)
            + structure_penalty(params[0]["w"], h["l2_offset"], h["tie_offset"], static.geom)
            + h["l2_out"] * jnp.sum(params[1]["w"] ** 2))


def _fc_init(key, static: _Static):
    return models.mlp_init(key, [SIDE * SIDE, static.geom.hidden, 10], dtype=jnp.float64)


def _train_fc(theta, key, data, static: _Static, method):
    """w_T of the structured fully connected net, from initial weights and a
    minibatch order drawn from `key`."""
    k_init, k_batch = jax.random.split(key)
    h = strengths(theta, static.max_strength)
    x, y = data["train"]
    return revlearn.sgd(functools.partial(_fc_loss, static=static), _fc_init(k_init, static),
                        {**h, "key": k_batch, "x": x, "y": y}, lr=static.lr,
                        momentum=static.momentum, steps=static.steps, method=method)


def _evaluate(params, data, apply) -> dict:
    out = {}
    for name in _SPLITS:
        x, y = data[name]
        logp = apply(params, x)
        out[f"{name}_loss"] = models.nll(logp, y)
        out[f"{name}_error"] = models.error_rate(logp, y).astype(jnp.float64)
    return out


def meta_objective(theta, key, data, static: _Static, method):
    """(validation NLL after training, metrics of w_T)."""
    params = _train_fc(theta, key, data, static, method)
    metrics = _evaluate(params, data, models.mlp_apply)
    return metrics["valid_loss"], metrics


@functools.partial(jax.jit, static_argnames="static")
def _hypergrad(theta, key, data, static: _Static):
    method = revlearn.Reversible(min_momentum=static.momentum)
    (loss, metrics), grads = jax.value_and_grad(meta_objective, has_aux=True)(
        theta, key, data, static, method)
    return loss, grads, metrics


def _mean_and_first(fn, keys):
    metrics, params = jax.lax.map(fn, keys)
    return ({k: jnp.mean(v) for k, v in metrics.items()},
            jax.tree_util.tree_map(lambda a: a[0], params))


@functools.partial(jax.jit, static_argnames="static")
def _retrain_fc(theta, keys, data, static: _Static):
    """(metrics averaged over `keys`, w_T of the first key). Forward only, so the
    plain float training loop (`Unrolled`) does: the same run as `Reversible`'s
    to within rounding, and quicker to compile."""
    def one(key):
        params = _train_fc(theta, key, data, static, revlearn.Unrolled())
        return _evaluate(params, data, models.mlp_apply), params
    return _mean_and_first(one, keys)


def _conv_loss(params, h, step, *, static: _Static):
    xb, yb = models.minibatch(h["x"], h["y"], static.batch_size, step, h["key"])
    logp = models.convnet_apply(params, xb, stride=static.geom.stride)
    return models.nll(logp, yb) + h["l2"] * sum(jnp.sum(layer["w"] ** 2) for layer in params)


@functools.partial(jax.jit, static_argnames="static")
def _retrain_conv(l2, keys, data, static: _Static):
    """The convnet baseline: C channels of k x k filters with stride s (so its
    units sit on the same G x G grid), global L2 `l2` on all weights."""
    apply = functools.partial(models.convnet_apply, stride=static.geom.stride)

    def one(key):
        k_init, k_batch = jax.random.split(key)
        params0 = models.convnet_init(k_init, channels=(static.channels,),
                                      kernel=static.conv_kernel, stride=static.geom.stride,
                                      dtype=jnp.float64)
        x, y = data["train"]
        params = revlearn.sgd(functools.partial(_conv_loss, static=static), params0,
                              {"l2": l2, "key": k_batch, "x": x, "y": y}, lr=static.lr,
                              momentum=static.momentum, steps=static.steps,
                              method=revlearn.Unrolled())
        return _evaluate(params, data, apply), params
    return _mean_and_first(one, keys)


def best_index(valid_losses) -> int:
    """The entry with the lowest finite validation loss (ties: the first)."""
    v = np.asarray(valid_losses, dtype=float)
    if not np.isfinite(v).any():
        raise ValueError(f"no grid point has a finite validation loss: {v.tolist()}")
    return int(np.nanargmin(np.where(np.isfinite(v), v, np.nan)))


# -- run -------------------------------------------------------------------------

def run(config: Config, run_dir: RunDir) -> dict:
    t0 = time.perf_counter()
    data = _splits(config)
    static = _Static.of(config)
    geom = static.geom
    theta0 = initial_hypers(config)

    def hypergrad_fn(theta, iteration):
        return _hypergrad(theta, iteration_key(config.seed, iteration), data, static)

    result = meta_optimize(hypergrad_fn, theta0, optax.adam(config.meta_lr),
                           config.meta_iterations, run_dir, clip=config.clip,
                           progress_metric="valid_loss", description="learned-structure")
    theta = result.hypers
    run_dir.save_arrays("hypers_final", theta)
    t_meta = time.perf_counter() - t0

    n = config.meta_iterations  # keys never used in meta-training
    keys = jnp.stack([iteration_key(config.seed, n + k) for k in range(config.n_eval)])
    rows = {}
    rows["fc_initial"], w_before = _retrain_fc(theta0, keys, data, static)
    rows["learned"], w_after = _retrain_fc(theta, keys, data, static)
    fc_grid = [_retrain_fc(global_l2_hypers(g, config.max_strength), keys, data, static)[0]
               for g in config.l2_grid]
    conv_grid = [_retrain_conv(jnp.asarray(g, jnp.float64), keys, data,
                               _Static.of(config, kernel))[0]
                 for kernel in config.conv_kernels for g in config.l2_grid]
    fc_best = best_index([m["valid_loss"] for m in fc_grid])
    rows["fc_global"] = fc_grid[fc_best]
    if conv_grid:
        conv_best = best_index([m["valid_loss"] for m in conv_grid])
        conv_best_kernel, conv_best_l2 = divmod(conv_best, len(config.l2_grid))
        rows["conv_global"] = conv_grid[conv_best]

    h = strengths(theta, config.max_strength)
    l2_active, tie_active = active_counts(geom, np.asarray(data["train"][0]).max(axis=0) > 0)
    results = {
        "l2_offset": h["l2_offset"], "tie_offset": h["tie_offset"], "l2_out": h["l2_out"],
        "l2_count": l2_active, "tie_count": tie_active,
        "positions": geom.positions, "grid": np.asarray(config.grid),
        "channels": np.asarray(config.channels),
        "init_l2": np.asarray(config.init_l2), "init_tie": np.asarray(config.init_tie),
        "max_strength": np.asarray(config.max_strength),
        "w_before": w_before[0]["w"], "w_after": w_after[0]["w"],
        "l2_grid": np.asarray(config.l2_grid, np.float64),
        "conv_kernels": np.asarray(config.conv_kernels),
        "fc_best": np.asarray(fc_best),
    }
    for k in rows["learned"]:
        results[f"fc_grid_{k}"] = np.asarray([float(m[k]) for m in fc_grid])
        if conv_grid:  # [kernel, l2]
            results[f"conv_grid_{k}"] = np.asarray([float(m[k]) for m in conv_grid]).reshape(
                len(config.conv_kernels), len(config.l2_grid))
        for name, m in rows.items():
            results[f"{name}_{k}"] = np.asarray(float(m[k]))
    run_dir.save_arrays("results", results)

    summary = {"hidden_units": geom.hidden, "n_hyperparameters": 2 * N_OFF * N_OFF + 1,
               "meta_iterations": config.meta_iterations}
    for name, m in rows.items():
        summary[f"test_error_{name}"] = float(m["test_error"])
    for name, m in rows.items():
        summary[f"test_loss_{name}"] = float(m["test_loss"])
    summary["valid_loss_learned"] = float(rows["learned"]["valid_loss"])
    summary["fc_best_l2"] = float(config.l2_grid[fc_best])
    if conv_grid:
        summary["conv_best_kernel"] = int(config.conv_kernels[conv_best_kernel])
        summary["conv_best_l2"] = float(config.l2_grid[conv_best_l2])
    summary.update(locality_summary(results))
    summary["meta_time_s"] = t_meta
    summary["wall_time_s"] = time.perf_counter() - t0
    plot(run_dir.path)
    return summary


def radial_profile(values: np.ndarray, count: np.ndarray, edges=None):
    """Mean of log10(values) over the offsets with count > 0, in bins of the
    offset's length |d| (pixels): (bin centres, means) without empty bins."""
    if edges is None:
        edges = np.arange(0.0, 40.0, 2.0)
    d = np.arange(N_OFF) - (SIDE - 1)
    r = np.hypot(d[:, None], d[None, :])
    ok = count > 0
    logv = np.log10(np.maximum(values, 1e-300))
    centres, means = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = ok & (r >= lo) & (r < hi)
        if sel.any():
            centres.append(0.5 * (lo + hi))
            means.append(float(np.mean(logv[sel])))
    return np.asarray(centres), np.asarray(means)


def locality_summary(res: dict) -> dict:
    """Geometric-mean L2 and tie strengths near (|d| <= 4 px) and far (|d| >= 10 px)
    from the unit, over the offsets that touch a non-blank pixel."""
    d = np.arange(N_OFF) - (SIDE - 1)
    r = np.hypot(d[:, None], d[None, :])
    out = {}
    for name, count in (("l2", res["l2_count"]), ("tie", res["tie_count"])):
        v = np.log(np.asarray(res[f"{name}_offset"], float))
        ok = np.asarray(count) > 0
        out[f"{name}_near_geomean"] = float(np.exp(v[ok & (r <= 4)].mean()))
        out[f"{name}_far_geomean"] = float(np.exp(v[ok & (r >= 10)].mean()))
    return out


# -- plot ------------------------------------------------------------------------

def plot(path) -> list[Path]:
    """Re-render the figures from results.npz and metrics.jsonl."""
    import matplotlib
    from matplotlib.figure import Figure

    rd = RunDir(Path(path))
    res = rd.load_arrays("results")
    metrics = rd.read_metrics()
    out = rd.figures
    paths = []
    extent = (-(SIDE - 1) - 0.5, SIDE - 1 + 0.5, SIDE - 1 + 0.5, -(SIDE - 1) - 0.5)

    # 1. the learned offset maps and their radial profiles
    fig = Figure(figsize=(13, 4.3), layout="constrained")
    ax1, ax2, ax3 = fig.subplots(1, 3)
    for ax, name, title, init in (
            (ax1, "l2", "L2 strength $\\lambda$[d]", float(res["init_l2"])),
            (ax2, "tie", "tying strength $\\tau$[d]", float(res["init_tie"]))):
        vals = np.log10(np.asarray(res[f"{name}_offset"], float))
        masked = np.ma.masked_where(res[f"{name}_count"] == 0, vals)
        cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.75")
        im = ax.imshow(masked, extent=extent, cmap=cmap, interpolation="nearest")
        cb = fig.colorbar(im, ax=ax, shrink=0.85)
        cb.set_label(f"log$_{{10}}$ strength (initial {math.log10(init):.1f})")
        ax.set_xlabel("offset $d_x$ = pixel x $-$ unit x (pixels)")
        ax.set_ylabel("offset $d_y$ = pixel y $-$ unit y (pixels)")
        ax.set_title(f"Learned {title}")
        ax.plot([0], [0], "+", color="w", ms=10, mew=1.5)
    for name, color, label in (("l2", "C0", "L2 $\\lambda$"), ("tie", "C1", "tie $\\tau$")):
        rc, mean = radial_profile(np.asarray(res[f"{name}_offset"], float),
                                  np.asarray(res[f"{name}_count"]))
        ax3.plot(rc, mean, "o-", color=color, label=f"learned {label}")
        ax3.axhline(math.log10(float(res[f"init_{name}"])), color=color, ls=":", lw=1,
                    label=f"initial {label}")
    ax3.set_xlabel("offset length |d| (pixels, bins of 2)")
    ax3.set_ylabel("mean log$_{10}$ strength")
    ax3.set_title("Radial profile of the learned maps")
    ax3.grid(alpha=0.3)
    ax3.legend(fontsize=8)
    g, c = int(res["grid"]), int(res["channels"])
    fig.suptitle(f"Learned regulariser of a fully connected first layer ({g}x{g} grid of units, "
                 f"{c} channel(s) each)\ngrey: offsets that only ever pair a unit with pixels "
                 "blank in every training image (no hypergradient); +: the unit's own position")
    paths.append(out / "offset_maps.png")
    save_figure(fig, paths[-1], dpi=110)

    # 2. example filters before / after
    pos = np.asarray(res["positions"])
    centre = g // 2
    picks = [(centre, centre, ch) for ch in range(min(c, 4))]
    corners = [(1, 1), (1, g - 2), (g - 2, 1), (g - 2, g - 2)] if g >= 4 else [(0, 0)]
    picks += [(gy, gx, 0) for gy, gx in corners]
    picks = list(dict.fromkeys(picks))
    w_b, w_a = np.asarray(res["w_before"]), np.asarray(res["w_after"])
    unit = lambda gy, gx, ch: (gy * g + gx) * c + ch  # noqa: E731
    wmax = float(np.percentile(np.abs(np.concatenate([w_b, w_a])), 99.5)) or 1.0
    fig = Figure(figsize=(1.45 * len(picks) + 1.6, 3.5), layout="constrained")
    axes = fig.subplots(2, len(picks), squeeze=False)
    im = None
    for row, (w, label) in enumerate(((w_b, "before:\ninitial (flat)\nhyperparameters"),
                                      (w_a, "after:\nlearned\nhyperparameters"))):
        for col, (gy, gx, ch) in enumerate(picks):
            ax = axes[row, col]
            im = ax.imshow(w[:, unit(gy, gx, ch)].reshape(SIDE, SIDE), cmap="RdBu_r",
                           vmin=-wmax, vmax=wmax, interpolation="nearest")
            ax.plot([pos[gx]], [pos[gy]], "+", color="k", ms=7)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"unit ({gy},{gx}), ch {ch}", fontsize=9)
        axes[row, 0].set_ylabel(label, fontsize=9)
    fig.colorbar(im, ax=axes, shrink=0.85, label="weight (shared scale)")
    fig.suptitle("First-layer filters after training, same initialisation and minibatch order "
                 "(+: the unit's grid position)")
    paths.append(out / "filters.png")
    save_figure(fig, paths[-1], dpi=110)

    # 3. meta-learning curves against the baselines
    fig = _plots.meta_curves(metrics, "net", {
        label: {k: float(res[f"{name}_{k}"]) for k in ("test_loss", "test_error")}
        for name, label in (("fc_global", "fully connected, best global L2"),
                            ("conv_global", "convnet, best kernel and L2"))
        if f"{name}_test_loss" in res})
    paths.append(out / "meta_curves.png")
    save_figure(fig, paths[-1], dpi=110)
    return paths


EXPERIMENT = register(Experiment(
    name="learned-structure",
    description="Learn per-offset L2 and weight-tying strengths of a fully connected layer "
                "(generalised convnet) and compare with FC and conv baselines.",
    Config=Config, smoke=SMOKE, run=run, plot=plot))
