"""A small convnet: strided tanh convolutions, then a dense log-softmax layer.

Parameters are a list of layers, like the MLP: the first ``len(channels)``
are convolutions ``{"w": [k, k, c_in, c_out], "b": [c_out]}`` (HWIO), the last
is dense ``{"w": [n_flat, n_out], "b": [n_out]}``. With ``x`` ``[batch, 784]``::

    h_0 = reshape(x, [batch, 28, 28, 1])                      # NHWC
    h_{l+1} = tanh(conv(h_l, w_l, stride 2, SAME) + b_l)      # 28 -> 14 -> 7
    out = log_softmax(flatten(h_L) @ w_dense + b_dense)       # [batch, n_out]

Downsampling is by stride, not pooling; ``conv_general_dilated`` and its
transpose are deterministic on CPU (no scatter).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from revlearn.models._dtype import resolve_dtype

__all__ = ["convnet_init", "convnet_apply"]

_DIMS = ("NHWC", "HWIO", "NHWC")


def _spatial_out(size: int, n_layers: int, stride: int) -> int:
    for _ in range(n_layers):
        size = -(-size // stride)  # SAME padding: ceil(size / stride)
    return size


def convnet_init(
    key,
    channels: Sequence[int] = (8, 16),
    kernel: int = 5,
    n_out: int = 10,
    image_size: int = 28,
    in_channels: int = 1,
    stride: int = 2,
    scale=None,
    dtype=None,
) -> list[dict]:
    """Initialise the convnet.

    Args:
      key: a ``jax.random`` key.
      channels: output channels of each convolution.
      kernel: square kernel size.
      n_out: number of classes.
      image_size: input images are ``[image_size, image_size, in_channels]``,
        flattened in the input.
      in_channels: see ``image_size``.
      stride: stride of every convolution (``SAME`` padding).
      scale: ``None`` (``w ~ N(0, 1/fan_in)``, ``b = 0``) or a scalar std for all.
      dtype: float dtype; ``None`` is JAX's default float.

    Returns:
      The layers: ``len(channels)`` convolutions ``{"w": [k, k, c_in, c_out], "b":
      [c_out]}`` (HWIO), then the dense layer ``{"w": [n_flat, n_out], "b": [n_out]}``.

    Raises:
      ValueError: no channels or a non-positive one, ``kernel`` or ``stride`` < 1, or a
        non-float ``dtype``.

    Example:
        ```python
        params0 = revlearn.models.convnet_init(jax.random.PRNGKey(0), channels=(8, 16))
        log_probs = revlearn.models.convnet_apply(params0, x)      # x: [batch, 784]
        ```
    """
    channels = list(channels)
    if not channels or any(int(c) < 1 for c in channels):
        raise ValueError(f"channels={channels} must list at least one positive width, e.g. (8, 16)")
    if kernel < 1 or stride < 1:
        raise ValueError(f"kernel={kernel} and stride={stride} must be >= 1")
    dtype = resolve_dtype(dtype)
    keys = jax.random.split(key, 2 * (len(channels) + 1))
    params = []
    c_in = in_channels
    for i, c_out in enumerate(channels):
        fan_in = kernel * kernel * c_in
        sw, sb = (1.0 / np.sqrt(fan_in), 0.0) if scale is None else (scale, scale)
        params.append(
            {
                "w": jnp.asarray(sw, dtype) * jax.random.normal(keys[2 * i], (kernel, kernel, c_in, c_out), dtype),
                "b": jnp.asarray(sb, dtype) * jax.random.normal(keys[2 * i + 1], (c_out,), dtype),
            }
        )
        c_in = c_out
    side = _spatial_out(image_size, len(channels), stride)
    n_flat = side * side * c_in
    sw, sb = (1.0 / np.sqrt(n_flat), 0.0) if scale is None else (scale, scale)
    params.append(
        {
            "w": jnp.asarray(sw, dtype) * jax.random.normal(keys[-2], (n_flat, n_out), dtype),
            "b": jnp.asarray(sb, dtype) * jax.random.normal(keys[-1], (n_out,), dtype),
        }
    )
    return params


def convnet_apply(params: list[dict], x: jax.Array, stride: int = 2) -> jax.Array:
    """The convnet's forward pass on flattened square images.

    Args:
      params: the layers, as `convnet_init` returns them.
      x: images ``[batch, side * side * in_channels]``, flattened.
      stride: the convolutions' stride; must match `convnet_init`'s.

    Returns:
      Log-probabilities ``[batch, n_out]``.

    Raises:
      ValueError: ``x`` is not a square image with the channels of ``params``, or the
        stride or image size differ from the ones ``params`` was built for.

    Example:
        ```python
        loss = revlearn.models.nll(revlearn.models.convnet_apply(params, xb), yb)
        ```
    """
    in_channels = params[0]["w"].shape[2]
    side = int(round(np.sqrt(x.shape[-1] // in_channels)))
    if side * side * in_channels != x.shape[-1]:
        raise ValueError(
            f"x has {x.shape[-1]} features, not a square image with "
            f"{in_channels} channel(s); pass x of shape [batch, 784] for MNIST"
        )
    h = x.reshape(x.shape[0], side, side, in_channels)
    for layer in params[:-1]:
        h = jax.lax.conv_general_dilated(
            h, layer["w"], window_strides=(stride, stride), padding="SAME",
            dimension_numbers=_DIMS,
        )
        h = jnp.tanh(h + layer["b"])
    h = h.reshape(h.shape[0], -1)
    if h.shape[-1] != params[-1]["w"].shape[0]:
        raise ValueError(
            f"the convolutions give {h.shape[-1]} features but the dense layer "
            f"expects {params[-1]['w'].shape[0]}; pass the same stride and "
            "image size to convnet_apply as to convnet_init"
        )
    return jax.nn.log_softmax(h @ params[-1]["w"] + params[-1]["b"], axis=-1)
