"""Range checks shared by the experiments' `Config.__post_init__`.

Every check raises a one-line ValueError (TypeError for a value of the wrong
type) of the form

    name=value <what is wrong>; <the fix>

which `apply_overrides` / `validate_config` turn into a `ConfigError` (one line,
exit status 2 on the command line). The decay rule lives here once: a momentum
(or Adam's b1, b2) must be a value the core applies on its grid n / 2^d
(`revlearn.exact._grid`), so a config never reaches the core with a decay the
core would reject mid-run.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import types
import typing
from typing import Any

import numpy as np

from revlearn.exact import _grid

__all__ = ["POOL_SIZE", "at_least", "at_most", "check_clip", "check_decay", "check_fields",
           "check_pool", "check_range", "fail", "nonnegative", "positive", "show", "type_name"]

#: Images in each `data` source's pool (`revlearn.data.load_mnist`).
POOL_SIZE = {"embedded": 10_000, "mnist": 70_000}


def show(value: Any) -> str:
    """`value` as it is written on the command line (tuples comma-separated, None as none)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return ",".join(show(v) for v in value) if value else "()"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def fail(name: str, value: Any, what: str, fix: str, error: type = ValueError):
    """Raise `error("name=value what; fix")` (one line)."""
    raise error(f"{name}={show(value)} {what}; {fix}".replace("\n", " "))


def _default(config, name: str) -> Any:
    for f in dataclasses.fields(config):
        if f.name == name and f.default is not dataclasses.MISSING:
            return f.default
    return None


def _example(config, name: str) -> str:
    d = _default(config, name)
    return "" if d is None else f", e.g. {name}={show(d)} (the default)"


@functools.cache
def _hints(cls: type) -> dict:
    return typing.get_type_hints(cls)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def _problem(value, tp) -> str | None:
    """Why `value` is not a valid `tp` (None if it is). Floats must be finite."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        problems = [_problem(value, a) for a in args if a is not type(None)]
        return None if None in problems else problems[0]
    if origin is typing.Literal:
        return None if value in args else f"is not one of {', '.join(map(str, args))}"
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            return f"is not a tuple (write it comma-separated, e.g. {show(_example_tuple(args))})"
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if len(items) != len(value):
            return f"needs {len(items)} comma-separated values"
        for v, a in zip(value, items):
            p = _problem(v, a)
            if p is not None:
                return f"holds {show(v)}, which {p}"
        return None
    if tp is float:
        if not _is_real(value):
            return "is not a number"
        return None if math.isfinite(float(value)) else "is not a finite number"
    if tp is int:
        return None if _is_int(value) else "is not an int"
    if tp is bool:
        return None if isinstance(value, (bool, np.bool_)) else "is not a bool (use true or false)"
    if tp is str:
        return None if isinstance(value, str) else "is not a string"
    return None  # a type the command line cannot set: nothing generic to check


def _example_tuple(args) -> tuple:
    return (1, 2) if args and args[0] is int else (0.5, 1.0)


def check_fields(config) -> None:
    """The generic checks, driven by the dataclass's field types: every value has its
    field's type (int, float, bool, str, `X | None`, tuples, `Literal`), every float
    (also inside tuples) is finite, and `seed` is >= 0."""
    hints = _hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        p = _problem(value, hints.get(f.name, Any))
        if p is not None:
            value_error = "finite" in p or "one of" in p
            what = "finite values" if "finite" in p else f"a {type_name(hints[f.name])}"
            fail(f.name, value, p, f"pass {what}{_example(config, f.name)}",
                 ValueError if value_error else TypeError)
    if hasattr(config, "seed") and config.seed < 0:
        fail("seed", config.seed, "is negative", "seeds are integers >= 0, e.g. seed=0")


def type_name(tp) -> str:
    """A type annotation as the messages write it (`int`, `float | None`, ...)."""
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def at_least(config, least: int, *names: str) -> None:
    """Each field of `names` is >= `least` (counts)."""
    for name in names:
        v = getattr(config, name)
        if v < least:
            fail(name, v, f"must be >= {least}", f"pass {name} >= {least}"
                 f"{_example(config, name)}")


def positive(config, *names: str, why: str = "") -> None:
    """Each field of `names` is > 0 (learning rates, scales)."""
    for name in names:
        v = getattr(config, name)
        if not v > 0:
            fail(name, v, f"must be > 0{why}", f"pass a positive {name}{_example(config, name)}")


def nonnegative(config, *names: str) -> None:
    """Each field of `names` is >= 0 (penalties; 0 turns them off)."""
    for name in names:
        v = getattr(config, name)
        if not v >= 0:
            fail(name, v, "must be >= 0", f"pass {name} >= 0 (0 turns it off)"
                 f"{_example(config, name)}")


def check_range(name: str, value, lo, hi, *, lo_open=False, hi_open=False, fix: str = "") -> None:
    """`value` lies in the interval from `lo` to `hi` (open ends as given)."""
    ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        interval = f"{'(' if lo_open else '['}{show(lo)}, {show(hi)}{')' if hi_open else ']'}"
        fail(name, value, f"must lie in {interval}", fix or f"pass a value in {interval}")


def check_clip(config, name: str = "clip") -> None:
    """`clip` is None (no clipping) or a positive global norm."""
    v = getattr(config, name)
    if v is not None and not v > 0:
        fail(name, v, "must be none or a positive global norm of the meta-gradient",
             f"pass e.g. {name}=1.0, or {name}=none for no clipping")


def check_decay(name: str, value, grid: _grid.Grid = _grid.MOMENTUM, *,
                example: float = 0.9) -> None:
    """`value` is a decay the core accepts on `grid`: it is applied as n / 2^d with
    n = round(value 2^d) in [grid.min_numerator, grid.max_numerator] (the check of
    `revlearn.exact._grid.off_grid`, which the core runs on every decay)."""
    if not _is_real(value) or not math.isfinite(float(value)):
        fail(name, value, "is not a finite number", f"pass a value strictly inside (0, 1), "
             f"e.g. {name}={example}")
    if not bool(_grid.off_grid(float(value), grid)):
        return
    n = int(_grid.numerators_np(float(value), grid))
    lo, hi = grid.min_numerator, grid.max_numerator
    fail(name, value,
         f"is applied as n/2^{grid.bits} with n = round({name} * {grid.denominator}) = {n} "
         f"(= {float(_grid.applied(float(value), grid)):.10g}), outside [{lo}, {hi}]",
         f"pass a value in [{grid.smallest():.6g}, {grid.largest():.10g}], e.g. "
         f"{name}={example}")


def check_pool(config, *names: str) -> None:
    """The splits `names` fit into the images of `config.data`."""
    total = sum(getattr(config, n) for n in names)
    have = POOL_SIZE.get(getattr(config, "data", "embedded"), POOL_SIZE["embedded"])
    if total > have:
        parts = ", ".join(f"{n}={getattr(config, n)}" for n in names)
        more = ("" if config.data == "mnist" else
                ", or pass --data mnist (all 70,000 MNIST images)")
        raise ValueError(f"{parts} need {total} images but data={config.data} has {have}; "
                         f"ask for fewer{more}")


def at_most(config, name: str, bound: str) -> None:
    """`config.<name>` does not exceed `config.<bound>` (e.g. batch_size and n_train)."""
    value, limit = getattr(config, name), getattr(config, bound)
    if value > limit:
        fail(name, value, f"exceeds {bound}={show(limit)}", f"pass {name} <= {bound}")
