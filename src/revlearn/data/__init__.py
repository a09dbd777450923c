"""MNIST data: a strict IDX reader, the bundled test set, a verified cached
download of the full set, and deterministic splits. Depends on numpy only.

Missing or unreadable data raises :class:`DataError` (an OSError; one line naming
the path and the fix); :func:`check_source` checks a source cheaply before a run.
`python -m revlearn.data download [DIR]` fetches the full set.
"""

from revlearn.data._download import (
    MNIST_MIRRORS,
    MNIST_SHA256,
    DownloadError,
    download_file,
    download_mnist,
    sha256_uncompressed,
)
from revlearn.data._errors import DataCorruptError, DataError, DataMissingError
from revlearn.data._idx import encode_idx, parse_idx, read_idx, read_idx_header
from revlearn.data._mnist import (
    N_CLASSES,
    N_TRAIN,
    SOURCES,
    Dataset,
    check_source,
    load_mnist,
    mnist_dir,
    one_hot,
)
from revlearn.data._omniglot import load_omniglot
from revlearn.data._splits import class_balanced_indices, split, subtract_mean

__all__ = [
    "MNIST_MIRRORS",
    "MNIST_SHA256",
    "N_CLASSES",
    "N_TRAIN",
    "SOURCES",
    "DataCorruptError",
    "DataError",
    "DataMissingError",
    "Dataset",
    "DownloadError",
    "check_source",
    "class_balanced_indices",
    "download_file",
    "download_mnist",
    "encode_idx",
    "load_mnist",
    "load_omniglot",
    "mnist_dir",
    "one_hot",
    "parse_idx",
    "read_idx",
    "read_idx_header",
    "sha256_uncompressed",
    "split",
    "subtract_mean",
]
