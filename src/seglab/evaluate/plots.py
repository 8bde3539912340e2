"""Evaluation figures: the labelled confusion heatmap and the image / truth / prediction grid.

Drawn with matplotlib's object API on an Agg canvas (no pyplot, no global state, no display), and
written atomically. Label maps are coloured with one palette for truth and predictions: background
black, every class a distinct colour (none of them grey), ignore (255) mid grey.
"""

from __future__ import annotations

import colorsys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from seglab.atomic import atomic_path
from seglab.data.classes import IGNORE_INDEX

__all__ = ["IGNORE_COLOR", "colorize", "label_palette", "plot_confusion", "plot_prediction_grid"]

IGNORE_COLOR = (128, 128, 128)
_GOLDEN_RATIO = 0.6180339887498949
# Cells are annotated with their percentage only while they stay readable.
_MAX_ANNOTATED_CLASSES = 30


def _qualitative_colors() -> list[tuple[float, float, float]]:
    """matplotlib's tab20/tab20b/tab20c without their greys: the dark tab20 hues first, so the first
    classes (VOC's 20 fit) get the most distinct colours."""
    tab20, tab20b, tab20c = (list(colormaps[name].colors) for name in ("tab20", "tab20b", "tab20c"))
    ordered = tab20[0::2] + tab20[1::2] + tab20b + tab20c
    # Drop greys and near-greys: grey means ignore.
    return [c for c in ordered if max(c) - min(c) > 0.1]


def label_palette() -> np.ndarray:
    """(256, 3) uint8 colours indexed by label value: 0 black, 1..254 distinct colours, 255 grey."""
    palette = np.zeros((256, 3), np.uint8)
    qualitative = _qualitative_colors()
    for value in range(1, 255):
        if value <= len(qualitative):
            rgb = qualitative[value - 1]
        else:
            # Past the hand-made colours (large class sets like all80): golden-ratio hue steps keep
            # neighbouring indices apart; saturation stays high so that no class looks grey.
            hue = (value * _GOLDEN_RATIO) % 1.0
            rgb = colorsys.hsv_to_rgb(hue, (0.95, 0.65)[value % 2], (0.95, 0.75, 0.85)[value % 3])
        palette[value] = [round(255 * c) for c in rgb]
    palette[IGNORE_INDEX] = IGNORE_COLOR
    return palette


def colorize(label: np.ndarray) -> np.ndarray:
    """Label map (H, W) of values 0..254 and 255 -> RGB uint8 (H, W, 3)."""
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"colorize expects a (H, W) label map, got shape {label.shape}")
    if label.size and (label.min() < 0 or label.max() > 255):
        raise ValueError(f"label values must lie in 0..255, got {label.min()}..{label.max()}")
    return label_palette()[label.astype(np.int64)]


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
