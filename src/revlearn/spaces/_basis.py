"""Smooth parameterisations of per-step schedules.

A schedule ``s`` ``[steps, ...]`` is stored as coefficients ``c`` ``[n, ...]``
on a basis ``B`` ``[steps, n]``::

    s = B @ c      (contracting the first axis of c)

With few low-frequency basis vectors the meta-gradient with respect to ``c`` is
the projection ``B^T g`` of the per-step meta-gradient ``g``, which filters out
the high-frequency oscillation seen in per-step hypergradients.

``fourier_basis`` is the orthonormal DCT-II basis::

    B[t, 0] = sqrt(1 / T),  B[t, k] = sqrt(2 / T) cos(pi (t + 1/2) k / T)

so ``B^T B = I`` and ``c = B^T s`` is the least-squares fit.
``piecewise_linear_basis`` holds hat functions at ``n`` evenly spaced knots
(``B`` rows sum to one: ``c`` are the schedule's values at the knots).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

__all__ = ["fourier_basis", "piecewise_linear_basis", "smooth_schedule", "fit_coeffs"]


def _check(steps, n, what):
    if int(steps) < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    if not 1 <= int(n) <= int(steps):
        raise ValueError(
            f"{what}={n} must be between 1 and steps={steps}; a basis cannot "
            "have more functions than steps"
        )


def fourier_basis(steps: int, n_freq: int, dtype=None) -> jnp.ndarray:
    """The first ``n_freq`` orthonormal DCT-II vectors (see the module docstring).

    Args:
      steps: the schedule's length T.
      n_freq: the number of basis vectors, 1 <= n_freq <= steps.
      dtype: the array's dtype (JAX's default float if None).

    Returns:
      ``B`` ``[steps, n_freq]`` with ``B^T B = I``.

    Raises:
      ValueError: steps < 1 or n_freq outside [1, steps].

    Example:
        ```python
        B = revlearn.spaces.fourier_basis(100, 8)
        lr = jnp.exp(revlearn.spaces.smooth_schedule(coeffs, B))   # [100], smooth
        ```
    """
    _check(steps, n_freq, "n_freq")
    t = np.arange(steps)[:, None] + 0.5
    k = np.arange(n_freq)[None, :]
    basis = np.sqrt(2.0 / steps) * np.cos(np.pi * t * k / steps)
    basis[:, 0] = np.sqrt(1.0 / steps)
    return jnp.asarray(basis, dtype=dtype)


def piecewise_linear_basis(steps: int, n_knots: int, dtype=None) -> jnp.ndarray:
    """Hat functions at ``n_knots`` knots evenly spaced over ``[0, steps - 1]``.

    Args:
      steps: the schedule's length T.
      n_knots: the number of knots, 1 <= n_knots <= steps; 1 is the constant schedule.
      dtype: the array's dtype (JAX's default float if None).

    Returns:
      ``B`` ``[steps, n_knots]`` whose rows sum to one: the coefficients are the
      schedule's values at the knots.

    Raises:
      ValueError: steps < 1 or n_knots outside [1, steps].

    Example:
        ```python
        B = revlearn.spaces.piecewise_linear_basis(100, 5)
        schedule = revlearn.spaces.smooth_schedule(jnp.array([0.1, 0.5, 0.5, 0.2, 0.05]), B)
        ```
    """
    _check(steps, n_knots, "n_knots")
    if n_knots == 1:
        return jnp.ones((steps, 1), dtype=dtype)
    knots = np.linspace(0.0, steps - 1, n_knots)
    width = knots[1] - knots[0]
    t = np.arange(steps)[:, None]
    basis = np.maximum(0.0, 1.0 - np.abs(t - knots[None, :]) / width)
    return jnp.asarray(basis, dtype=dtype)


def smooth_schedule(coeffs, basis) -> jnp.ndarray:
    """The schedule ``basis @ coeffs`` (contracting the first axis of ``coeffs``).

    Args:
      coeffs: ``[n, ...]`` coefficients (the hyperparameters optimised).
      basis: ``[steps, n]``, from `fourier_basis` or `piecewise_linear_basis`.

    Returns:
      The schedule ``[steps, ...]``.

    Raises:
      ValueError: ``coeffs`` has not one row per basis function.

    Example:
        ```python
        B = revlearn.spaces.fourier_basis(100, 8)
        log_lr = revlearn.spaces.smooth_schedule(c, B)          # c: [8] -> [100]
        ```
    """
    if coeffs.shape[0] != basis.shape[1]:
        raise ValueError(
            f"coeffs has {coeffs.shape[0]} rows but basis {basis.shape} has "
            f"{basis.shape[1]} functions; they must match"
        )
    return jnp.tensordot(basis, coeffs, axes=1)


def fit_coeffs(schedule, basis) -> jnp.ndarray:
    """Least-squares coefficients ``c`` with ``basis @ c ~= schedule``.

    Args:
      schedule: ``[steps, ...]``, e.g. a constant schedule to start from.
      basis: ``[steps, n]``.

    Returns:
      ``c`` ``[n, ...]``.

    Raises:
      ValueError: ``schedule`` and ``basis`` have different numbers of steps.

    Example:
        ```python
        B = revlearn.spaces.fourier_basis(100, 8)
        c0 = revlearn.spaces.fit_coeffs(jnp.full(100, jnp.log(0.1)), B)
        ```
    """
    if schedule.shape[0] != basis.shape[0]:
        raise ValueError(
            f"schedule has {schedule.shape[0]} steps but basis {basis.shape} has "
            f"{basis.shape[0]}; they must match"
        )
    flat = schedule.reshape(schedule.shape[0], -1)
    c, *_ = jnp.linalg.lstsq(basis, flat)
    return c.reshape((basis.shape[1],) + schedule.shape[1:])
