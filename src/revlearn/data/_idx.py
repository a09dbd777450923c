"""A strict reader (and writer) for the IDX format of the MNIST files.

An IDX file is::

    magic   : 4 bytes = 0x00 0x00 <dtype code> <ndim>
    dims    : ndim big-endian uint32 sizes d_0, ..., d_{ndim-1}
    payload : prod(d_i) * itemsize bytes, big-endian, row-major

with dtype codes 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32,
0x0E float64. Files may be gzip-compressed (detected by the gzip magic bytes
``1f 8b``, not by the file name). Every field is validated, and the payload
length must match the dims exactly, so a truncated or corrupt file raises a
``DataCorruptError`` (a ``ValueError`` and a ``revlearn.data.DataError``) naming
the file instead of returning wrong data; a missing file raises
``DataMissingError`` (a ``FileNotFoundError``). Nothing is ever unpickled.
:func:`read_idx_header` checks a file cheaply (its header and length only).
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from revlearn.data._errors import DataCorruptError, DataMissingError

__all__ = ["IDX_DTYPES", "encode_idx", "parse_idx", "read_idx", "read_idx_header"]

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
        raise DataCorruptError(
            f"IDX file {name!r} is a truncated gzip stream ({len(raw)} bytes; "
            f"{e}); delete it and download it again"
        ) from None
    except (gzip.BadGzipFile, zlib.error, OSError) as e:
        raise DataCorruptError(
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
      DataCorruptError (a ValueError): bad magic number, unknown dtype code, zero
        dims, or a payload whose length differs from ``prod(dims) * itemsize``.
    """
    if data[:2] == _GZIP_MAGIC:
        data = _decompress(data, name)
    if len(data) < 4:
        raise DataCorruptError(
            f"IDX file {name!r} has {len(data)} bytes, fewer than the 4-byte "
            "magic number; the file is truncated or not IDX"
        )
    zero0, zero1, code, ndim = data[0], data[1], data[2], data[3]
    if zero0 != 0 or zero1 != 0:
        raise DataCorruptError(
            f"IDX file {name!r} has magic number 0x{data[:4].hex()}, which "
            "does not start with two zero bytes; it is not an IDX file"
        )
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise DataCorruptError(
            f"IDX file {name!r} has dtype code 0x{code:02X}; known codes are "
            f"{known}; the file is corrupt or not IDX"
        )
    if ndim == 0:
        raise DataCorruptError(f"IDX file {name!r} declares 0 dimensions; expected >= 1")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataCorruptError(
            f"IDX file {name!r} is truncated inside its header: {len(data)} "
            f"bytes, but {ndim} dims need a {header_len}-byte header"
        )
    dims = struct.unpack(f">{ndim}I", data[4:header_len])
    if any(d == 0 for d in dims):
        raise DataCorruptError(f"IDX file {name!r} has a zero dimension in dims={dims}")
    dtype = IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    got = len(data) - header_len
    if got != expected:
        what = "truncated" if got < expected else "longer than declared"
        raise DataCorruptError(
            f"IDX file {name!r} is {what}: dims={dims} of {dtype.name} need a "
            f"{expected}-byte payload, found {got} bytes; delete it and "
            "download it again"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzip or raw) from ``path``; see :func:`parse_idx`.

    Raises:
      DataMissingError (a FileNotFoundError): ``path`` does not exist.
      DataCorruptError (a ValueError): the file is truncated, corrupt, not IDX, or
        cannot be read.
    """
    path = Path(path)
    if not path.is_file():
        raise DataMissingError(
            f"IDX file {str(path)!r} does not exist; check the path, or let "
            "revlearn.data.load_mnist download the MNIST files"
        )
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataCorruptError(
            f"IDX file {str(path)!r} cannot be read ({e.strerror or e}); check its "
            "permissions, or delete it and download it again"
        ) from None
    return parse_idx(raw, name=str(path))


def read_idx_header(path: str | os.PathLike) -> tuple[np.dtype, tuple[int, ...]]:
    """The dtype and dims of the IDX file at ``path`` (gzip or raw), checked cheaply:
    only the header is inflated, and the length of the content is compared with the
    dims (the file size of a raw file; a gzip file's recorded length of its content).

    Raises:
      DataMissingError: ``path`` does not exist.
      DataCorruptError: the file cannot be read, or its header or length is wrong.
    """
    path = Path(path)
    name = str(path)
    if not path.is_file():
        raise DataMissingError(
            f"IDX file {name!r} does not exist; check the path, or let "
            "revlearn.data.load_mnist download the MNIST files"
        )
    try:
        with open(path, "rb") as f:
            is_gzip = f.read(2) == _GZIP_MAGIC
            size = os.fstat(f.fileno()).st_size
            trailer = None
            if is_gzip and size >= 18:
                f.seek(size - 4)
                trailer = int.from_bytes(f.read(4), "little")
        opener = gzip.open if is_gzip else open
        with opener(path, "rb") as f:
            head = f.read(4)
            ndim = head[3] if len(head) == 4 else 0
            head += f.read(4 * ndim)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataCorruptError(
            f"IDX file {name!r} is a corrupt or truncated gzip stream ({e}); delete it "
            "and download it again"
        ) from None
    except OSError as e:
        raise DataCorruptError(
            f"IDX file {name!r} cannot be read ({e.strerror or e}); check its "
            "permissions, or delete it and download it again"
        ) from None
    # the header alone, parsed strictly: a payload of the declared length is faked so
    # that parse_idx checks the magic number, dtype code and dims
    if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in IDX_DTYPES \
            or head[3] == 0 or len(head) < 4 + 4 * head[3]:
        parse_idx(head, name=name)  # raises the precise DataCorruptError
    dims = struct.unpack(f">{head[3]}I", head[4:])
    if any(d == 0 for d in dims):
        parse_idx(head, name=name)
    dtype = IDX_DTYPES[head[2]]
    expected = len(head) + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    got = trailer if is_gzip else size
    if got is None or got != (expected % (1 << 32) if is_gzip else expected):
        what = "truncated" if got is None or got < expected else "longer than declared"
        raise DataCorruptError(
            f"IDX file {name!r} is {what}: dims={dims} of {dtype.name} need "
            f"{expected} bytes of content; delete it and download it again"
        )
    return dtype.newbyteorder("="), dims


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
