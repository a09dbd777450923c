"""Every experiment setting and data source is checked once, at the edge, with one-line errors.

No training here: configs are built and validated, data sources checked, and the command
line is driven only up to its first error.
"""

from __future__ import annotations

import math
import socket
import types
import typing

import numpy as np
import pytest

import revlearn
from revlearn import data, experiments
from revlearn.experiments import (
    ConfigError,
    apply_overrides,
    parse_value,
    validate_config,
)
from _cli import error_line

ALL = experiments.names()


def _reject(name: str, override: str, smoke: bool = False) -> str:
    """The ConfigError message of `--set override` on experiment `name`'s defaults (and, with
    `smoke`, on its smoke config too)."""
    exp = experiments.get(name)
    messages = []
    for base in (exp.Config(), exp.smoke) if smoke else (exp.Config(),):
        with pytest.raises(ConfigError) as info:
            validate_config(exp, apply_overrides(exp, base, [override]))
        messages.append(str(info.value))
    msg = messages[0]
    key = override.partition("=")[0]
    assert "\n" not in msg and msg.strip() == msg, msg
    assert key in msg, (override, msg)
    return msg


# -- the generic checks, driven by the field types --------------------------------------------

def _float_fields(exp) -> list[tuple[str, object]]:
    out = []
    for f, tp in exp.field_types().items():
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if tp is float or (typing.get_origin(tp) in (typing.Union, types.UnionType)
                           and args == [float]):
            out.append((f, "scalar"))
        elif typing.get_origin(tp) is tuple and float in typing.get_args(tp):
            out.append((f, len(typing.get_args(tp))
                        if Ellipsis not in typing.get_args(tp) else "varlen"))
    return out


NONFINITE = [(name, f, kind, bad) for name in ALL
             for f, kind in _float_fields(experiments.get(name))
             for bad in ("nan", "inf", "-inf")]


@pytest.mark.parametrize("name,field,kind,bad", NONFINITE,
                         ids=[f"{n}-{f}-{b}" for n, f, _, b in NONFINITE])
def test_every_float_field_rejects_nonfinite(name, field, kind, bad):
    if kind == "scalar":
        value = bad
    elif kind == "varlen":
        value = f"0.5,{bad}"
    else:
        value = ",".join([bad] + ["1.0"] * (kind - 1))
    msg = _reject(name, f"{field}={value}", smoke=True)
    assert "finite" in msg


def test_parse_value_rejects_nonfinite_floats():
    for text in ("nan", "NaN", "inf", "-inf", "Infinity", " inf "):
        with pytest.raises(ConfigError, match=r"^lr=.* is not a finite number"):
            parse_value(text, float, key="lr")
        with pytest.raises(ConfigError, match=r"^clip=.* is not a finite number"):
            parse_value(text, float | None, key="clip")
    with pytest.raises(ConfigError, match=r"^fd_h=1e-3,nan holds nan, which is not a finite"):
        parse_value("1e-3,nan", tuple[float, ...], key="fd_h")
    with pytest.raises(ConfigError, match=r"^w0=inf,1 holds inf"):
        parse_value("inf,1", tuple[float, float], key="w0")
    assert parse_value("1e-300", float) == 1e-300 and parse_value("none", float | None) is None


@pytest.mark.parametrize("name", ALL)
def test_defaults_and_smoke_configs_validate(name):
    exp = experiments.get(name)
    assert validate_config(exp, exp.Config()) == exp.Config()
    assert validate_config(exp, exp.smoke) is exp.smoke
    # every field type is one the generic check understands (a new type needs a rule there)
    for field, tp in exp.field_types().items():
        parts = [tp]
        while parts:
            t = parts.pop()
            if typing.get_origin(t) is typing.Literal:
                continue
            if typing.get_origin(t) is not None:
                parts += [a for a in typing.get_args(t) if a not in (Ellipsis, type(None))]
                continue
            assert t in (int, float, bool, str), (field, tp)


@pytest.mark.parametrize("name", ALL)
def test_validate_config_catches_values_set_around_post_init(name):
    """A config whose value was forced in (no __post_init__) is still caught, generically."""
    exp = experiments.get(name)
    field, kind = _float_fields(exp)[0]
    config = exp.Config()
    bad = math.nan if kind == "scalar" else (
        (0.5, math.nan) if kind == "varlen" else (math.nan,) * kind)
    object.__setattr__(config, field, bad)
    with pytest.raises(ConfigError, match=rf"^{exp.name}: {field}=.*finite") as info:
        validate_config(exp, config)
    assert "\n" not in str(info.value)
    config = exp.Config()
    object.__setattr__(config, "seed", -1)
    with pytest.raises(ConfigError, match=rf"^{exp.name}: seed=-1 "):
        validate_config(exp, config)
    with pytest.raises(ConfigError, match="not .*Config"):
        validate_config(exp, object())


# -- every field's range ----------------------------------------------------------------------

MOMENTUM_BAD = ("0.999999", "1.0", "0", "-0.5", "1e-6")
COMMON = {  # key: bad values, for every experiment that has the key
    "seed": ("-1",),
    "n_train": ("0", "-5"), "n_valid": ("-1",), "n_test": ("0", "-1"),
    "batch_size": ("0", "-1"), "steps": ("0", "-3"), "hidden": ("0",),
    "lr": ("0", "-1"), "meta_lr": ("0", "-0.1"), "meta_iterations": ("-1",),
    "clip": ("-1", "0"), "momentum": MOMENTUM_BAD,
    "init_l2": ("0", "-1e-3"), "n_eval": ("0",),
}
SPECIFIC = {
    "quickstart": ["init_lr=0", "init_lr=-0.1", "n_freq=-1", "n_freq=101", "n_train=9000",
                   "steps=1.5", "momentum=abc", "data=cifar"],
    "canonical-examples": ["per_class=0", "per_class=300", "real_draws=0", "full_steps=0",
                           "full_batch=0", "l2=-1e-4", "meta_lr_scalars=0",
                           "validation_sizes=0,100", "study_resolutions=5", "learner=svm",
                           "n_valid=9000"],
    "augmentation": ["terms=1", "substeps=0", "eval_seeds=0", "t_scale=0", "t_clip=-1",
                     "max_edge=0", "init_scale=-0.1", "penalty_strength=-1", "penalty=l3"],
    "init-distribution": ["n_bins=0", "bias_scale=0", "meta_lr_end=-0.1", "meta_lr_end=1.5",
                          "n_curve_draws=0", "n_train=9500"],
    "schedules": ["sizes=784,0,10", "sizes=100,10", "n_average=0", "init_decay=0.05",
                  "init_decay=0.9999", "min_decay=0", "min_decay=1e-6", "n_train=10001",
                  "b2=1.0", "eps=0"],
    "adam-schedules": ["min_decay=0.001", "init_decay=0.05", "init_decay=0.99999999",
                       "b2=1.0", "b2=0.99999999", "b2=0", "eps=0", "eps=-1e-8",
                       "init_decay=1.5"],
    "chaos": ["sizes=784,0,10", "scale_points=1", "lr_zoom_points=1", "chunk=0", "fd_steps=0",
              "fd_h=1e-3,0", "fd_h=", "scale_range=1,-4", "lr_zoom=2,2", "frac_bits=7",
              "frac_bits=61", "lr_steps=-1", "n_train=20000"],
    "toy": ["init_momentum=0.999999", "init_momentum=1", "min_momentum=0", "min_momentum=1e-6",
            "init_momentum=0.3", "reverse_momentum=0.4", "reverse_steps=0", "meta_momentum=1",
            "w0=1"],
    "omniglot-sharing": ["hidden=400,0", "hidden=", "n_valid=12", "n_test=9", "init_sharing=1.5",
                         "init_sharing=-0.1", "dtype=float16"],
    "l2-per-weight": ["meta_penalty=-0.01", "grid=-1", "grid=", "meta_optimizer=rmsprop",
                      "n_train=8000"],
    "learned-structure": ["grid=5", "channels=0", "max_strength=0", "init_l2=0", "init_tie=2",
                          "init_tie=0", "conv_kernels=0", "l2_grid=1.5", "l2_grid=",
                          "n_test=9000"],
}


def _range_cases():
    assert set(SPECIFIC) == set(ALL), "every experiment needs a table of bad overrides"
    cases = []
    for name in ALL:
        fields = set(experiments.get(name).field_types())
        for key, values in COMMON.items():
            if key in fields and not (name == "learned-structure" and key == "grid"):
                cases += [(name, f"{key}={v}") for v in values]
        stale = [o for o in SPECIFIC[name] if o.partition("=")[0] not in fields]
        assert not stale, f"{name}: bad-override cases for settings it does not have: {stale}"
        cases += [(name, o) for o in SPECIFIC[name]]
    return cases


RANGE_CASES = _range_cases()


@pytest.mark.parametrize("name,override", RANGE_CASES, ids=[f"{n}-{o}" for n, o in RANGE_CASES])
def test_bad_override_is_rejected_in_one_line(name, override):
    _reject(name, override)



@pytest.mark.parametrize("override,applied", [("momentum=0.999999", "65536"),
                                              ("momentum=1.0", "65536"),
                                              ("momentum=0", "= 0"),
                                              ("momentum=1e-6", "= 0")])
def test_momentum_message_states_the_grid_facts(override, applied):
    msg = _reject("l2-per-weight", override)
    value = override.partition("=")[2]
    assert msg.startswith(f"l2-per-weight: momentum={float(value)!r} ")
    assert "n/2^16" in msg and applied in msg and "[2, 65535]" in msg  # what it rounds to
    assert "pass a value in [3.05176e-05, 0.9999847412]" in msg and "momentum=0.9" in msg


def _core_accepts(rule) -> bool:
    import jax.numpy as jnp

    from revlearn import _train
    try:
        _train.prepare(lambda w, h, t: jnp.sum(w ** 2), jnp.ones(3, jnp.float64),
                       optimizer=rule, steps=2)
    except ValueError:
        return False
    return True


def _ours_accepts(name: str, key: str, value: float) -> bool:
    exp = experiments.get(name)
    try:
        validate_config(exp, apply_overrides(exp, exp.Config(), [f"{key}={value!r}"]))
    except ConfigError:
        return False
    return True


def test_momentum_check_agrees_with_the_core():
    """A config accepts exactly the momenta the core accepts (its grid n/2^16, 2 <= n <= 65535)."""
    import jax
    jax.config.update("jax_enable_x64", True)
    values = [0.9, 0.5, 0.99998, 0.999985, 0.9999924, 0.999999, 1.0, 2 / 65536, 1.6 / 65536,
              1.4 / 65536, 1e-6, 0.0, -0.1]
    core = [_core_accepts(revlearn.optim.momentum(0.1, v)) for v in values]
    assert core[:2] == [True, True] and not all(core)
    for name in ("quickstart", "l2-per-weight", "chaos"):
        assert [_ours_accepts(name, "momentum", v) for v in values] == core, name


def test_adam_b2_check_agrees_with_the_core():
    """adam-schedules accepts exactly the b2 the core accepts (its grid n/2^24)."""
    import jax
    jax.config.update("jax_enable_x64", True)
    values = [0.999, 0.9999999, 0.99999997, 0.99999999, 1.0, 2 ** -7, 0.5 * 2 ** -7, 0.0]
    core = [_core_accepts(revlearn.optim.adam(1e-3, b1=0.9, b2=v)) for v in values]
    assert core[0] and not all(core)
    assert [_ours_accepts("adam-schedules", "b2", v) for v in values] == core


# -- through the command line -----------------------------------------------------------------

@pytest.mark.parametrize("name,override", [
    ("quickstart", "init_lr=nan"), ("quickstart", "meta_lr=nan"), ("quickstart", "clip=-1"),
    ("quickstart", "momentum=0.999999"), ("l2-per-weight", "momentum=0.999999"),
    ("schedules", "init_log_scale=inf"), ("chaos", "fd_h=1e-3,nan"), ("toy", "w0=nan,1"),
    ("learned-structure", "clip=-1"), ("adam-schedules", "b2=1"),
])
def test_cli_rejects_bad_value_before_writing(capsys, tmp_path, name, override):
    out = tmp_path / "run"
    line = error_line(capsys, ["run", name, "--smoke", "--set", override, "--out", str(out),
                               "--no-progress"])
    assert override.partition("=")[0] in line
    assert not out.exists()


@pytest.fixture
def no_download(monkeypatch):
    """Any attempt to download MNIST fails the test (and never touches the network)."""
    def refuse(*args, **kwargs):
        raise AssertionError("nothing may be downloaded here")
    monkeypatch.setattr(data._mnist, "download_mnist", refuse)
    monkeypatch.setattr(data._download, "download_file", refuse)


@pytest.fixture
def offline(monkeypatch):
    """Downloads fail as they do without network (the CLI downloads --data mnist before it
    writes the run folder)."""
    def fail(*args, **kwargs):
        raise data.DownloadError("could not download train-images-idx3-ubyte.gz from any "
                                 "mirror (offline)")
    monkeypatch.setattr(data._mnist, "download_mnist", fail)
    monkeypatch.setattr(data._download, "download_file", fail)


def test_cli_rejects_missing_mnist_before_writing(capsys, tmp_path, offline):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "run"
    line = error_line(capsys, ["run", "quickstart", "--smoke", "--data", "mnist", "--data-dir",
                               str(empty), "--out", str(out), "--no-progress"])
    assert "could not download" in line
    assert not out.exists()
    unwritable = tmp_path / "file"
    unwritable.write_text("")
    line = error_line(capsys, ["run", "quickstart", "--smoke", "--data", "mnist", "--data-dir",
                               str(unwritable / "x"), "--out", str(out), "--no-progress"])
    assert "not a writable folder" in line and not out.exists()
    missing = tmp_path / "nonexistent" / "x"
    line = error_line(capsys, ["run", "quickstart", "--smoke", "--data", "mnist", "--data-dir",
                               str(missing), "--out", str(out), "--no-progress"])
    assert "could not download" in line and not out.exists() and not missing.parent.exists()


# -- data sources -----------------------------------------------------------------------------

def _write_mnist(folder, n_train=6, n_test=4, compress=True):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, (n,), dtype=np.uint8)
        for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
            name = f"{prefix}-{kind}-ubyte" + (".gz" if compress else "")
            (folder / name).write_bytes(data.encode_idx(arr, compress=compress))
    return folder


def test_data_error_classes_keep_the_old_ones():
    assert issubclass(data.DataError, OSError)
    assert issubclass(data.DataMissingError, data.DataError)
    assert issubclass(data.DataMissingError, FileNotFoundError)
    assert issubclass(data.DataCorruptError, data.DataError)
    assert issubclass(data.DataCorruptError, ValueError)
    assert issubclass(data.DownloadError, data.DataError)


def test_check_source_embedded_and_good_folders(tmp_path, no_download):
    data.check_source("embedded", None)
    data.check_source("mnist", _write_mnist(tmp_path / "gz"))
    data.check_source("mnist", _write_mnist(tmp_path / "raw", compress=False))
    with pytest.raises(ValueError, match="cifar"):
        data.check_source("cifar", None)


def test_check_source_missing_folder_is_not_created(tmp_path, no_download):
    folder = tmp_path / "nonexistent" / "x"
    with pytest.raises(data.DataMissingError) as info:
        data.check_source("mnist", folder)
    msg = str(info.value)
    assert "\n" not in msg and str(folder) in msg and "does not exist" in msg
    assert f"python -m revlearn.data download {folder}" in msg and "--data embedded" in msg
    assert not (tmp_path / "nonexistent").exists()
    # with download allowed, a creatable folder is fine (still nothing is created)
    data.check_source("mnist", folder, download=True)
    assert not (tmp_path / "nonexistent").exists()


def test_check_source_empty_folder_names_the_missing_files(tmp_path, no_download):
    with pytest.raises(data.DataMissingError) as info:
        data.check_source("mnist", tmp_path)
    msg = str(info.value)
    assert "\n" not in msg and str(tmp_path) in msg
    for name in data.MNIST_SHA256:
        assert name in msg
    _write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(data.DataMissingError, match="lacks the MNIST file.s. t10k-labels-idx1"):
        data.check_source("mnist", tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "not idx", "labels mismatch",
                                    "wrong shape", "raw truncated"])
def test_check_source_corrupt_file(tmp_path, damage, no_download):
    folder = _write_mnist(tmp_path / "m", compress=damage != "raw truncated")
    target = folder / "train-images-idx3-ubyte.gz"
    if damage == "truncate":
        raw = target.read_bytes()
        target.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        target.write_bytes(b"\x1f\x8b" + b"\xff" * 40)
    elif damage == "not idx":
        target.write_bytes(b"hello, this is not an IDX file at all")
    elif damage == "labels mismatch":
        (folder / "train-labels-idx1-ubyte.gz").write_bytes(
            data.encode_idx(np.zeros(5, np.uint8), compress=True))
    elif damage == "wrong shape":
        target.write_bytes(data.encode_idx(np.zeros((6, 27, 28), np.uint8), compress=True))
    else:
        target = folder / "train-images-idx3-ubyte"
        target.write_bytes(target.read_bytes()[:-10])
    with pytest.raises(data.DataCorruptError) as info:
        data.check_source("mnist", folder)
    msg = str(info.value)
    assert "\n" not in msg and str(target) in msg
    assert isinstance(info.value, ValueError) and isinstance(info.value, data.DataError)


def test_readers_raise_data_errors(tmp_path):
    with pytest.raises(data.DataMissingError, match="does not exist"):
        data.read_idx(tmp_path / "nope")
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05abc")
    with pytest.raises(data.DataCorruptError, match="truncated"):
        data.read_idx(bad)
    with pytest.raises(data.DataMissingError, match="train-images-idx3-ubyte") as info:
        data.load_mnist("mnist", data_dir=tmp_path, download=False)
    assert "python -m revlearn.data download" in str(info.value)
    folder = _write_mnist(tmp_path / "m")
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b" + b"\x00" * 30)
    with pytest.raises(data.DataCorruptError, match="t10k-images-idx3-ubyte"):
        data.load_mnist("mnist", data_dir=folder, download=False)


def _closed_port_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/"


def test_reading_does_not_create_revlearn_data(tmp_path, monkeypatch):
    folder = tmp_path / "nonexistent" / "x"
    monkeypatch.setenv("REVLEARN_DATA", str(folder))
    assert data.mnist_dir() == folder
    with pytest.raises(data.DataMissingError):
        data.check_source("mnist", None)
    with pytest.raises(data.DataMissingError):
        data.load_mnist("mnist", download=False)
    assert not (tmp_path / "nonexistent").exists()
    # a failed download removes the folders it created for itself
    with pytest.raises(data.DataError) as info:
        data.load_mnist("mnist", mirrors=[_closed_port_url()])
    assert isinstance(info.value, data.DownloadError) and "\n" not in str(info.value)
    assert str(folder) in str(info.value)
    assert not (tmp_path / "nonexistent").exists()
    # files already there: nothing is downloaded, nothing created
    _write_mnist(folder)
    monkeypatch.setattr(data._mnist, "download_mnist",
                        lambda *a, **k: pytest.fail("nothing may be downloaded"))
    assert len(data.load_mnist("mnist")) == 10

