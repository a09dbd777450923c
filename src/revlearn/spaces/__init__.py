"""Unconstrained hyperparameter spaces (``log_``, ``logit_`` prefixes) and
smooth bases for per-step schedules."""

from revlearn.spaces._basis import fit_coeffs, fourier_basis, piecewise_linear_basis, smooth_schedule
from revlearn.spaces._transforms import (
    SPACES,
    Space,
    constrain,
    identity,
    log_space,
    logit_space,
    space_of,
    unconstrain,
)

__all__ = [
    "SPACES",
    "Space",
    "constrain",
    "fit_coeffs",
    "fourier_basis",
    "identity",
    "log_space",
    "logit_space",
    "piecewise_linear_basis",
    "smooth_schedule",
    "space_of",
    "unconstrain",
]
