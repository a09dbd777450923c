"""The meta-optimisation loop: optax on unconstrained hyperparameters, with
clipping, a chaos detector, per-iteration metrics and exact resume.

For i = start .. iterations - 1:

    meta_loss_i, g_i, m_i = hypergrad_fn(theta_i, i)       # theta unconstrained
    u_i, s_{i+1} = optimizer.update(clip(g_i), s_i, theta_i)
    theta_{i+1} = theta_i + u_i
    metrics.jsonl  <- {iteration: i, meta_loss, hypergrad_norm, chaos, wall_time_s,
                       **m_i, **evaluate(theta_i)}
    checkpoint.npz <- (theta_{i+1}, s_{i+1}, i + 1, ||g_0|| .. ||g_i||)   (atomic)

`hypergrad_fn` must be a deterministic function of (theta, i), e.g. drawing its
randomness from `iteration_key(seed, i)`. Then a run killed at any point and
restarted with `resume=True` reloads the last checkpoint, drops the metrics
lines beyond it, and ends with hyperparameters bit-identical to an
uninterrupted run.

Chaos detector: the meta-gradient norm ||g_i|| (before clipping) is compared
with the median of the previous `chaos_window` norms; if
||g_i|| > chaos_threshold * median (after `chaos_warmup` iterations), or it is
not finite, the record gets `"chaos": true` and a `ChaosWarning` is issued.
This is the notebook's "edge of chaos": the loss stays smooth while its
hypergradient explodes, a sign that the meta-step or the horizon is too large.
A non-finite meta-loss or hypergradient stops the run with FloatingPointError
(the last good checkpoint is kept).
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ._rundir import RunDir

__all__ = ["meta_optimize", "MetaResult", "ChaosWarning", "is_chaotic", "chaos_flags"]


class ChaosWarning(RuntimeWarning):
    """The meta-gradient norm exploded relative to its running median."""


class MetaResult(NamedTuple):
    """What `meta_optimize` returns.

    Attributes:
      hypers: the final unconstrained hyperparameters theta_N.
      opt_state: the optimiser state after the last update.
      history: the metrics records of every iteration 0 .. N-1 (those loaded
        from metrics.jsonl on resume included).
      resumed_from: the iteration the run (re)started from (0 if fresh).
    """

    hypers: Any
    opt_state: Any
    history: list
    resumed_from: int


def is_chaotic(history: Sequence[float], norm: float, *, threshold: float = 10.0,
               window: int = 10, warmup: int = 3) -> bool:
    """Whether a meta-gradient norm exploded relative to the recent ones.

    Args:
      history: the previous norms (non-finite entries are ignored).
      norm: the new norm.
      threshold: flag a norm above this many times the median.
      window: the median is taken over the last `window` finite entries of `history`.
      warmup: entries needed before comparing; before that only non-finite norms are
        flagged.

    Returns:
      True if `norm` is not finite or exceeds `threshold` times that median.

    Example:
        ```python
        revlearn.meta.is_chaotic([1.0, 1.2, 0.9, 1.1], 50.0)    # True
        ```
    """
    if not np.isfinite(norm):
        return True
    past = np.asarray([h for h in list(history)[-window:] if np.isfinite(h)], dtype=float)
    if past.size < max(warmup, 1):
        return False
    return bool(norm > threshold * np.median(past))


def chaos_flags(norms: Sequence[float], *, threshold: float = 10.0, window: int = 10,
                warmup: int = 3) -> np.ndarray:
    """`is_chaotic` applied along a whole sequence of norms (each against those before it).

    Args:
      norms: the meta-gradient norms, in order.
      threshold: as `is_chaotic`.
      window: as `is_chaotic`.
      warmup: as `is_chaotic`.

    Returns:
      A bool numpy array [len(norms)].

    Example:
        ```python
        flags = revlearn.meta.chaos_flags([r["hypergrad_norm"] for r in result.history])
        ```
    """
    norms = [float(n) for n in norms]
    return np.array([is_chaotic(norms[:i], n, threshold=threshold, window=window, warmup=warmup)
                     for i, n in enumerate(norms)], dtype=bool)


_global_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm


def _scalar(x) -> float:
    arr = np.asarray(x)
    if arr.size != 1:
        raise ValueError(f"expected a scalar, got an array of shape {arr.shape}")
    return float(arr.reshape(()))


def _metrics(d: Mapping[str, Any] | None, where: str) -> dict:
    if d is None:
        return {}
    if not isinstance(d, Mapping):
        raise TypeError(f"{where} must return a dict of metrics, got {type(d).__name__}")
    out = {}
    for k, v in d.items():
        arr = np.asarray(v)
        out[str(k)] = arr.item() if arr.size == 1 else arr.tolist()
    return out


def _status(record: dict, metric: str) -> str:
    parts = []
    for key in (metric, "meta_loss", "hypergrad_norm"):
        if key in record and not any(key == p.split("=")[0] for p in parts):
            v = record[key]
            parts.append(f"{key}={v:.4g}" if isinstance(v, float) else f"{key}={v}")
    return "  ".join(parts)


def _progress(enabled: bool):
    if not enabled:
        return None
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(bar_width=20),
                    MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"),
                    TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
                    console=Console(stderr=True, width=None if sys.stderr.isatty() else 160),
                    transient=False)


def meta_optimize(
    hypergrad_fn: Callable[[Any, int], tuple[Any, Any, Mapping[str, Any] | None]],
    hypers0: Any,
    optimizer: optax.GradientTransformation,
    iterations: int,
    run_dir: RunDir | None,
    *,
    clip: float | None = None,
    chaos_threshold: float = 10.0,
    chaos_window: int = 10,
    chaos_warmup: int = 3,
    evaluate: Callable[[Any], Mapping[str, Any]] | None = None,
    progress: bool | None = None,
    progress_metric: str = "meta_loss",
    description: str = "meta-optimisation",
    resume: bool | None = None,
) -> MetaResult:
    """Minimise a meta-objective over unconstrained hyperparameters with optax.

    Args:
      hypergrad_fn: `hypergrad_fn(hypers, iteration) -> (meta_loss, grads,
        metrics)`, `grads` a pytree like `hypers`, `metrics` a dict of scalars
        (or None). Must be deterministic given its arguments. Jit it yourself.
      hypers0: the initial unconstrained hyperparameters (a pytree of float arrays).
      optimizer: any `optax.GradientTransformation`, e.g. `optax.adam(0.05)`.
      iterations: N, the total number of meta-iterations (including any done
        before a resume).
      run_dir: where metrics.jsonl and checkpoint.npz go; None keeps nothing on
        disk (and cannot resume).
      clip: if set, gradients are clipped to this global norm
        (`optax.clip_by_global_norm`) before the optimiser sees them.
      chaos_threshold: the chaos detector flags a norm above this many times the
        running median (see the module docstring and `is_chaotic`).
      chaos_window: how many previous norms the median is taken over.
      chaos_warmup: iterations before the detector compares (only non-finite norms
        are flagged before).
      evaluate: optional `evaluate(hypers) -> dict` of extra metrics (train /
        validation / test loss and error, ...) for theta_i, merged into
        record i.
      progress: show a rich progress bar (on stderr) with `progress_metric`;
        None means `run_dir.progress` (True without a run_dir).
      progress_metric: the metrics key shown beside the bar.
      description: the bar's label.
      resume: continue from run_dir's checkpoint if there is one (fresh start
        otherwise); None means `run_dir.resume`. If False, an existing
        checkpoint and metrics.jsonl are overwritten.

    Returns:
      A `MetaResult(hypers, opt_state, history, resumed_from)`.

    Raises:
      FloatingPointError: the meta-loss or the hypergradient is not finite (the last
        good checkpoint is kept).
      ValueError: `iterations` < 0, `clip` <= 0, `resume=True` without a run_dir,
        non-finite `hypers0`, a checkpoint that does not match these hyperparameters, or
        a meta-loss that is not a scalar.
      TypeError: `hypergrad_fn` or `evaluate` returned metrics that are not a dict.

    Example:
        ```python
        @jax.jit
        def hypergrad_fn(hypers, i):
            loss, grads = jax.value_and_grad(validation_loss)(hypers)
            return loss, grads, None

        result = revlearn.meta.meta_optimize(hypergrad_fn, {"log_lr": jnp.log(0.1)},
                                             optax.adam(0.05), 30, RunDir("runs/lr"))
        result.hypers, result.history[-1]["meta_loss"]
        ```
    """
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"iterations={iterations!r} must be an int >= 0")
    if clip is not None and not clip > 0:
        raise ValueError(f"clip={clip!r} must be None or a positive global norm")
    if resume is None:
        resume = run_dir.resume if run_dir is not None else False
    if progress is None:
        progress = run_dir.progress if run_dir is not None else True
    if resume and run_dir is None:
        raise ValueError("resume=True needs a run_dir to resume from")

    tx = optimizer if clip is None else optax.chain(optax.clip_by_global_norm(clip), optimizer)
    hypers = jax.tree_util.tree_map(jnp.asarray, hypers0)
    opt_state = tx.init(hypers)

    @jax.jit
    def update(grads, opt_state, hypers):
        updates, opt_state = tx.update(grads, opt_state, hypers)
        return optax.apply_updates(hypers, updates), opt_state

    start, norms, history = 0, [], []
    bad = _nonfinite_leaves(hypers)
    if bad:
        raise ValueError(f"hypers0 has non-finite values in {', '.join(bad)}; start from "
                         "finite hyperparameters")
    if run_dir is not None:
        loaded = _load_checkpoint(run_dir, hypers, opt_state) if resume else None
        if loaded is not None:
            hypers, opt_state, start, norms = loaded
            if start > iterations:
                raise ValueError(f"{run_dir.path} holds a checkpoint after {start} iterations, "
                                 f"more than iterations={iterations}")
        run_dir.truncate_metrics(start)
        history = run_dir.read_metrics()

    bar = _progress(progress)
    task = None
    if bar is not None:
        bar.start()
        task = bar.add_task(description, total=iterations, completed=start,
                            status=_status(history[-1], progress_metric) if history else "")
    try:
        for i in range(start, iterations):
            t0 = time.perf_counter()
            meta_loss, grads, metrics = hypergrad_fn(hypers, i)
            meta_loss = _scalar(meta_loss)
            norm = _scalar(_global_norm(grads))
            record = {"iteration": i, "meta_loss": meta_loss, "hypergrad_norm": norm}
            record.update(_metrics(metrics, "hypergrad_fn"))
            if evaluate is not None:
                record.update(_metrics(evaluate(hypers), "evaluate"))
            chaos = is_chaotic(norms, norm, threshold=chaos_threshold, window=chaos_window,
                               warmup=chaos_warmup)
            record["chaos"] = chaos
            finite = np.isfinite(meta_loss) and np.isfinite(norm)
            if finite:
                new_hypers, new_state = update(grads, opt_state, hypers)
                bad = ([f"hypers{k}" for k in _nonfinite_leaves(new_hypers)]
                       + [f"opt_state{k}" for k in _nonfinite_leaves(new_state)])
                if bad:
                    raise FloatingPointError(
                        f"meta-iteration {i}: the meta-optimiser's update made {bad[0]} "
                        "non-finite (from a finite hypergradient); the hyperparameters were "
                        "not updated and the checkpoint of the previous iteration is kept. "
                        "Check the meta learning rate and the optimiser's settings.")
                hypers, opt_state = new_hypers, new_state
            record["wall_time_s"] = time.perf_counter() - t0
            if chaos:
                past = np.median(norms[-chaos_window:]) if norms else float("nan")
                warnings.warn(
                    f"meta-iteration {i}: hypergradient norm {norm:.3g} is more than "
                    f"{chaos_threshold:g}x the median {past:.3g} of the last "
                    f"{min(len(norms), chaos_window)} iterations (chaotic regime); consider a "
                    "smaller meta-step, gradient clipping (clip=...) or fewer SGD steps",
                    ChaosWarning, stacklevel=2)
            if run_dir is not None:
                run_dir.append_metrics(record)
            history.append(record)
            if not finite:
                raise FloatingPointError(
                    f"meta-iteration {i}: meta-loss {meta_loss} / hypergradient norm {norm} is "
                    "not finite; the hyperparameters were not updated and the checkpoint of "
                    "the previous iteration is kept. Lower the meta learning rate, clip the "
                    "hypergradient, or shorten the training run.")
            norms.append(norm)
            if run_dir is not None:
                _save_checkpoint(run_dir, hypers, opt_state, i + 1, norms)
            if bar is not None:
                bar.update(task, advance=1, status=_status(record, progress_metric))
    finally:
        if bar is not None:
            bar.stop()
    return MetaResult(hypers, opt_state, history, start)


def _nonfinite_leaves(tree) -> list[str]:
    """The key paths of the inexact leaves of `tree` that hold a NaN or an infinity."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        arr = np.asarray(leaf)
        if arr.dtype.kind in "fc" and not np.all(np.isfinite(arr)):
            out.append(jax.tree_util.keystr(path) or "the value")
    return out


def _save_checkpoint(run_dir: RunDir, hypers, opt_state, iteration: int, norms) -> None:
    run_dir.save_arrays(RunDir.CHECKPOINT, {
        "hypers": hypers, "opt_state": opt_state,
        "iteration": np.asarray(iteration, np.int64),
        "norms": np.asarray(norms, np.float64)}, keep_previous=True)


def _load_checkpoint(run_dir: RunDir, hypers, opt_state):
    """(hypers, opt_state, iteration, norms) of this run's checkpoint (the previous one, with a
    warning, if the latest is damaged), or None if the run has none."""
    name = RunDir.CHECKPOINT
    if not (run_dir.has_arrays(name) or run_dir.has_arrays(name + ".prev")):
        return None
    raw = run_dir.load_arrays(name, fallback=True)
    if "norms" not in raw:
        raise ValueError(f"{run_dir.path / (name + '.npz')} is not a checkpoint of "
                         "revlearn.meta.meta_optimize")
    n_norms = raw["norms"].shape[0]
    template = {"hypers": hypers, "opt_state": opt_state,
                "iteration": np.asarray(0, np.int64), "norms": np.zeros(n_norms, np.float64)}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # warned above
            ckpt = run_dir.load_arrays(name, template, fallback=True)
    except ValueError as e:
        raise ValueError(f"the checkpoint does not match these hyperparameters and this "
                         f"optimiser: {e}") from None
    to_jax = lambda t: jax.tree_util.tree_map(jnp.asarray, t)  # noqa: E731
    return (to_jax(ckpt["hypers"]), to_jax(ckpt["opt_state"]), int(ckpt["iteration"]),
            [float(n) for n in ckpt["norms"]])
