"""The exceptions of `revlearn.data`: one class for "the data is not there or unreadable".

    DataError(OSError)                       catch this one
    ├── DataMissingError(DataError, FileNotFoundError)   a file or folder does not exist
    ├── DataCorruptError(DataError, ValueError)          a file is truncated, corrupt or not IDX
    └── DownloadError(DataError)                         no mirror delivered a verified file

Each message is one line that names the path and says how to fix it. The
subclasses keep the built-in classes these errors were raised as before
(FileNotFoundError, ValueError), so existing `except` clauses still catch them.
"""

from __future__ import annotations

__all__ = ["DataCorruptError", "DataError", "DataMissingError"]


class DataError(OSError):
    """The data a run needs is not there or cannot be read (one-line message: the path and
    the fix)."""


class DataMissingError(DataError, FileNotFoundError):
    """A data file or folder does not exist."""


class DataCorruptError(DataError, ValueError):
    """A data file exists but is truncated, corrupt, unreadable or not what it should be."""
