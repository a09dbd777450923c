"""Download the four MNIST files once, verified by sha256, written atomically.

For each file ``<name>.gz`` the mirrors are tried in order; the first whose
download passes verification wins. The bytes go to a temporary file in the
destination folder; the sha256 of the *uncompressed* content is compared with
the canonical value (the gzip wrappers differ between mirrors, the content does
not); only then is the temporary file renamed onto ``<name>.gz`` with
``os.replace`` (atomic on one file system). Any failure -- no network, HTTP
error, truncated transfer, corrupt gzip, checksum mismatch -- removes the
temporary file, so the cache never holds a half-written or unverified file.
Only ``urllib`` is used.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Sequence
from pathlib import Path

from revlearn.data._errors import DataCorruptError, DataError, DataMissingError

__all__ = [
    "MNIST_MIRRORS",
    "MNIST_SHA256",
    "DownloadError",
    "download_file",
    "download_mnist",
    "sha256_uncompressed",
]

#: Base URLs tried in order; each must serve ``<name>.gz``.
MNIST_MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

#: sha256 of the canonical *uncompressed* IDX files.
MNIST_SHA256: dict[str, str] = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

_CHUNK = 1 << 20


class DownloadError(DataError):
    """No mirror delivered a verified file; the message (one line) lists every attempt.
    A `revlearn.data.DataError`, hence an OSError."""


def sha256_uncompressed(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file's content, inflated first if it is gzip.

    Raises:
      DataCorruptError (a ValueError): the gzip stream is truncated or corrupt.
    """
    path = Path(path)
    with open(path, "rb") as f:
        is_gzip = f.read(2) == b"\x1f\x8b"
    h = hashlib.sha256()
    opener = gzip.open if is_gzip else open
    try:
        with opener(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    except EOFError:
        raise DataCorruptError(f"{str(path)!r} is a truncated gzip stream") from None
    except (gzip.BadGzipFile, zlib.error) as e:
        raise DataCorruptError(f"{str(path)!r} is a corrupt gzip stream ({e})") from None
    return h.hexdigest()


def _fetch_to(url: str, tmp, timeout: float) -> None:
    """Stream ``url`` into the open file ``tmp``; check Content-Length."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        declared = resp.headers.get("Content-Length")
        n = 0
        while chunk := resp.read(_CHUNK):
            tmp.write(chunk)
            n += len(chunk)
    if declared is not None and n != int(declared):
        raise ValueError(f"truncated transfer: got {n} of {declared} bytes")


def download_file(
    name: str,
    data_dir: str | os.PathLike,
    sha256: str,
    mirrors: Sequence[str] = MNIST_MIRRORS,
    timeout: float = 60.0,
) -> Path:
    """Download ``<base><name>.gz`` into ``data_dir/<name>.gz``, verified.

    Args:
      name: file name without ``.gz``, e.g. ``"t10k-labels-idx1-ubyte"``.
      data_dir: an existing folder to write into.
      sha256: expected sha256 hex digest of the uncompressed content.
      mirrors: base URLs (``http(s)://`` or ``file://``), tried in order; a
        missing trailing ``/`` is added.
      timeout: seconds per connection attempt.

    Returns:
      The path of the verified file.

    Raises:
      DataMissingError (a FileNotFoundError): ``data_dir`` does not exist.
      DownloadError: every mirror failed; the message says why for each.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataMissingError(
            f"data_dir {str(data_dir)!r} does not exist; create it first "
            "(load_mnist creates its cache folder itself)"
        )
    if not mirrors:
        raise ValueError("mirrors is empty; pass at least one base URL")
    target = data_dir / f"{name}.gz"
    failures = []
    for base in mirrors:
        url = base.rstrip("/") + "/" + f"{name}.gz"
        fd, tmp_name = tempfile.mkstemp(dir=data_dir, prefix=f".{name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as tmp:
                _fetch_to(url, tmp, timeout)
            got = sha256_uncompressed(tmp_name)
            if got != sha256:
                raise ValueError(
                    f"checksum mismatch: sha256 of the uncompressed content is "
                    f"{got}, expected {sha256}"
                )
            os.replace(tmp_name, target)
            return target
        except (OSError, ValueError, http.client.HTTPException) as e:
            reason = " ".join(str(getattr(e, "reason", None) or e).split())
            failures.append(f"{url}: {type(e).__name__}: {reason}")
        finally:
            if os.path.exists(tmp_name):
                os.unlink(tmp_name)
    raise DownloadError(
        f"could not download {name}.gz into {str(data_dir)!r}; every mirror "
        "failed (" + "; ".join(failures) + "); check the network connection, or "
        f"place the file (gzip or raw IDX) in {str(data_dir)!r} yourself, or use "
        "the bundled test set with load_mnist('embedded') (--data embedded)"
    )


def download_mnist(
    data_dir: str | os.PathLike,
    mirrors: Sequence[str] = MNIST_MIRRORS,
    names: Sequence[str] | None = None,
    timeout: float = 60.0,
) -> dict[str, Path]:
    """Download the MNIST files missing from ``data_dir`` (each once).

    A file counts as present if ``<name>.gz`` or the raw ``<name>`` exists.

    Args:
      data_dir: an existing folder.
      mirrors: base URLs tried in order.
      names: which files; default all four keys of :data:`MNIST_SHA256`.
      timeout: seconds per connection attempt.

    Returns:
      ``{name: path}`` of each file, downloaded or already present.
    """
    names = list(MNIST_SHA256) if names is None else list(names)
    out = {}
    for name in names:
        if name not in MNIST_SHA256:
            raise ValueError(
                f"names contains {name!r}, not an MNIST file; choose from "
                f"{sorted(MNIST_SHA256)}"
            )
        data_dir = Path(data_dir)
        for candidate in (data_dir / f"{name}.gz", data_dir / name):
            if candidate.is_file():
                out[name] = candidate
                break
        else:
            out[name] = download_file(name, data_dir, MNIST_SHA256[name], mirrors, timeout)
    return out
