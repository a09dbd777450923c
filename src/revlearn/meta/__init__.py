"""Meta-optimisation: the optax loop over unconstrained hyperparameters, seed
averaging, run folders, atomic checkpoints and exact resume.

    run_dir = RunDir("runs/my-run", resume=False)
    result = meta_optimize(hypergrad_fn, hypers0, optax.adam(0.05), 30, run_dir)

See `_loop.py` for the loop's update equations and the resume guarantee, and
`_rundir.py` for the layout of a run folder.
"""

from .._extras import require

require("revlearn.meta")

from ._loop import ChaosWarning, MetaResult, chaos_flags, is_chaotic, meta_optimize  # noqa: E402
from ._rundir import (RunDir, RunDirBusy, RunDirError, RunFileError,  # noqa: E402
                      environment, save_figure, to_json)
from ._seeds import (average_over, iteration_key, population_devices,  # noqa: E402
                     split_population, using_devices)

__all__ = [
    "ChaosWarning",
    "MetaResult",
    "RunDir",
    "RunDirBusy",
    "RunDirError",
    "RunFileError",
    "average_over",
    "chaos_flags",
    "environment",
    "is_chaotic",
    "iteration_key",
    "meta_optimize",
    "population_devices",
    "save_figure",
    "split_population",
    "to_json",
    "using_devices",
]
