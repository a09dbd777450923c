"""Omniglot's five-alphabet background set, bundled at 28x28, as ten tasks.

``load_omniglot()`` reads `embedded/omniglot_small1_28x28.npz` (built from the
Omniglot repository's `images_background_small1.zip` by `_omniglot_build.py`;
MIT licence, see `embedded/OMNIGLOT_LICENSE`): 2,720 images of 136 characters
from five alphabets, each character drawn by 20 people. Like the hypergrad
paper's multitask experiment, it returns ten tasks: the five alphabets (tasks
0-4) and the same images rotated by 90 degrees counter-clockwise (task k + 5 is
task k rotated). The file's sha256 is checked first; a mismatch raises
:class:`revlearn.data.DataCorruptError`. Depends on numpy only.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import io
from pathlib import Path
from typing import NamedTuple

import numpy as np

from revlearn.data._errors import DataCorruptError, DataMissingError

__all__ = ["SHA256", "Omniglot", "load_omniglot"]

FILE = "omniglot_small1_28x28.npz"
#: sha256 of the bundled file (printed by `python -m revlearn.data._omniglot_build`).
SHA256 = "14a5cad1b141c7cddc8f4cc6a92cd0d393fe73477ff4651d8d94f25c5f804c57"
_FIX = ("reinstall revlearn, or rebuild it with "
        "`python -m revlearn.data._omniglot_build --zip images_background_small1.zip`")


class Omniglot(NamedTuple):
    """Images of several alphabet tasks.

    Attributes:
      images: float32 [n, 784], ink in [0, 1] (paper 0), rows of the 28x28 image.
      task: int32 [n], the task (alphabet, or rotated alphabet) of each image.
      character: int32 [n], the character's index within its alphabet (the same in
        an alphabet and its rotation).
      drawer: int32 [n], who drew it (0-19; the same person drew an image and its rotation).
      names: the task names, e.g. "Greek" and "Greek (rotated)".
    """

    images: np.ndarray
    task: np.ndarray
    character: np.ndarray
    drawer: np.ndarray
    names: tuple[str, ...]


def _read(path: Path | None) -> tuple[bytes, str]:
    if path is None:
        res = importlib.resources.files("revlearn.data") / "embedded" / FILE
        where = f"revlearn/data/embedded/{FILE}"
        if not res.is_file():
            raise DataMissingError(f"the bundled file {where} is missing from the revlearn "
                                   f"package (a broken install?); {_FIX}")
        return res.read_bytes(), where
    path = Path(path)
    if not path.is_file():
        raise DataMissingError(f"{str(path)!r} does not exist; pass the path of {FILE} or "
                               "None for the bundled copy")
    return path.read_bytes(), str(path)


def load_omniglot(rotate: bool = True, path: str | Path | None = None) -> Omniglot:
    """The bundled Omniglot alphabets as tasks: ten with `rotate` (the five alphabets,
    then each rotated by 90 degrees), five without. `path` reads another copy of the
    file (it must have the bundled file's sha256).

    Raises:
      DataMissingError: the file is not there.
      DataCorruptError: its sha256 differs from `SHA256` (one line: the path and the fix).
    """
    raw, where = _read(path)
    digest = hashlib.sha256(raw).hexdigest()
    if digest != SHA256:
        raise DataCorruptError(f"{where}: sha256 {digest[:16]}... is not the expected "
                               f"{SHA256[:16]}... (a corrupt or different file); {_FIX}")
    with np.load(io.BytesIO(raw), allow_pickle=False) as f:
        images, alphabet = f["images"], f["alphabet"].astype(np.int32)
        character, drawer = f["character"].astype(np.int32), f["drawer"].astype(np.int32)
        names = tuple(str(n) for n in f["alphabets"])
    if rotate:
        images = np.concatenate([images, np.rot90(images, 1, axes=(1, 2))])
        alphabet = np.concatenate([alphabet, alphabet + len(names)])
        character, drawer = np.tile(character, 2), np.tile(drawer, 2)
        names = names + tuple(f"{n} (rotated)" for n in names)
    x = images.reshape(len(images), -1).astype(np.float32) / np.float32(255.0)
    return Omniglot(x, alphabet, character, drawer, names)
