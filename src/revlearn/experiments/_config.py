"""The base of every experiment's `Config`.

A config is a frozen dataclass whose fields all have defaults and types the
command line parses (`_registry.parse_value`). Subclass `ExperimentConfig` (or
`MnistConfig` for an experiment on MNIST) and put the range checks in `check`,
using the helpers of `_validate.py`; the generic checks (each value of its
field's type, finite floats, seed >= 0) run before it, on construction and in
`validate_config`:

    @dataclasses.dataclass(frozen=True)
    class Config(MnistConfig):
        n_train: int = 1000
        steps: int = 100

        def check(self):
            at_least(self, 1, "n_train", "steps")

A config is hashable, so it is itself the static argument of the jitted
programs: `config.program()` is the config with the fields that never change a
compiled program (the seed, where the data lives) set to their defaults, so runs
over several seeds compile once.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

from ._validate import check_fields

__all__ = ["ExperimentConfig", "MnistConfig"]


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Fields shared by every experiment: the seed all randomness is drawn from."""

    seed: int = 0

    #: Fields that are arguments of the compiled programs, not part of them.
    RUNTIME: ClassVar[tuple[str, ...]] = ("seed",)

    def __post_init__(self):
        check_fields(self)
        self.check()

    def check(self) -> None:
        """Range checks of the experiment's own fields (raise `_validate.fail`)."""

    def program(self):
        """This config with its `RUNTIME` fields at their defaults: the static
        argument of the jitted programs (equal for runs that differ only in them)."""
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.name in self.RUNTIME}
        return dataclasses.replace(self, **defaults)


@dataclasses.dataclass(frozen=True)
class MnistConfig(ExperimentConfig):
    """An experiment on MNIST: `data` picks the pool (`revlearn.data.load_mnist`),
    `data_dir` where a downloaded copy lives (set by `--data` / `--data-dir`)."""

    data: Literal["embedded", "mnist"] = "embedded"
    data_dir: str | None = None

    RUNTIME: ClassVar[tuple[str, ...]] = ("seed", "data", "data_dir")
