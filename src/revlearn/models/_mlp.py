"""Multilayer perceptron with tanh hidden layers and a log-softmax output.

Parameters are a list of layers ``[{"w": [n_in, n_out], "b": [n_out]}, ...]``.
For layers ``l = 0 .. L-1``::

    h_0 = x                                   # [batch, sizes[0]]
    h_{l+1} = tanh(h_l @ w_l + b_l)           # hidden layers, l < L-1
    out = log_softmax(h_{L-1} @ w_{L-1} + b_{L-1})  # [batch, sizes[-1]]

Logistic regression is the MLP with no hidden layer, ``sizes = [784, 10]``.
Initialisation: ``w_l = s_w,l * N(0, 1)``, ``b_l = s_b,l * N(0, 1)``. The scales
may be traced arrays, so the initial scale can itself be a hyperparameter.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from revlearn.models._dtype import resolve_dtype

__all__ = ["mlp_init", "mlp_apply", "logistic_init", "logistic_apply"]


def _layer_scales(scale, sizes):
    n_layers = len(sizes) - 1
    if scale is None:
        return [(1.0 / np.sqrt(n_in), 0.0) for n_in in sizes[:-1]]
    if not isinstance(scale, (list, tuple)) and jnp.ndim(scale) == 0:
        return [(scale, scale)] * n_layers
    if len(scale) != n_layers:
        raise ValueError(
            f"scale has {len(scale)} entries but sizes={list(sizes)} has "
            f"{n_layers} layers; pass one (w_scale, b_scale) pair per layer, "
            "or a single float"
        )
    out = []
    for i, pair in enumerate(scale):
        if not isinstance(pair, (list, tuple)) and jnp.shape(pair) != (2,):
            raise ValueError(f"scale[{i}]={pair!r} must be a pair (w_scale, b_scale)")
        if len(pair) != 2:
            raise ValueError(f"scale[{i}]={pair!r} must be a pair (w_scale, b_scale)")
        out.append((pair[0], pair[1]))
    return out


def mlp_init(key, sizes: Sequence[int], scale=None, dtype=None) -> list[dict]:
    """Initialise an MLP.

    Args:
      key: a ``jax.random`` key.
      sizes: layer widths ``[n_in, hidden..., n_out]``, at least two.
      scale: ``None`` (``w ~ N(0, 1/n_in)``, ``b = 0``), a scalar (the same
        std for every weight and bias), or one ``(w_scale, b_scale)`` pair per
        layer (a sequence, or an array ``[n_layers, 2]``). May be traced, so the
        initial scale can be a hyperparameter.
      dtype: float dtype; ``None`` is JAX's default float.

    Returns:
      ``[{"w": [sizes[l], sizes[l+1]], "b": [sizes[l+1]]} for each layer]``.

    Raises:
      ValueError: fewer than two sizes or a non-positive width, a ``scale`` with the
        wrong number of layers or not a pair per layer, or a non-float ``dtype``.

    Example:
        ```python
        params0 = revlearn.models.mlp_init(jax.random.PRNGKey(0), [784, 50, 10],
                                           dtype=jnp.float64)
        log_probs = revlearn.models.mlp_apply(params0, x)      # [batch, 10]
        ```
    """
    sizes = list(sizes)
    if len(sizes) < 2 or any(int(s) < 1 for s in sizes):
        raise ValueError(
            f"sizes={sizes} must list at least two positive widths, e.g. [784, 10]"
        )
    dtype = resolve_dtype(dtype)
    scales = _layer_scales(scale, sizes)
    keys = jax.random.split(key, len(sizes) - 1)
    params = []
    for k, n_in, n_out, (sw, sb) in zip(keys, sizes[:-1], sizes[1:], scales):
        kw, kb = jax.random.split(k)
        params.append(
            {
                "w": jnp.asarray(sw, dtype) * jax.random.normal(kw, (n_in, n_out), dtype),
                "b": jnp.asarray(sb, dtype) * jax.random.normal(kb, (n_out,), dtype),
            }
        )
    return params


def mlp_apply(params: list[dict], x: jax.Array) -> jax.Array:
    """The MLP's forward pass: tanh hidden layers, log-softmax output.

    Args:
      params: the layers, as `mlp_init` returns them.
      x: inputs ``[batch, n_in]``.

    Returns:
      Log-probabilities ``[batch, n_out]``.

    Example:
        ```python
        loss = revlearn.models.nll(revlearn.models.mlp_apply(params, x), y_onehot)
        ```
    """
    h = x
    for layer in params[:-1]:
        h = jnp.tanh(h @ layer["w"] + layer["b"])
    logits = h @ params[-1]["w"] + params[-1]["b"]
    return jax.nn.log_softmax(logits, axis=-1)


def logistic_init(key, n_in: int = 784, n_out: int = 10, scale=0.0, dtype=None) -> list[dict]:
    """Logistic regression's parameters: ``mlp_init(key, [n_in, n_out], scale, dtype)``.

    Args:
      key: a ``jax.random`` key.
      n_in: input size.
      n_out: number of classes.
      scale: as in `mlp_init`; the default ``0.0`` starts from zero weights (the loss is
        convex).
      dtype: float dtype; ``None`` is JAX's default float.

    Returns:
      ``[{"w": [n_in, n_out], "b": [n_out]}]``, applied by `logistic_apply`.

    Raises:
      ValueError: as `mlp_init`.

    Example:
        ```python
        params0 = revlearn.models.logistic_init(jax.random.PRNGKey(0), dtype=jnp.float64)
        ```
    """
    return mlp_init(key, [n_in, n_out], scale=scale, dtype=dtype)


logistic_apply = mlp_apply
"""Logistic regression's forward pass, ``log_softmax(x @ w + b)`` (it is `mlp_apply`)."""
