"""Run folders: config, environment, metrics and atomic array checkpoints.

A run folder holds everything needed to inspect, re-plot or resume a run::

    RUN_DIR/
      config.json      what was run (written once, compared on resume)
      env.json         python / jax / jaxlib / numpy / optax versions, devices,
                       platform, CPU count, git revision of the source tree
      metrics.jsonl    one JSON object per meta-iteration, appended and flushed
      checkpoint.npz   the meta-optimiser's state (see `revlearn.meta.meta_optimize`)
      summary.json     the headline numbers of the run
      *.npz            arrays and pytrees saved by the experiment
      figures/*.png    figures, re-rendered from the files above

Every file except metrics.jsonl is written atomically: to a temporary file in
the same folder, flushed and fsync-ed, then moved over the target with
`os.replace`, so a run killed at any moment leaves either the old or the new
file, never a torn one. Arrays are stored with `numpy.savez` and read with
`allow_pickle=False`: nothing is ever unpickled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

__all__ = ["RunDir", "environment", "to_json"]


def to_json(obj: Any) -> Any:
    """`obj` as plain JSON values: dataclasses and mappings become dicts, tuples
    lists, numpy/jax scalars Python numbers, small arrays lists; non-finite
    floats become None (JSON has no NaN). Anything else raises TypeError."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.ndarray, jax.Array)):
        arr = np.asarray(obj)
        if arr.ndim == 0:
            return to_json(arr.item())
        if arr.size <= 10_000:
            return to_json(arr.tolist())
        raise TypeError(f"an array of shape {arr.shape} is too large for JSON; save it "
                        "with RunDir.save_arrays instead")
    raise TypeError(f"cannot write {type(obj).__name__} {obj!r} as JSON; convert it to "
                    "numbers, strings, lists or dicts")


def _git_revision(folder: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True,
                             text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    rev = out.stdout.strip()
    if out.returncode != 0 or not rev:
        return None
    try:
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=folder, capture_output=True, text=True, timeout=10,
                               check=False)
        if dirty.returncode == 0 and dirty.stdout.strip():
            rev += "-dirty"
    except (OSError, subprocess.SubprocessError):
        pass
    return rev


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(module)
    except Exception:  # not installed, or no metadata
        return None


def environment() -> dict:
    """Where a run ran: versions, JAX devices, platform, CPU count, git revision
    of the revlearn source tree (None outside a git checkout), x64 mode."""
    package_dir = Path(__file__).resolve().parent.parent
    return {
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "jaxlib": _version("jaxlib"),
        "numpy": np.__version__,
        "optax": _version("optax"),
        "revlearn": _version("revlearn"),
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) + f" ({d.device_kind})" for d in jax.devices()],
        "jax_enable_x64": bool(jax.config.jax_enable_x64),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "git_revision": _git_revision(package_dir),
    }


@contextlib.contextmanager
def _atomic(path: Path, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary file beside `path`; on success fsync it and replace `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _leaf_key(i: int) -> str:
    return f"leaf_{i:05d}"


def _path_name(path) -> str:
    """A key path as "a/0/b": dict keys, sequence indices and attribute names."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        else:
            parts.append(str(k))
    return "/".join(parts)


class RunDir:
    """A run folder (created if missing). See the module docstring for its layout.

    Args:
      path: the folder.
      resume: whether this run continues the one already in the folder;
        `revlearn.meta.meta_optimize` reads it when its own `resume` is None.
      progress: whether loops over this run show a progress bar;
        `meta_optimize` reads it when its own `progress` is None.
    """

    CONFIG = "config.json"
    ENV = "env.json"
    METRICS = "metrics.jsonl"
    SUMMARY = "summary.json"
    CHECKPOINT = "checkpoint"

    def __init__(self, path: str | os.PathLike, *, resume: bool = False, progress: bool = True):
        self.path = Path(path)
        self.resume = bool(resume)
        self.progress = bool(progress)
        self.path.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r}, resume={self.resume})"

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def figures(self) -> Path:
        """The figures folder, created on first use."""
        folder = self.path / "figures"
        folder.mkdir(exist_ok=True)
        return folder

    # -- JSON -----------------------------------------------------------------
    def write_json(self, name: str, obj: Any) -> Path:
        """Write `to_json(obj)` to `name` atomically, indented and key-sorted."""
        path = self.path / name
        with _atomic(path, "w") as f:
            json.dump(to_json(obj), f, indent=2, sort_keys=True, allow_nan=False)
            f.write("\n")
        return path

    def read_json(self, name: str) -> Any:
        """The JSON value in `name`; FileNotFoundError if it is missing."""
        with open(self.path / name, encoding="utf-8") as f:
            return json.load(f)

    def write_config(self, config: Any) -> Path:
        """Write `config` (a dataclass or dict) to config.json."""
        return self.write_json(self.CONFIG, config)

    def read_config(self) -> dict | None:
        """The saved config.json, or None if there is none."""
        if not (self.path / self.CONFIG).is_file():
            return None
        return self.read_json(self.CONFIG)

    def write_env(self) -> Path:
        """Write `environment()` to env.json."""
        return self.write_json(self.ENV, environment())

    # -- metrics --------------------------------------------------------------
    def append_metrics(self, record: Mapping[str, Any]) -> None:
        """Append one JSON line to metrics.jsonl, flushed and fsync-ed."""
        line = json.dumps(to_json(record), sort_keys=True, allow_nan=False)
        with open(self.path / self.METRICS, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_metrics(self) -> list[dict]:
        """Every complete record of metrics.jsonl (a torn last line is skipped)."""
        path = self.path / self.METRICS
        if not path.is_file():
            return []
        records = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.endswith("\n"):
                    break  # torn write of a killed run
                records.append(json.loads(line))
        return records

    def truncate_metrics(self, iterations: int) -> None:
        """Keep only the records with `iteration < iterations` (atomically):
        what a resumed run does to drop entries beyond its checkpoint."""
        kept = [r for r in self.read_metrics() if int(r.get("iteration", -1)) < iterations]
        with _atomic(self.path / self.METRICS, "w") as f:
            for r in kept:
                f.write(json.dumps(r, sort_keys=True, allow_nan=False) + "\n")

    # -- arrays ---------------------------------------------------------------
    def save_arrays(self, name: str, tree: Any) -> Path:
        """Save a pytree of arrays to `name` (".npz" appended if missing), atomically.

        The leaves are stored in flattening order as `leaf_00000`, ... together
        with their key paths written "a/0/b" (`__paths__`), so
        `load_arrays(name, template)` checks the structure. Without a template
        it loads back as a flat dict keyed by those paths: a flat dict of
        arrays comes back as itself.
        """
        path = self._npz(name)
        with_path = jax.tree_util.tree_flatten_with_path(tree)[0]
        arrays = {}
        for i, (key, leaf) in enumerate(with_path):
            arr = np.asarray(leaf)
            if arr.dtype.kind not in "biufc":
                raise TypeError(
                    f"leaf {jax.tree_util.keystr(key)} has dtype {arr.dtype}; only bool, "
                    "integer, float and complex arrays can be saved (no pickling). Convert "
                    "PRNG keys with jax.random.key_data first.")
            arrays[_leaf_key(i)] = arr
        arrays["__paths__"] = np.array([_path_name(k) for k, _ in with_path], dtype=np.str_)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        with _atomic(path, "wb") as f:
            f.write(buffer.getvalue())
        return path

    def has_arrays(self, name: str) -> bool:
        return self._npz(name).is_file()

    def load_arrays(self, name: str, template: Any = None) -> Any:
        """Load what `save_arrays(name, tree)` saved.

        Args:
          name: the file name (".npz" appended if missing).
          template: a pytree with the structure of the saved tree (its leaves'
            values are ignored; shapes and dtypes are checked). If None, returns
            a flat dict `{"a/0/b": array}` (see `save_arrays`).

        Raises:
          FileNotFoundError: no such file.
          ValueError: the file does not match the template.
        """
        path = self._npz(name)
        with np.load(path, allow_pickle=False) as data:
            paths = [str(p) for p in data["__paths__"]]
            leaves = [data[_leaf_key(i)] for i in range(len(paths))]
        if template is None:
            return dict(zip(paths, leaves))
        t_with_path, treedef = jax.tree_util.tree_flatten_with_path(template)
        t_paths = [_path_name(k) for k, _ in t_with_path]
        if t_paths != paths:
            raise ValueError(f"{path} holds leaves {paths}, but the template has {t_paths}; "
                             "load it with the pytree structure it was saved with")
        for p, saved, (_, t) in zip(paths, leaves, t_with_path):
            t = np.asarray(t)
            if saved.shape != t.shape or saved.dtype != t.dtype:
                raise ValueError(f"{path}: leaf {p} is {saved.dtype}{list(saved.shape)} but the "
                                 f"template has {t.dtype}{list(t.shape)}")
        return jax.tree_util.tree_unflatten(treedef, leaves)

    def _npz(self, name: str) -> Path:
        return self.path / (name if name.endswith(".npz") else name + ".npz")
