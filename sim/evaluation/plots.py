"""Pictures a person would rather look at than read: training curves, confusion matrices, calibration.

Figures are drawn with matplotlib's object API on an Agg canvas, never through pyplot: nothing here
opens a window or changes the backend of a program that imports SIM.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sim.core import labels as L
from sim.core.run import read_jsonl

log = logging.getLogger(__name__)

TRAINING_CURVES = "training_curves.png"


def _curve_panels() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(title, metric names) of each panel, from the `panel` of each metric in the contract's table."""
    panels: dict[str, list[str]] = {}
    for m in L.METRICS:
        if m.panel is not None:
            panels.setdefault(m.panel, []).append(m.name)
    return tuple((title, tuple(names)) for title, names in panels.items())


# A metric missing from the files is skipped.
CURVE_PANELS = _curve_panels()


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _series(records: list[dict[str, Any]], name: str) -> tuple[list[int], list[float]]:
    """Epochs and values of one metric; null (undefined) becomes NaN, which leaves a gap."""
    epochs, values = [], []
    for i, r in enumerate(records):
        if name not in r:
            continue
        v = r[name]
        epochs.append(int(r.get("epoch", i + 1)))
        values.append(math.nan if v is None else float(v))
    return epochs, values


def plot_training_curves(run_dir: str | Path, out: str | Path | None = None) -> Path | None:
    """Draw loss and the key metrics per epoch, train and val, from `<run_dir>/metrics/*.jsonl`.

    Args:
        run_dir: a run directory (the contract's output tree).
        out: where to write the PNG (default `<run_dir>/training_curves.png`).

    Returns:
        The PNG's path, or None when there is no epoch to plot yet.
    """
    run_dir = Path(run_dir)
    history = {split: read_jsonl(run_dir / "metrics" / f"{split}_metrics.jsonl") for split in ("train", "val")}
    if not any(history.values()):
        log.info("no metrics in %s yet: no training curves drawn", run_dir / "metrics")
        return None
    out = Path(out) if out is not None else run_dir / TRAINING_CURVES
    cols = 3
    rows = math.ceil(len(CURVE_PANELS) / cols)
    fig = _new_figure(5.0 * cols, 3.4 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    styles = {"train": "--", "val": "-"}
    for ax, (title, names) in zip(axes, CURVE_PANELS, strict=False):  # the grid may hold more axes than panels
        drawn = False
        for ci, name in enumerate(names):
            for split, records in history.items():
                epochs, values = _series(records, name)
                if not epochs:
                    continue
                # Multi-metric panels name each metric once (solid val line); the title says which is which.
                label = split if len(names) == 1 else (name if split == "val" else None)
                ax.plot(epochs, values, styles[split], marker="o", markersize=3, color=f"C{ci}", label=label)
                drawn = True
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=7)
            ax.xaxis.get_major_locator().set_params(integer=True)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    for ax in axes[len(CURVE_PANELS) :]:
        ax.set_visible(False)
    fig.suptitle(f"training curves: {run_dir.name}  (solid: val, dashed: train)")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


def plot_confusion(cm: Any, names: Sequence[str], out: str | Path, title: str) -> Path:
    """A confusion matrix [true, predicted] as a heat map, each cell with its count and row share."""
    cm = np.asarray(cm, dtype=np.int64)
    support = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, support, out=np.zeros(cm.shape, dtype=float), where=support > 0)
    n = len(names)
    fig = _new_figure(1.2 * n + 2.6, 1.0 * n + 1.8)
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, label="share of the true class")
    ax.set_xticks(range(n), labels=list(names), rotation=35, ha="right")
    ax.set_yticks(range(n), labels=list(names))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(n):
        for j in range(n):
            ax.text(
                j,
                i,
                f"{cm[i, j]}\n{share[i, j]:.0%}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if share[i, j] > 0.6 else "black",
            )
    ax.set_title(title)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


def plot_reliability(bins: list[dict[str, Any]], ece: float | None, out: str | Path, title: str) -> Path:
    """Reliability diagram of the confidence head: accuracy of the action per confidence bin."""
    fig = _new_figure(5.0, 4.2)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ":", color="gray", label="perfect calibration")
    filled = [b for b in bins if b["count"] > 0]
    if filled:
        centers = [(b["lo"] + b["hi"]) / 2 for b in filled]
        widths = [b["hi"] - b["lo"] for b in filled]
        ax.bar(
            centers,
            [b["accuracy"] for b in filled],
            width=widths,
            alpha=0.6,
            edgecolor="black",
            label="action accuracy in bin",
        )
        ax.plot(
            [b["mean_confidence"] for b in filled],
            [b["accuracy"] for b in filled],
            "o",
            color="C3",
            label="mean confidence in bin",
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("action accuracy")
    ax.set_title(f"{title}\nECE {'null' if ece is None else f'{ece:.4f}'}")
    ax.legend(fontsize=7, loc="lower right")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out
