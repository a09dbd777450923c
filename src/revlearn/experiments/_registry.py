"""The registry of experiments run by `revlearn run NAME`.

An experiment is a frozen config, a `run` that writes its results into a run
folder, and a `plot` that re-renders its figures from those files only.

How to add one (say `schedules`): one public module,
`src/revlearn/experiments/schedules.py`, with

- `Config`: a `@dataclasses.dataclass(frozen=True)` subclass of
  `_config.ExperimentConfig` (or `MnistConfig`, which adds `data` and
  `data_dir`) whose every field has a default and a type the command line
  parses: `int`, `float`, `bool`, `str`, `X | None`, `tuple[int, ...]`
  (written `1,2,3`) or `typing.Literal[...]`. Its `check` method holds the
  range checks (`_validate.at_least`, `positive`, `check_decay`, ...), each
  raising one line `key=value what is wrong; the fix`; the command line calls
  `validate_config` before it writes anything.
- `run(config, run_dir) -> dict`: the work, written into `run_dir` (a
  `revlearn.meta.RunDir`; pass it to `revlearn.meta.meta_optimize` so
  `--resume` works). Save everything `plot` needs (`run_dir.save_arrays`,
  `run_dir.write_json`), call `plot`, and return the headline numbers (a flat
  dict), which the command line writes to summary.json. Draw randomness only
  from `config.seed` (`revlearn.meta.iteration_key(config.seed, i)`). The
  splits come from `_splits`, learning curves from `_float.float_train`.
- `plot(path) -> list[Path]`: decorated with `_plots.styled`; reads the run
  with `_plots.saved(path, ...)` and writes PNGs with `_plots.figure` and
  `_plots.save`; returns their paths.
- at the bottom, `EXPERIMENT = Experiment(name, one-line description, Config,
  SMOKE, run, plot)`, where `SMOKE` is a `Config` that runs in seconds on a
  2-core CPU: the test suite runs every experiment's smoke config through the
  real CLI.

The package finds the module and registers `EXPERIMENT` on import. Check it
with `revlearn run schedules --smoke --out /tmp/s` and `pytest tests/test_cli.py`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ._validate import type_name

__all__ = [
    "IGNORED_ON_RESUME",
    "ConfigError",
    "Experiment",
    "UnknownExperimentError",
    "all_experiments",
    "apply_overrides",
    "config_to_dict",
    "get",
    "names",
    "parse_value",
    "register",
    "validate_config",
]

#: Config fields that do not change results and may differ on `--resume`.
IGNORED_ON_RESUME = ("data_dir",)


class ConfigError(ValueError):
    """A config override that names no field or does not parse as its type, or a config
    value out of its range (one line: `key=value what is wrong; the fix`)."""


class UnknownExperimentError(KeyError):
    """No experiment of that name is registered."""

    def __str__(self) -> str:  # KeyError quotes its argument; show the message as is
        return str(self.args[0])


@dataclasses.dataclass(frozen=True)
class Experiment:
    """One experiment of the command line.

    Attributes:
      name: the command-line name (lower case, words joined by "-").
      description: one line for `revlearn list`.
      Config: a frozen `ExperimentConfig` dataclass of settings with defaults.
      smoke: a tiny `Config` that runs in seconds (used by the tests and `--smoke`).
      run: `run(config, run_dir) -> dict` of headline numbers.
      plot: `plot(run_dir_path) -> list[Path]` of re-rendered figures.
    """

    name: str
    description: str
    Config: type
    smoke: Any
    run: Callable[[Any, Any], dict]
    plot: Callable[[Path], list]

    def __post_init__(self):
        if not self.name or self.name != self.name.strip().lower() or " " in self.name:
            raise ValueError(f"experiment name {self.name!r} must be lower case without spaces, "
                             "e.g. 'l2-per-weight'")
        if not self.description or "\n" in self.description.strip():
            raise ValueError(f"{self.name}: description must be a single non-empty line")
        if not (dataclasses.is_dataclass(self.Config) and isinstance(self.Config, type)
                and self.Config.__dataclass_params__.frozen):
            raise TypeError(f"{self.name}: Config must be a @dataclasses.dataclass(frozen=True)")
        from ._config import ExperimentConfig
        if not issubclass(self.Config, ExperimentConfig):
            raise TypeError(f"{self.name}: Config must subclass experiments._config.ExperimentConfig")
        fields = {f.name: f for f in dataclasses.fields(self.Config)}
        missing = [n for n, f in fields.items() if f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise TypeError(f"{self.name}: Config fields {missing} need defaults")
        if not isinstance(self.smoke, self.Config):
            raise TypeError(f"{self.name}: smoke must be an instance of Config")
        if not callable(self.run) or not callable(self.plot):
            raise TypeError(f"{self.name}: run and plot must be callables")

    def field_types(self) -> dict[str, Any]:
        """The resolved type annotation of each Config field."""
        return typing.get_type_hints(self.Config)


_REGISTRY: dict[str, Experiment] = {}


def register(experiment: Experiment) -> Experiment:
    """Add `experiment` to the registry (a name may be registered once) and return it."""
    if not isinstance(experiment, Experiment):
        raise TypeError(f"register expects an Experiment, got {type(experiment).__name__}")
    existing = _REGISTRY.get(experiment.name)
    if existing is not None and existing is not experiment:
        if existing.run.__module__ != experiment.run.__module__:
            raise ValueError(f"an experiment named {experiment.name!r} is already registered "
                             f"by {existing.run.__module__}")
    _REGISTRY[experiment.name] = experiment
    return experiment


def names() -> list[str]:
    """The registered experiment names, sorted."""
    return sorted(_REGISTRY)


def all_experiments() -> list[Experiment]:
    """The registered experiments, sorted by name."""
    return [_REGISTRY[n] for n in names()]


def get(name: str) -> Experiment:
    """The experiment called `name`; UnknownExperimentError lists the valid names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownExperimentError(
            f"unknown experiment {name!r}; valid names: {', '.join(names()) or '(none)'}") from None


# -- typed config overrides -----------------------------------------------------

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


class _NonFinite(ConfigError):
    """A float override that parses but is nan or infinite."""


def parse_value(text: str, tp, *, key: str = "value") -> Any:
    """Parse the command-line string `text` as type `tp` (int, float, bool, str,
    `X | None`, `tuple[X, ...]`, `tuple[X, Y]`, `Literal[...]`)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and text.strip().lower() in ("none", "null"):
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return parse_value(text, arg, key=key)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1 and isinstance(errors[0], _NonFinite):
            raise errors[0]
        raise ConfigError(f"{key}={text!r} is not a valid {type_name(tp)}")
    if origin is typing.Literal:
        for choice in args:
            if str(choice) == text:
                return choice
        raise ConfigError(f"{key}={text!r} is not one of {', '.join(map(str, args))}")
    if origin is tuple:
        parts = [p.strip() for p in text.split(",")] if text.strip() else []
        if len(args) == 2 and args[1] is Ellipsis:
            items = list(zip(parts, args[:1] * len(parts)))
        elif len(parts) != len(args):
            raise ConfigError(f"{key}={text!r} needs {len(args)} comma-separated values")
        else:
            items = list(zip(parts, args))
        out = []
        for p, a in items:
            try:
                out.append(parse_value(p, a, key=key))
            except _NonFinite:
                raise _NonFinite(f"{key}={text.strip()} holds {p}, which is not a finite "
                                 "number (nan and inf are rejected); pass finite floats") from None
        return tuple(out)
    if tp is bool:
        low = text.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigError(f"{key}={text!r} is not a bool (use true or false)")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{key}={text!r} is not an int") from None
    if tp is float:
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"{key}={text!r} is not a float") from None
        if not math.isfinite(value):
            raise _NonFinite(f"{key}={text.strip()} is not a finite number (nan and inf are "
                             "rejected); pass a finite float")
        return value
    if tp is str:
        return text
    raise ConfigError(f"{key} has type {type_name(tp)}, which the command line cannot parse")


def apply_overrides(experiment: Experiment, config: Any, overrides: Iterable[str]) -> Any:
    """`config` with each "key=value" of `overrides` parsed by the field's type.

    Raises:
      ConfigError: a malformed override, an unknown key (the message lists the
        valid keys), or a value that does not parse.
    """
    hints = experiment.field_types()
    changes = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        if key not in hints:
            raise ConfigError(f"{experiment.name} has no setting {key!r}; valid keys: "
                              f"{', '.join(f.name for f in dataclasses.fields(experiment.Config))}")
        changes[key] = parse_value(value, hints[key], key=key)
    try:
        return dataclasses.replace(config, **changes)
    except (ValueError, TypeError) as e:  # the Config's own validation
        raise ConfigError(f"{experiment.name}: {_one_line(e)}") from None


def validate_config(experiment: Experiment, config: Any) -> Any:
    """Check `config` before any work and return it: the generic checks driven by the
    field types (each value has its field's type, every float and tuple of floats is
    finite, seed >= 0), then the Config's own range checks (`check`, run again in
    case the config was built around `__post_init__`). Safe on the defaults and smoke configs.

    Raises:
      ConfigError: one line, `NAME: key=value what is wrong; the fix`.
    """
    from ._validate import check_fields

    if not isinstance(config, experiment.Config):
        raise ConfigError(f"{experiment.name}: the config is a {type(config).__name__}, not "
                          f"{experiment.name}'s Config")
    try:
        check_fields(config)
        config.check()
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{experiment.name}: {_one_line(e)}") from None
    return config


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def config_to_dict(config: Any) -> dict:
    """The config's fields as a JSON-ready dict (tuples become lists)."""
    from revlearn.meta import to_json
    return to_json(config)
