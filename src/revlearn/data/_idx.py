"""A strict reader (and writer) for the IDX format of the MNIST files.

An IDX file is::

    magic   : 4 bytes = 0x00 0x00 <dtype code> <ndim>
    dims    : ndim big-endian uint32 sizes d_0, ..., d_{ndim-1}
    payload : prod(d_i) * itemsize bytes, big-endian, row-major

with dtype codes 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32,
0x0E float64. Files may be gzip-compressed (detected by the gzip magic bytes
``1f 8b``, not by the file name). Every field is validated, and the payload
length must match the dims exactly, so a truncated or corrupt file raises a
``ValueError`` naming the file instead of returning wrong data. Nothing is ever
unpickled.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

__all__ = ["read_idx", "parse_idx", "encode_idx", "IDX_DTYPES"]

#: IDX dtype code -> big-endian numpy dtype.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_GZIP_MAGIC = b"\x1f\x8b"


def _decompress(raw: bytes, name: str) -> bytes:
    try:
        return gzip.decompress(raw)
    except EOFError as e:
        raise ValueError(
            f"IDX file {name!r} is a truncated gzip stream ({len(raw)} bytes; "
            f"{e}); delete it and download it again"
        ) from None
    except (gzip.BadGzipFile, zlib.error, OSError) as e:
        raise ValueError(
            f"IDX file {name!r} is a corrupt gzip stream ({e}); delete it and "
            "download it again"
        ) from None


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse the bytes of an IDX file (gzip or raw) into a numpy array.

    Args:
      data: the file's bytes; gzip-compressed content is detected and inflated.
      name: how to name the source in error messages (a path, usually).

    Returns:
      An array of shape ``(d_0, ..., d_{ndim-1})`` in the file's dtype, native
      byte order.

    Raises:
      ValueError: bad magic number, unknown dtype code, zero dims, or a payload
        whose length differs from ``prod(dims) * itemsize``.
    """
    if data[:2] == _GZIP_MAGIC:
        data = _decompress(data, name)
    if len(data) < 4:
        raise ValueError(
            f"IDX file {name!r} has {len(data)} bytes, fewer than the 4-byte "
            "magic number; the file is truncated or not IDX"
        )
    zero0, zero1, code, ndim = data[0], data[1], data[2], data[3]
    if zero0 != 0 or zero1 != 0:
        raise ValueError(
            f"IDX file {name!r} has magic number 0x{data[:4].hex()}, which "
            "does not start with two zero bytes; it is not an IDX file"
        )
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise ValueError(
            f"IDX file {name!r} has dtype code 0x{code:02X}; known codes are "
            f"{known}; the file is corrupt or not IDX"
        )
    if ndim == 0:
        raise ValueError(f"IDX file {name!r} declares 0 dimensions; expected >= 1")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise ValueError(
            f"IDX file {name!r} is truncated inside its header: {len(data)} "
            f"bytes, but {ndim} dims need a {header_len}-byte header"
        )
    dims = struct.unpack(f">{ndim}I", data[4:header_len])
    if any(d == 0 for d in dims):
        raise ValueError(f"IDX file {name!r} has a zero dimension in dims={dims}")
    dtype = IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    got = len(data) - header_len
    if got != expected:
        what = "truncated" if got < expected else "longer than declared"
        raise ValueError(
            f"IDX file {name!r} is {what}: dims={dims} of {dtype.name} need a "
            f"{expected}-byte payload, found {got} bytes; delete it and "
            "download it again"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzip or raw) from ``path``; see :func:`parse_idx`.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: the file is truncated, corrupt, or not IDX.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"IDX file {str(path)!r} does not exist; check the path, or let "
            "revlearn.data.load_mnist download the MNIST files"
        )
    return parse_idx(path.read_bytes(), name=str(path))


def encode_idx(array: np.ndarray, compress: bool = False) -> bytes:
    """Encode ``array`` as IDX bytes (optionally gzip-compressed); inverse of
    :func:`parse_idx`. Used to write small test files."""
    array = np.asarray(array)
    for code, dt in IDX_DTYPES.items():
        if dt.kind == array.dtype.kind and dt.itemsize == array.dtype.itemsize:
            break
    else:
        raise ValueError(
            f"array dtype {array.dtype} has no IDX code; cast it to one of "
            f"{[dt.name for dt in IDX_DTYPES.values()]}"
        )
    if array.ndim == 0 or array.ndim > 255:
        raise ValueError(f"array.ndim={array.ndim}; IDX needs 1 to 255 dims")
    header = bytes([0, 0, code, array.ndim]) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    out = header + np.ascontiguousarray(array, dtype=dt).tobytes()
    return gzip.compress(out, mtime=0) if compress else out
