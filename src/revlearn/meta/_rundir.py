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
      .lock            held (flock) by the process writing the folder

The folder is a small transactional store:

* **One writer.** `RunDir.lock()` takes an exclusive `fcntl.flock` on `.lock`
  for the life of the process; a second writer fails at once with
  `RunDirBusy`, naming the holder's PID. The kernel drops the lock when the
  holder dies, even by SIGKILL.
* **Atomic files.** Every file except metrics.jsonl (appended line by line,
  fsync-ed; a torn last line is skipped) is written to a temporary file in the
  same folder, fsync-ed, then moved over the target with `os.replace`: a run
  killed at any moment leaves the old or the new file, never a torn one.
  Leftover temporaries of a killed run are removed by `begin`.
* **Nothing stale is read.** `begin` gives every run a fresh `run_id`, stored
  in config.json before anything else is written; arrays and metrics lines
  carry it, and `has_arrays` / `load_arrays` / `read_metrics` ignore or refuse
  what another run wrote. A run killed half-way through `--overwrite` thus
  never mixes with the one it replaced.
* **A damaged checkpoint is survivable.** `save_arrays(..., keep_previous=True)`
  keeps the previous version as NAME.prev.npz; `load_arrays(...,
  fallback=True)` reads it, with a warning, when the latest is unreadable.
  Otherwise an unreadable file raises `RunFileError`, naming the file and the fix.

Arrays are stored with `numpy.savez` and read with `allow_pickle=False`:
nothing is ever unpickled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import uuid
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

__all__ = ["RunDir", "RunDirError", "RunDirBusy", "RunFileError", "environment", "save_figure",
           "to_json"]


class RunDirError(Exception):
    """A run folder cannot be used as asked (the message says why and what to do)."""


class RunDirBusy(RunDirError):
    """Another process holds the run folder's lock."""


class RunFileError(RunDirError):
    """A file of a run folder is unreadable, damaged or written by another run."""


def to_json(obj: Any) -> Any:
    """`obj` as plain JSON values.

    Dataclasses and mappings become dicts, tuples lists, numpy/jax scalars Python
    numbers, arrays of at most 10,000 elements lists, paths strings; non-finite floats
    become None (JSON has no NaN).

    Args:
      obj: the value to convert.

    Returns:
      Dicts, lists, numbers, strings, booleans and None only.

    Raises:
      TypeError: an array too large for JSON, or a value of another type.

    Example:
        ```python
        json.dumps(revlearn.meta.to_json({"loss": jnp.float32(0.5), "lr": np.ones(3)}))
        ```
    """
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
    """Where a run ran, as `env.json` records it.

    Returns:
      A dict: Python, JAX, jaxlib, numpy, optax and revlearn versions, the JAX backend and
      devices, x64 mode, platform, machine, CPU count, and the git revision of the revlearn
      source tree (None outside a git checkout).

    Example:
        ```python
        print(revlearn.meta.environment()["jax_devices"])
        ```
    """
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give: mkstemp's files are 0600
TMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def _atomic(path: Path, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary file beside `path`; on success fsync it and replace `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def save_figure(fig, path: str | os.PathLike, *, dpi: int) -> Path:
    """Write a matplotlib figure to a PNG atomically, like every run file.

    Args:
      fig: a matplotlib figure.
      path: the PNG's path.
      dpi: resolution.

    Returns:
      The path written.

    Example:
        ```python
        revlearn.meta.save_figure(fig, run_dir.figures / "meta_curve.png", dpi=120)
        ```
    """
    path = Path(path)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    with _atomic(path, "wb") as f:
        f.write(buffer.getvalue())
    return path


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

    A writer calls `lock()` and then `begin(record)`; readers (`revlearn plot`)
    just construct it: `run_id` is read from config.json, so what another run
    left behind is never taken for this run's.

    Args:
      path: the folder.
      resume: whether this run continues the one already in the folder;
        `revlearn.meta.meta_optimize` reads it when its own `resume` is None.
      progress: whether loops over this run show a progress bar;
        `meta_optimize` reads it when its own `progress` is None.

    Raises:
      RunDirError: the folder cannot be created or is not a folder (one line naming the
        path and what to do); `lock()` raises `RunDirBusy` while another process holds
        the folder.

    Example:
        ```python
        run_dir = revlearn.meta.RunDir("runs/my-run", resume=True)
        result = revlearn.meta.meta_optimize(hypergrad_fn, hypers0, optax.adam(0.05), 30,
                                             run_dir)
        ```
    """

    CONFIG = "config.json"
    ENV = "env.json"
    METRICS = "metrics.jsonl"
    SUMMARY = "summary.json"
    CHECKPOINT = "checkpoint"
    LOCK = ".lock"
    _RUN_KEY = "__run_id__"   # in every .npz
    _RUN_FIELD = "_run"       # in every metrics line

    def __init__(self, path: str | os.PathLike, *, resume: bool = False, progress: bool = True):
        self.path = Path(path)
        self.resume = bool(resume)
        self.progress = bool(progress)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise RunDirError(f"{self.path} exists and is not a folder; pass a folder path") from None
        except NotADirectoryError:
            raise RunDirError(f"cannot create the run folder {self.path}: a part of the path "
                              "is a file; pass a folder path") from None
        except PermissionError:
            raise RunDirError(f"cannot create the run folder {self.path}: permission denied; "
                              "pass a folder you can write") from None
        except OSError as e:
            raise RunDirError(f"cannot create the run folder {self.path}: {e.strerror}") from None
        self._lock_fd: int | None = None
        config = self.read_config() if (self.path / self.CONFIG).is_file() else None
        self.run_id: str | None = config.get("run_id") if isinstance(config, dict) else None

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

    # -- the writer's transaction ----------------------------------------------
    def lock(self) -> RunDir:
        """Take the folder's exclusive lock for the life of this process (or `unlock`).

        Raises:
          RunDirBusy: another process holds it (the message names its PID).
          RunDirError: the folder cannot be written.
        """
        if self._lock_fd is not None:
            return self
        import fcntl

        path = self.path / self.LOCK
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, _FILE_MODE)
        except OSError as e:
            raise RunDirError(f"cannot write the run folder {self.path}: {e.strerror}; pass "
                              "--out a folder you can write") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirBusy(f"{self.path} is in use by another revlearn process (PID "
                                 f"{holder}); wait for it to finish, or pass another --out") from None
            raise RunDirError(f"cannot lock {path}: {e.strerror}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        return self

    def unlock(self) -> None:
        """Release the lock taken by `lock` (closing the descriptor drops the flock)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def holds_run(self) -> bool:
        """Whether the folder holds a run (a config.json)."""
        return (self.path / self.CONFIG).is_file()

    def begin(self, record: Mapping[str, Any], *, fresh: bool) -> str:
        """Start (`fresh`) or continue this run; needs `lock()`. Returns the run's id.

        Fresh: config.json is written first, with a new `run_id` (from then on
        nothing an older run left is read), then everything else in the folder
        but the lock is deleted. Continued: the saved `run_id` is kept.
        Either way leftover temporary files of a killed writer are removed.
        """
        if self._lock_fd is None:
            raise RunDirError(f"{self.path}: begin() needs the folder's lock (call lock() first)")
        if fresh or self.run_id is None:
            self.run_id = uuid.uuid4().hex
            self.write_config(dict(record, run_id=self.run_id))
            self._clear(keep=(self.LOCK, self.CONFIG))
        self._remove_temporaries()
        return self.run_id

    def _clear(self, keep: tuple[str, ...]) -> None:
        first = [self.path / n for n in (self.SUMMARY, self.METRICS)]
        for entry in first + sorted(self.path.iterdir()):
            if entry.name in keep or not os.path.lexists(entry):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def _remove_temporaries(self) -> None:
        for folder in (self.path, self.path / "figures"):
            if folder.is_dir():
                for tmp in folder.glob(f".*{TMP_SUFFIX}"):
                    with contextlib.suppress(OSError):
                        tmp.unlink()

    # -- JSON -----------------------------------------------------------------
    def write_json(self, name: str, obj: Any) -> Path:
        """Write `to_json(obj)` to `name` atomically, indented and key-sorted."""
        path = self.path / name
        with _atomic(path, "w") as f:
            json.dump(to_json(obj), f, indent=2, sort_keys=True, allow_nan=False)
            f.write("\n")
        return path

    def read_json(self, name: str) -> Any:
        """The JSON value in `name`.

        Raises:
          FileNotFoundError: it is missing.
          RunFileError: it is not valid JSON.
        """
        path = self.path / name
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RunFileError(f"{path} is damaged (not valid JSON: {e}); start the run again "
                               "with --overwrite") from None

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
        """Append one JSON line to metrics.jsonl, flushed and fsync-ed (tagged with `run_id`)."""
        record = dict(record)
        if self.run_id is not None:
            record[self._RUN_FIELD] = self.run_id
        line = json.dumps(to_json(record), sort_keys=True, allow_nan=False)
        with open(self.path / self.METRICS, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _metric_lines(self) -> list[dict]:
        path = self.path / self.METRICS
        if not path.is_file():
            return []
        records = []
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if not line.endswith("\n"):
                    break  # torn write of a killed run
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise RunFileError(f"{path} line {number} is not valid JSON ({e.msg}); the "
                                       "run folder is damaged: start it again with --overwrite"
                                       ) from None
                if not isinstance(record, dict):
                    raise RunFileError(f"{path} line {number} is not a JSON object; the run "
                                       "folder is damaged: start it again with --overwrite")
                records.append(record)
        return records

    def read_metrics(self) -> list[dict]:
        """Every complete record of metrics.jsonl written by this run (a torn last line is
        skipped; lines of another run are ignored)."""
        out = []
        for r in self._metric_lines():
            run = r.pop(self._RUN_FIELD, None)
            if self.run_id is None or run == self.run_id:
                out.append(r)
        return out

    def truncate_metrics(self, iterations: int) -> None:
        """Keep only this run's records with `iteration < iterations` (atomically):
        what a resumed run does to drop entries beyond its checkpoint."""
        kept = [r for r in self.read_metrics() if int(r.get("iteration", -1)) < iterations]
        with _atomic(self.path / self.METRICS, "w") as f:
            for r in kept:
                if self.run_id is not None:
                    r = dict(r, **{self._RUN_FIELD: self.run_id})
                f.write(json.dumps(r, sort_keys=True, allow_nan=False) + "\n")

    # -- arrays ---------------------------------------------------------------
    def save_arrays(self, name: str, tree: Any, *, keep_previous: bool = False) -> Path:
        """Save a pytree of arrays to `name` (".npz" appended if missing), atomically.

        The leaves are stored in flattening order as `leaf_00000`, ... together
        with their key paths written "a/0/b" (`__paths__`) and the `run_id`, so
        `load_arrays(name, template)` checks the structure and the run. Without
        a template it loads back as a flat dict keyed by those paths: a flat
        dict of arrays comes back as itself. `keep_previous` keeps the file
        being replaced as NAME.prev.npz (what `load_arrays(fallback=True)` reads
        if the latest is damaged).
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
        if self.run_id is not None:
            arrays[self._RUN_KEY] = np.array(self.run_id, dtype=np.str_)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        with _atomic(path, "wb") as f:
            f.write(buffer.getvalue())
            if keep_previous and path.exists():  # a kill before the new one lands: prev read
                os.replace(path, self._previous(path))
        return path

    def has_arrays(self, name: str) -> bool:
        """Whether `name` holds arrays this run saved (a file of another run does not count)."""
        path = self._npz(name)
        if not path.is_file():
            return False
        if self.run_id is None:
            return True
        try:
            with np.load(path, allow_pickle=False) as data:
                return self._RUN_KEY in data.files and str(data[self._RUN_KEY]) == self.run_id
        except Exception:  # unreadable: load_arrays says why
            return True

    def load_arrays(self, name: str, template: Any = None, *, fallback: bool = False) -> Any:
        """Load what `save_arrays(name, tree)` saved.

        Args:
          name: the file name (".npz" appended if missing).
          template: a pytree with the structure of the saved tree (its leaves'
            values are ignored; shapes and dtypes are checked). If None, returns
            a flat dict `{"a/0/b": array}` (see `save_arrays`).
          fallback: if the file is unreadable or missing, read the previous
            version kept by `save_arrays(..., keep_previous=True)` instead, with
            a warning.

        Raises:
          FileNotFoundError: no such file (nor, with `fallback`, a previous one).
          RunFileError: the file is damaged or another run wrote it (with
            `fallback`: and so is the previous one).
          ValueError: the file does not match the template.
        """
        path = self._npz(name)
        if not fallback:
            return self._load(path, template)
        try:
            return self._load(path, template)
        except (RunFileError, FileNotFoundError) as latest:
            previous = self._previous(path)
            if not previous.is_file():
                raise
            try:
                out = self._load(previous, template)
            except (RunFileError, FileNotFoundError):
                raise latest from None
            warnings.warn(f"{latest}; using the previous version, {previous.name}",
                          RuntimeWarning, stacklevel=2)
            return out

    def _load(self, path: Path, template: Any) -> Any:
        try:
            with np.load(path, allow_pickle=False) as data:
                run = str(data[self._RUN_KEY]) if self._RUN_KEY in data.files else None
                paths = [str(p) for p in data["__paths__"]]
                leaves = [data[_leaf_key(i)] for i in range(len(paths))]
        except FileNotFoundError:
            raise
        except (zipfile.BadZipFile, EOFError, KeyError, ValueError, OSError) as e:
            reason = str(e).split("\n")[0] or type(e).__name__
            raise RunFileError(f"{path} is damaged ({type(e).__name__}: {reason}); start the "
                               "run again with --overwrite") from None
        if self.run_id is not None and run != self.run_id:
            raise RunFileError(f"{path} was written by another run than this folder's "
                               "config.json (a run interrupted while being replaced); finish "
                               "the run with --resume, or start it again with --overwrite")
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

    @staticmethod
    def _previous(path: Path) -> Path:
        return path.with_name(path.name[: -len(".npz")] + ".prev.npz")
