"""Deterministic, disjoint splits of a :class:`Dataset`.

``split(ds, {"train": a, "valid": b}, seed)`` permutes ``range(len(ds))`` with
``numpy.random.default_rng(seed).permutation`` and cuts consecutive blocks of
the requested sizes, in the order given. The same seed always gives the same
splits; different splits never share an example.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from revlearn.data._mnist import N_CLASSES, Dataset

__all__ = ["split", "subtract_mean", "class_balanced_indices"]


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)


def split(
    dataset: Dataset,
    sizes: Mapping[str, int] | Sequence[int],
    seed: int,
) -> dict[str, Dataset] | tuple[Dataset, ...]:
    """Split ``dataset`` into disjoint random subsets of exact sizes.

    Args:
      dataset: the pool of examples.
      sizes: ``{name: size}`` (returns a dict with the same keys and order), or
        a sequence of sizes (returns a tuple in the same order).
      seed: seed of ``numpy.random.default_rng``.

    Raises:
      ValueError: a size is negative, or the sizes sum to more than
        ``len(dataset)``.
    """
    _check_seed(seed)
    named = isinstance(sizes, Mapping)
    items = list(sizes.items()) if named else list(enumerate(sizes))
    for key, n in items:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"sizes[{key!r}] must be a non-negative int, got {n!r}")
    total = sum(int(n) for _, n in items)
    if total > len(dataset):
        shown = dict(sizes) if named else list(sizes)
        raise ValueError(
            f"sizes {shown} need {total} examples, but the dataset has only "
            f"{len(dataset)}; ask for fewer, or load all 70,000 MNIST images "
            "with load_mnist('mnist') (`--data mnist` on the command line)"
        )
    perm = np.random.default_rng(seed).permutation(len(dataset))
    out, start = {}, 0
    for key, n in items:
        out[key] = dataset.take(perm[start : start + int(n)])
        start += int(n)
    return out if named else tuple(out.values())


def subtract_mean(
    splits: Mapping[str, Dataset], train: str = "train"
) -> tuple[dict[str, Dataset], np.ndarray]:
    """Subtract the mean image of ``splits[train]`` from every split.

    ``x' = x - mean_{i in train} x_i``; the mean ``[784]`` uses the training split
    only, so no information leaks from validation or test data.

    Returns:
      ``(new_splits, mean)``.
    """
    if train not in splits:
        raise ValueError(
            f"train={train!r} is not a key of splits {list(splits)}; pass the "
            "name of the training split"
        )
    mean = splits[train].images.mean(axis=0)
    new = {k: Dataset(d.images - mean, d.labels) for k, d in splits.items()}
    return new, mean


def class_balanced_indices(
    labels: np.ndarray, per_class: int, seed: int, n_classes: int = N_CLASSES
) -> np.ndarray:
    """Indices of ``per_class`` random examples of each class.

    Args:
      labels: int ``[n]`` or one-hot ``[n, n_classes]``.
      per_class: examples to draw from each class (without replacement).
      seed: seed of ``numpy.random.default_rng``.

    Returns:
      int64 ``[n_classes * per_class]``, grouped by class: class 0's indices
      first (``labels[idx[c * per_class]] == c``).
    """
    _check_seed(seed)
    labels = np.asarray(labels)
    if labels.ndim == 2:
        labels = labels.argmax(axis=1)
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    rng = np.random.default_rng(seed)
    out = []
    for c in range(n_classes):
        members = np.flatnonzero(labels == c)
        if len(members) < per_class:
            raise ValueError(
                f"class {c} has {len(members)} examples, fewer than "
                f"per_class={per_class}; lower per_class or use a larger dataset"
            )
        out.append(rng.choice(members, size=per_class, replace=False))
    return np.concatenate(out).astype(np.int64)
