"""Evaluation figures: the labelled confusion heatmap and the image / truth / prediction grid.

Drawn with matplotlib's object API on an Agg canvas (no pyplot, no global state, no display), and
written atomically. Label maps are coloured with seglab.data.palette, one palette for truth and predictions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from seglab.atomic import atomic_path
from seglab.data.classes import IGNORE_INDEX
from seglab.data.palette import IGNORE_COLOR, colorize, label_palette

__all__ = ["IGNORE_COLOR", "colorize", "label_palette", "plot_confusion", "plot_prediction_grid"]

# Cells are annotated with their percentage only while they stay readable.
_MAX_ANNOTATED_CLASSES = 30


def _save(figure: Figure, path: str | Path, dpi: int) -> Path:
    path = Path(path)
    FigureCanvasAgg(figure)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    return path


def plot_confusion(
    confusion: np.ndarray,
    class_names: Sequence[str],
    path: str | Path,
    title: str = "",
    dpi: int = 100,
) -> Path:
    """Row-normalised confusion heatmap (rows = truth) with class names and pixel support on the axes.

    A row whose class has no truth pixel has no rate and is left blank (not drawn as zeros).
    """
    matrix = np.asarray(confusion, dtype=np.float64)
    num_classes = len(class_names)
    if matrix.shape != (num_classes, num_classes):
        raise ValueError(f"confusion matrix of shape {matrix.shape} does not match {num_classes} class names")
    support = matrix.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = matrix / support[:, None]
    rates[support == 0] = np.nan

    side = max(6.0, 0.32 * num_classes + 3.0)
    figure = Figure(figsize=(side + 1.5, side))
    axes = figure.add_subplot()
    image = axes.imshow(np.ma.masked_invalid(rates), cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    colorbar = figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    colorbar.set_label("share of the true class's pixels")
    font = max(4.0, min(9.0, 240.0 / num_classes))
    axes.set_xticks(range(num_classes), labels=list(class_names), rotation=90, fontsize=font)
    axes.set_yticks(
        range(num_classes),
        labels=[f"{name} ({int(n):,} px)" for name, n in zip(class_names, support)],
        fontsize=font,
    )
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class (truth pixels)")
    if num_classes <= _MAX_ANNOTATED_CLASSES:
        for row, col in zip(*np.nonzero(np.nan_to_num(rates) >= 0.005)):
            value = rates[row, col]
            axes.text(col, row, f"{100 * value:.0f}", ha="center", va="center", fontsize=font * 0.8,
                      color="white" if value > 0.5 else "black")
    axes.set_title(title or "confusion matrix (row-normalised, %)")
    return _save(figure, path, dpi)


def plot_prediction_grid(
    images: Sequence[np.ndarray],
    truths: Sequence[np.ndarray],
    predictions: Mapping[str, Sequence[np.ndarray]],
    class_names: Sequence[str],
    path: str | Path,
    title: str = "",
    dpi: int = 100,
) -> Path:
    """One row per image: the image, its truth and each named prediction, in one shared palette.

    images: (H, W, 3) in [0, 255]; truths and predictions: (H, W) label maps (255 = ignore, grey).
    The legend lists the classes that appear in any shown truth or prediction.
    """
    rows = len(images)
    if rows == 0:
        raise ValueError("plot_prediction_grid needs at least one image")
    if len(truths) != rows or any(len(p) != rows for p in predictions.values()):
        raise ValueError(
            f"plot_prediction_grid: {rows} images, {len(truths)} truths and "
            f"{ {k: len(v) for k, v in predictions.items()} } predictions; each needs one per image"
        )
    columns = [("image", None), ("truth", truths), *((f"prediction ({k})", v) for k, v in predictions.items())]
    figure = Figure(figsize=(2.6 * len(columns), 2.6 * rows + 1.0), layout="constrained")
    grid = figure.subplots(rows, len(columns), squeeze=False)
    shown: set[int] = set()
    for row in range(rows):
        for col, (heading, maps) in enumerate(columns):
            axes = grid[row][col]
            if maps is None:
                axes.imshow(np.clip(np.asarray(images[row]), 0, 255).astype(np.uint8))
            else:
                label = np.asarray(maps[row])
                shown.update(int(v) for v in np.unique(label))
                axes.imshow(colorize(label), interpolation="nearest")
            axes.set_xticks([])
            axes.set_yticks([])
            if row == 0:
                axes.set_title(heading, fontsize=10)
    palette = label_palette() / 255.0
    handles = [Patch(color=palette[v], label=class_names[v]) for v in sorted(shown) if v < len(class_names)]
    if IGNORE_INDEX in shown:
        handles.append(Patch(color=palette[IGNORE_INDEX], label="ignore"))
    figure.legend(handles=handles, loc="outside lower center", ncol=min(6, max(1, len(handles))),
                  fontsize=8, frameon=False)
    if title:
        figure.suptitle(title)
    return _save(figure, path, dpi)
