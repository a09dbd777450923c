"""One figure style for every experiment, and the panels they share.

Each experiment's `plot(path)` is decorated with `@styled` (one rc style: light
grid behind the data, no top/right spines, one font size), makes its figures
with `figure`, writes them with `save` (one dpi, atomically, into the run
folder's `figures/`) and reads what `run` saved with `saved`. The
meta-learning-curve figure (`meta_curves`) is the same everywhere: loss and
error (%) of the model trained with each meta-iteration's hyperparameters, on
the training, validation (the meta-objective) and test splits of `metrics.jsonl`.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, NamedTuple

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from revlearn.meta import RunDir, save_figure

__all__ = ["DPI", "STYLE", "Saved", "figure", "meta_curves", "plain_log", "save", "saved",
           "styled"]

DPI = 110
STYLE = {
    "axes.grid": True, "axes.axisbelow": True, "grid.color": "0.85", "grid.linewidth": 0.6,
    "axes.spines.top": False, "axes.spines.right": False,
    "font.size": 9, "axes.titlesize": 10, "figure.titlesize": 11, "legend.fontsize": 8,
    "legend.framealpha": 0.9, "lines.linewidth": 1.6,
}
SPLIT_NAMES = {"train": "training", "valid": "validation", "test": "test"}
SPLIT_COLORS = {"train": "C2", "valid": "C0", "test": "C3"}


def styled(plot):
    """Run `plot` under `STYLE` (artists read the style when they are made)."""
    @functools.wraps(plot)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(STYLE):
            return plot(*args, **kwargs)
    return wrapper


def figure(ncols: int = 1, nrows: int = 1, *, width: float | None = None,
           height: float | None = None, **subplots):
    """(Figure, axes) with a constrained layout; 4.6 x 3.8 inches per panel by default."""
    fig = Figure(figsize=(width or 4.6 * ncols + 0.4, height or 3.8 * nrows),
                 layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=True, **subplots)


def save(fig: Figure, folder: Path, name: str, paths: list | None = None) -> Path:
    """Write `fig` to `folder/name.png` at `DPI` (appended to `paths` if given)."""
    path = save_figure(fig, Path(folder) / f"{name}.png", dpi=DPI)
    if paths is not None:
        paths.append(path)
    return path


class Saved(NamedTuple):
    """What a run saved: the folder, its config (a dict), arrays by name, metrics."""

    run: RunDir
    config: dict
    arrays: dict[str, Any]
    metrics: list[dict]


def saved(path, *names: str, optional: tuple[str, ...] = ()) -> Saved:
    """Read the config, the arrays `names` and those of `optional` that this run saved,
    and the metrics of the run folder `path`. A missing or damaged array of `names`, or
    one another run left there, raises `RunFileError` (one line naming the file)."""
    rd = RunDir(path)
    arrays = {n: rd.load_arrays(n) for n in names}
    arrays.update({n: rd.load_arrays(n) for n in optional if rd.has_arrays(n)})
    return Saved(rd, (rd.read_config() or {}).get("config", {}), arrays, rd.read_metrics())


def _minor_label(y, _):
    if y <= 0:
        return ""
    m = y / 10 ** math.floor(math.log10(y))
    return f"{y:g}" if abs(m - round(m)) < 1e-6 and round(m) in (2, 3, 5) else ""


def plain_log(ax, axis: str = "y") -> None:
    """A log axis labelled 0.3, 0.5, 1, 2 rather than 3x10^-1, ..."""
    target = ax.yaxis if axis == "y" else ax.xaxis
    (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
    target.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    target.set_minor_formatter(FuncFormatter(_minor_label))


def image_grid(axes, images, titles=None, **imshow):
    """Draw `images` ([n, H, W]) into the axes `axes` (any shape, filled row by row)
    framed on all four sides and without ticks, image k titled by `titles[k]` if there
    is one (a first row's titles title only it); `imshow` (cmap, vmin, vmax, ...) is
    shared. Returns the last image drawn, for a colour bar."""
    im = None
    for k, (ax, img) in enumerate(zip(np.ravel(axes), images)):
        im = ax.imshow(img, **imshow)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.spines[:].set_visible(True)
        ax.spines[:].set_color("0.6")
        if titles is not None and k < len(titles) and titles[k]:
            ax.set_title(titles[k], fontsize=9)
    return im


def underlay(fig: Figure, label: str) -> None:
    """Redraw the curves of `fig` whose label starts with `label` wide, pale and beneath
    the others, so that a curve another one covers (validation under test, say) shows."""
    for ax in fig.axes:
        for line in ax.get_lines():
            if line.get_label().startswith(label):
                line.set(lw=4, alpha=0.5, zorder=1)
        if ax.get_legend() is not None:
            ax.legend()


def meta_curves(metrics: list[dict], what: str = "model", baselines: dict | None = None) -> Figure:
    """The meta-learning curves: loss and error (%) after training against the
    meta-iteration, one curve per split recorded in `metrics`; `baselines`
    ({label: {"<split>_loss": v, ...}}) are drawn as horizontal dotted lines."""
    fig, (ax1, ax2) = figure(2)
    it = np.array([m["iteration"] for m in metrics])
    for split, name in SPLIT_NAMES.items():
        if metrics and f"{split}_loss" in metrics[0]:
            c = SPLIT_COLORS[split]
            ax1.plot(it, [m[f"{split}_loss"] for m in metrics], "o-", ms=3, color=c,
                     label=name + (" (meta-objective)" if split == "valid" else ""))
            ax2.plot(it, [100 * m[f"{split}_error"] for m in metrics], "o-", ms=3, color=c,
                     label=name)
    for i, (label, values) in enumerate((baselines or {}).items()):
        for ax, key, scale in ((ax1, "loss", 1), (ax2, "error", 100)):
            for split in SPLIT_NAMES:
                if f"{split}_{key}" in values:
                    ax.axhline(scale * values[f"{split}_{key}"], color=SPLIT_COLORS[split],
                               ls=(":", "--", "-.")[i % 3], lw=1,
                               label=f"{SPLIT_NAMES[split]}, {label}")
    ax1.set_ylabel("loss after training (mean NLL, nats)")
    ax2.set_ylabel("error after training (%)")
    for ax in (ax1, ax2):
        ax.set_xlabel("meta-iteration")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if metrics:
            ax.legend()
    ax1.set_title(f"Loss of the trained {what}")
    ax2.set_title(f"Classification error of the trained {what}")
    fig.suptitle("Meta-learning curves (each point: one full training run)")
    return fig
