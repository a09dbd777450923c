"""The meta-learning-curve figure shared by the experiments.

Two panels against the meta-iteration: loss and error (%) of the model trained
with that iteration's hyperparameters, on the training, validation
(the meta-objective) and test splits, as recorded in `metrics.jsonl`. Callers
draw their baselines on the returned axes, then call `finish`.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

SPLITS = ("train", "valid", "test")
SPLIT_NAMES = {"train": "training", "valid": "validation", "test": "test"}
COLORS = {"train": "C2", "valid": "C0", "test": "C3"}


def meta_curves(metrics: list[dict]):
    """(figure, loss axes, error axes) with one curve per split found in `metrics`."""
    fig = Figure(figsize=(10, 4.2), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    it = np.array([m["iteration"] for m in metrics])
    for split in SPLITS:
        if metrics and f"{split}_loss" in metrics[0]:
            label = SPLIT_NAMES[split]
            ax1.plot(it, [m[f"{split}_loss"] for m in metrics], "o-", ms=3, color=COLORS[split],
                     label=label + (" (meta-objective)" if split == "valid" else ""))
            ax2.plot(it, [100 * m[f"{split}_error"] for m in metrics], "o-", ms=3,
                     color=COLORS[split], label=label)
    return fig, ax1, ax2


def finish(ax1, ax2, what: str) -> None:
    """Axis labels, grids, legends and titles ("... of the trained `what`")."""
    ax1.set_ylabel("loss after training (mean NLL, nats)")
    ax2.set_ylabel("error after training (%)")
    for ax in (ax1, ax2):
        ax.set_xlabel("meta-iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax1.set_title(f"Loss of the trained {what}")
    ax2.set_title(f"Classification error of the trained {what}")
