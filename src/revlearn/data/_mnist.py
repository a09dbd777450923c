"""MNIST as a :class:`Dataset`: the bundled test set, or all 70,000 images.

``load_mnist("embedded")`` reads the 10,000-image MNIST test set shipped inside
the package (no network, no files outside the package).

``load_mnist("mnist")`` returns all 70,000 images as ONE dataset: the 60,000
official training images first (indices ``0 .. 59999``), then the 10,000
official test images (indices ``60000 .. 69999``, see :data:`N_TRAIN`). The
experiments draw their own train/validation/test splits from this pool with
:func:`revlearn.data.split`, as the reference code did. The files are looked for
in, in order: ``data_dir``; the ``REVLEARN_DATA`` environment variable;
``$XDG_CACHE_HOME/revlearn/mnist`` (default ``~/.cache/revlearn/mnist``).
Missing files are downloaded once and verified (see ``_download.py``).

Images are float32 ``[n, 784]`` in ``[0, 1]`` (pixel / 255); labels are int32
``[n]``; :attr:`Dataset.onehot` gives float32 ``[n, 10]``.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from revlearn.data._download import MNIST_MIRRORS, download_mnist
from revlearn.data._idx import parse_idx, read_idx

__all__ = ["Dataset", "load_mnist", "one_hot", "mnist_dir", "N_TRAIN", "N_CLASSES"]

N_CLASSES = 10
#: Number of official training images at the start of ``load_mnist("mnist")``.
N_TRAIN = 60_000

_TEST = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_TRAIN = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")


def one_hot(labels: np.ndarray, n_classes: int = N_CLASSES) -> np.ndarray:
    """One-hot float32 ``[n, n_classes]`` from int labels ``[n]``."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be a 1-d integer array, got shape {labels.shape} and "
            f"dtype {labels.dtype}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(
            f"labels must lie in [0, {n_classes}), found range "
            f"[{labels.min()}, {labels.max()}]; raise n_classes"
        )
    return np.eye(n_classes, dtype=np.float32)[labels]


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Images and labels of one set of examples.

    Attributes:
      images: float32 ``[n, 784]``, pixels in ``[0, 1]`` (unless mean-subtracted).
      labels: int32 ``[n]``, classes ``0..9``.
    """

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self):
        images, labels = np.asarray(self.images), np.asarray(self.labels)
        if images.ndim != 2:
            raise ValueError(
                f"images must be [n, pixels], got shape {images.shape}; "
                "flatten with images.reshape(len(images), -1)"
            )
        if labels.shape != (images.shape[0],):
            raise ValueError(
                f"labels must have shape ({images.shape[0]},) to match images "
                f"{images.shape}, got {labels.shape}"
            )
        object.__setattr__(self, "images", images.astype(np.float32, copy=False))
        object.__setattr__(self, "labels", labels.astype(np.int32, copy=False))

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def onehot(self) -> np.ndarray:
        """float32 ``[n, 10]`` one-hot labels."""
        return one_hot(self.labels, N_CLASSES)

    def take(self, indices) -> Dataset:
        """The examples at ``indices`` (an int array or a slice), as a Dataset."""
        return Dataset(self.images[indices], self.labels[indices])


def _to_dataset(images: np.ndarray, labels: np.ndarray, name: str) -> Dataset:
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise ValueError(
            f"{name}: expected uint8 images [n, 28, 28], got {images.dtype} "
            f"{images.shape}; the file is not an MNIST image file"
        )
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"{name}: {images.shape[0]} images but labels of shape {labels.shape}"
        )
    if labels.max() >= N_CLASSES:
        raise ValueError(f"{name}: label {labels.max()} is not a digit 0-9")
    x = images.reshape(images.shape[0], -1).astype(np.float32) / np.float32(255.0)
    return Dataset(x, labels.astype(np.int32))


def mnist_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Where ``load_mnist("mnist")`` keeps the files: ``data_dir``, else
    ``$REVLEARN_DATA``, else ``$XDG_CACHE_HOME/revlearn/mnist``, else
    ``~/.cache/revlearn/mnist``."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    if os.environ.get("REVLEARN_DATA"):
        return Path(os.environ["REVLEARN_DATA"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "revlearn" / "mnist"


def _load_embedded() -> Dataset:
    root = importlib.resources.files("revlearn.data") / "embedded"
    arrays = []
    for name in _TEST:
        res = root / f"{name}.gz"
        if not res.is_file():
            raise FileNotFoundError(
                f"the bundled file {name}.gz is missing from the revlearn "
                "package (a broken install?); reinstall revlearn, or use "
                "load_mnist('mnist')"
            )
        arrays.append(parse_idx(res.read_bytes(), name=f"revlearn/data/embedded/{name}.gz"))
    return _to_dataset(*arrays, name="embedded MNIST test set")


def _read_pair(folder: Path, names: tuple[str, str]) -> Dataset:
    arrays = []
    for name in names:
        path = folder / f"{name}.gz"
        arrays.append(read_idx(path if path.is_file() else folder / name))
    return _to_dataset(*arrays, name=str(folder / names[0]))


def load_mnist(
    source: str = "embedded",
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = True,
    mirrors: Sequence[str] = MNIST_MIRRORS,
) -> Dataset:
    """Load MNIST.

    Args:
      source: ``"embedded"`` (the bundled 10,000 test images) or ``"mnist"``
        (all 70,000: train then test, see the module docstring).
      data_dir: folder of the four IDX files (``.gz`` or raw) for
        ``source="mnist"``; see :func:`mnist_dir` for the default. Ignored for
        ``"embedded"``.
      download: fetch missing files (``source="mnist"`` only); if False, a
        missing file raises ``FileNotFoundError``.
      mirrors: base URLs for the download.

    Returns:
      A :class:`Dataset` with float32 images ``[n, 784]`` and int32 labels ``[n]``.
    """
    if source == "embedded":
        return _load_embedded()
    if source != "mnist":
        raise ValueError(
            f"source={source!r} is not known; use 'embedded' (10,000 bundled "
            "test images) or 'mnist' (70,000 images, downloaded once)"
        )
    folder = mnist_dir(data_dir)
    if download:
        folder.mkdir(parents=True, exist_ok=True)
        download_mnist(folder, mirrors=mirrors)
    train = _read_pair(folder, _TRAIN)
    test = _read_pair(folder, _TEST)
    return Dataset(
        np.concatenate([train.images, test.images]),
        np.concatenate([train.labels, test.labels]),
    )
