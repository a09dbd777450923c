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
Missing files are downloaded once and verified (see ``_download.py``); the
folder is created only then, never by just looking for the files.
:func:`check_source` checks cheaply, without downloading, that a source's files
are there and readable. Missing or unreadable data raises
:class:`revlearn.data.DataError` (one line: the path and the fix).

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

from revlearn.data._download import MNIST_MIRRORS, MNIST_SHA256, download_mnist
from revlearn.data._errors import DataCorruptError, DataError, DataMissingError
from revlearn.data._idx import parse_idx, read_idx, read_idx_header

__all__ = [
    "N_CLASSES",
    "N_TRAIN",
    "SOURCES",
    "Dataset",
    "check_source",
    "load_mnist",
    "mnist_dir",
    "one_hot",
]

#: The values of `source` (`--data` on the command line).
SOURCES = ("embedded", "mnist")

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
        raise DataCorruptError(
            f"{name}: expected uint8 images [n, 28, 28], got {images.dtype} "
            f"{images.shape}; the file is not an MNIST image file"
        )
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DataCorruptError(
            f"{name}: {images.shape[0]} images but labels of shape {labels.shape}"
        )
    if labels.max() >= N_CLASSES:
        raise DataCorruptError(f"{name}: label {labels.max()} is not a digit 0-9")
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
            raise DataMissingError(
                f"the bundled file {name}.gz is missing from the revlearn "
                "package (a broken install?); reinstall revlearn, or use "
                "load_mnist('mnist')"
            )
        arrays.append(parse_idx(res.read_bytes(), name=f"revlearn/data/embedded/{name}.gz"))
    return _to_dataset(*arrays, name="embedded MNIST test set")


_GET_MNIST = ("get the four MNIST files with `python -m revlearn.data download {folder}` (or "
              "revlearn.data.download_mnist), place the four files (gzip or raw IDX) "
              "there yourself, or use the bundled 10,000 test images (--data embedded)")


def _find(folder: Path, name: str) -> Path | None:
    """`folder/name.gz` or the raw `folder/name`, whichever exists (None: neither)."""
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    return None


def _read_pair(folder: Path, names: tuple[str, str]) -> Dataset:
    arrays = []
    for name in names:
        path = _find(folder, name)
        if path is None:
            raise DataMissingError(
                f"the MNIST file {str(folder / name)!r} (.gz or raw) does not exist; "
                + _GET_MNIST.format(folder=folder))
        arrays.append(read_idx(path))
    return _to_dataset(*arrays, name=str(folder / names[0]))


def _missing_dirs(folder: Path) -> list[Path]:
    """`folder` and those of its parents that do not exist, deepest first."""
    out = []
    while not folder.exists() and folder != folder.parent:
        out.append(folder)
        folder = folder.parent
    return out


def _check_pair(paths: tuple[Path, Path]) -> None:
    """The images file and the labels file `paths` hold [n, 28, 28] and [n] (headers only)."""
    (_, images), (_, labels) = (read_idx_header(p) for p in paths)
    path = str(paths[0])
    if len(images) != 3 or images[1:] != (28, 28):
        raise DataCorruptError(f"{path!r} holds an array of shape {images}, not images "
                               "[n, 28, 28]; it is not an MNIST image file: delete it and "
                               "download it again")
    if labels != images[:1]:
        raise DataCorruptError(f"{path!r} holds {images[0]} images but its labels file has "
                               f"shape {labels}; delete both and download them again")


def check_source(source: str = "embedded", data_dir: str | os.PathLike | None = None, *,
                 download: bool = False) -> None:
    """Check, cheaply and without downloading or creating anything, that the files of
    `source` are there and readable (each file's header and length, not its content),
    so a run can stop before it writes anything.

    Args:
      source: ``"embedded"`` or ``"mnist"`` (as for :func:`load_mnist`).
      data_dir: the folder of the MNIST files; see :func:`mnist_dir`.
      download: missing MNIST files are fine if ``load_mnist`` may download them: then
        the folder (or the nearest existing parent, where the folder would be created)
        must be a writable folder.

    Raises:
      DataError: one line naming the path and the fix: a missing folder or file
        (``DataMissingError``), or an unreadable or corrupt one (``DataCorruptError``).
      ValueError: ``source`` is not a known source.
    """
    if source == "embedded":
        root = importlib.resources.files("revlearn.data") / "embedded"
        for name in _TEST:
            if not (root / f"{name}.gz").is_file():
                raise DataMissingError(
                    f"the bundled file {str(root / name)!r}.gz is missing from the revlearn "
                    "package (a broken install?); reinstall revlearn, or use --data mnist")
        with importlib.resources.as_file(root / f"{_TEST[0]}.gz") as images, \
                importlib.resources.as_file(root / f"{_TEST[1]}.gz") as labels:
            _check_pair((Path(images), Path(labels)))
        return
    if source not in SOURCES:
        raise ValueError(f"source={source!r} is not known; use 'embedded' (10,000 bundled "
                         "test images) or 'mnist' (70,000 images, downloaded once)")
    folder = mnist_dir(data_dir)
    if folder.exists() and not folder.is_dir():
        raise DataMissingError(f"the MNIST folder {str(folder)!r} is a file, not a folder; "
                               "pass the folder of the four MNIST files (--data-dir DIR)")
    names = list(MNIST_SHA256)
    missing = names if not folder.is_dir() else [n for n in names if _find(folder, n) is None]
    if missing and download:
        target = folder if folder.is_dir() else folder.parent
        while not target.exists() and target != target.parent:
            target = target.parent
        if not (target.is_dir() and os.access(target, os.W_OK | os.X_OK)):
            raise DataError(f"cannot download MNIST into {str(folder)!r}: {str(target)!r} is "
                            "not a writable folder; pass a writable --data-dir DIR, or use "
                            "--data embedded")
    elif missing:
        what = (f"the MNIST folder {str(folder)!r} does not exist" if not folder.is_dir()
                else f"{str(folder)!r} lacks the MNIST file(s) {', '.join(missing)} (.gz or raw)")
        raise DataMissingError(f"{what}; " + _GET_MNIST.format(folder=folder))
    for pair in (_TRAIN, _TEST):
        if not any(n in missing for n in pair):
            _check_pair(tuple(_find(folder, n) for n in pair))


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
      download: fetch missing files (``source="mnist"`` only), creating the folder
        then if it does not exist (and removing it again if the download fails); if
        False, a missing file raises ``DataMissingError``.
      mirrors: base URLs for the download.

    Returns:
      A :class:`Dataset` with float32 images ``[n, 784]`` and int32 labels ``[n]``.

    Raises:
      DataError: a file is missing (``DataMissingError``, a FileNotFoundError), corrupt
        (``DataCorruptError``, a ValueError), or could not be downloaded
        (``DownloadError``).
    """
    if source == "embedded":
        return _load_embedded()
    if source != "mnist":
        raise ValueError(
            f"source={source!r} is not known; use 'embedded' (10,000 bundled "
            "test images) or 'mnist' (70,000 images, downloaded once)"
        )
    folder = mnist_dir(data_dir)
    if download and any(_find(folder, n) is None for n in MNIST_SHA256):
        created = _missing_dirs(folder)  # made here only to download into
        folder.mkdir(parents=True, exist_ok=True)
        try:
            download_mnist(folder, mirrors=mirrors)
        except BaseException:
            for d in created:  # deepest first; only folders this call made, if still empty
                try:
                    d.rmdir()
                except OSError:
                    break
            raise
    train = _read_pair(folder, _TRAIN)
    test = _read_pair(folder, _TEST)
    return Dataset(
        np.concatenate([train.images, test.images]),
        np.concatenate([train.labels, test.labels]),
    )
