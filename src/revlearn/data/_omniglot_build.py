"""Build the bundled Omniglot file `embedded/omniglot_small1_28x28.npz` (run once, by hand).

    python -m revlearn.data._omniglot_build [--zip PATH] [--out PATH]

Input: `images_background_small1.zip` of the Omniglot repository
(github.com/brendenlake/omniglot, folder python/; MIT licence, Lake, Salakhutdinov &
Tenenbaum, Science 2015): five alphabets (Balinese, Early_Aramaic, Greek, Korean,
Latin), 136 characters, each drawn once by 20 people, as 105x105 1-bit PNGs
`ALPHABET/characterNN/XXXX_YY.png` (YY: the drawer). Its sha256 is checked first.

Each image is inverted (ink = 1, paper = 0, as in the hypergrad paper's 28x28 data)
and downsampled to 28x28 by exact area averaging: output pixel (i, j) is the mean
of the input over the square [3.75 i, 3.75 (i + 1)) x [3.75 j, 3.75 (j + 1)),
input pixels cut by the square's edge counting by the fraction inside
(`A @ ink @ A.T` with A [28, 105] the overlap fractions). Stored as uint8
round(255 mean).

Output (numpy `savez_compressed`, read by `revlearn.data.load_omniglot`):
`images` uint8 [2720, 28, 28]; `alphabet`, `character` (index within the alphabet,
folder order) and `drawer` (YY - 1) int16 [2720]; `alphabets` the five names.
The script prints the output's sha256: put it in `_omniglot.SHA256`. Needs Pillow
(a matplotlib dependency); the loader does not.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import re
import zipfile
from pathlib import Path

import numpy as np

ZIP_SHA256 = "f38eb80f801274ac2b4dff5b24289016bfaba4a7d5bb50deebf27104ad6cb8a4"
OUT = Path(__file__).parent / "embedded" / "omniglot_small1_28x28.npz"
SIZE_IN, SIZE_OUT = 105, 28
_NAME = re.compile(r"^[^/]+/([^/]+)/character(\d+)/\d+_(\d+)\.png$")


def area_matrix(n_in: int = SIZE_IN, n_out: int = SIZE_OUT) -> np.ndarray:
    """A [n_out, n_in]: A[i, j] = |[j, j+1) & [s i, s (i+1))| / s with s = n_in / n_out
    (each row sums to 1), so `A @ img @ A.T` is the exact area average."""
    s = n_in / n_out
    lo, hi = np.arange(n_out)[:, None] * s, (np.arange(n_out)[:, None] + 1) * s
    j = np.arange(n_in)[None, :]
    return np.clip(np.minimum(hi, j + 1) - np.maximum(lo, j), 0, None) / s


def build(zip_path: str | Path, out: str | Path = OUT) -> str:
    """Write the npz from the zip at `zip_path`; return the output's sha256."""
    from PIL import Image

    data = Path(zip_path).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != ZIP_SHA256:
        raise SystemExit(f"{zip_path}: sha256 {digest} is not {ZIP_SHA256}; "
                         "use the original images_background_small1.zip")
    entries = []
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for name in zf.namelist():
            m = _NAME.match(name)
            if m:
                entries.append((m.group(1), int(m.group(2)), int(m.group(3)), zf.read(name)))
    entries.sort(key=lambda e: e[:3])
    alphabets = sorted({e[0] for e in entries})
    a = area_matrix()
    images, alphabet, character, drawer = [], [], [], []
    for alpha, char, draw, png in entries:
        paper = np.asarray(Image.open(io.BytesIO(png)).convert("L"), np.float64) / 255.0
        if paper.shape != (SIZE_IN, SIZE_IN):
            raise SystemExit(f"{alpha}/character{char:02d}: image of shape {paper.shape}")
        images.append(np.rint(255.0 * (a @ (1.0 - paper) @ a.T)).astype(np.uint8))
        alphabet.append(alphabets.index(alpha))
        character.append(char - 1)
        drawer.append(draw - 1)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, images=np.stack(images), alphabets=np.array(alphabets),
                        alphabet=np.array(alphabet, np.int16),
                        character=np.array(character, np.int16),
                        drawer=np.array(drawer, np.int16))
    return hashlib.sha256(out.read_bytes()).hexdigest()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m revlearn.data._omniglot_build",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--zip", required=True,
                        help="path to images_background_small1.zip (sha256 checked)")
    parser.add_argument("--out", default=str(OUT), help="the npz to write")
    args = parser.parse_args(argv)
    print(f"{args.out}\nsha256 {build(args.zip, args.out)}")


if __name__ == "__main__":
    main()
