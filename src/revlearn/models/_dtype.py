"""The default float dtype of model parameters."""

from __future__ import annotations

import jax.numpy as jnp

__all__ = ["resolve_dtype"]


def resolve_dtype(dtype=None):
    """A float dtype for model parameters.

    Args:
      dtype: a float dtype, or ``None`` for JAX's default float (float64 when
        ``jax_enable_x64`` is on, else float32).

    Returns:
      A numpy float dtype.

    Raises:
      ValueError: ``dtype`` is not a float dtype.

    Example:
        ```python
        revlearn.models.resolve_dtype(None)    # dtype('float64') under jax_enable_x64
        ```
    """
    dtype = jnp.asarray(0.0).dtype if dtype is None else jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype must be a float dtype, got {dtype}; use jnp.float32 or jnp.float64")
    return dtype
