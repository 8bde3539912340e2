"""Evaluation figures: the labelled confusion heatmap and the image / truth / prediction grid.

Drawn with matplotlib's object API on an Agg canvas (no pyplot, no global state, no display), and
written atomically. Each figure is laid out before it is drawn (margins from the measured widths of
its labels, fixed rows and columns for the grid) and drawn once: a tight bounding box or a layout
engine draws it again, and the figures are a fixed part of every evaluate stage's time. Label maps
are coloured with seglab.data.palette, one palette for truth and predictions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.patches import Patch
from PIL import Image

from seglab.atomic import atomic_path
from seglab.data.classes import IGNORE_INDEX
from seglab.data.palette import IGNORE_COLOR, colorize, label_palette

__all__ = ["IGNORE_COLOR", "colorize", "confusion_figure", "label_palette", "plot_confusion", "plot_prediction_grid",
           "prediction_grid_figure"]

# Cells are annotated with their percentage only while they stay readable.
_MAX_ANNOTATED_CLASSES = 30


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        # zlib level 1: somewhat larger files than the default level, for less compression time.
        figure.savefig(tmp, format="png", dpi=figure.dpi, pil_kwargs={"compress_level": 1})
    return path


def _text_inches(figure: Figure, texts: Sequence[str], fontsize: float) -> float:
    """The width in inches of the widest of `texts` at `fontsize` as the Agg canvas will draw it."""
    renderer = figure.canvas.get_renderer()
    font = FontProperties(size=fontsize)
    widest = max((renderer.get_text_width_height_descent(text, font, ismath=False)[0] for text in texts), default=0.0)
    return widest / figure.dpi


def plot_confusion(
    confusion: np.ndarray,
    class_names: Sequence[str],
    path: str | Path,
    title: str = "",
    dpi: int = 100,
) -> Path:
    """`confusion_figure` written as a PNG to `path`."""
    return _save(confusion_figure(confusion, class_names, title, dpi), path)


def confusion_figure(confusion: np.ndarray, class_names: Sequence[str], title: str = "", dpi: int = 100) -> Figure:
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
    width, height = side + 1.5, side
    figure = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(figure)
    font = max(4.0, min(9.0, 240.0 / num_classes))
    row_labels = [f"{name} ({int(n):,} px)" for name, n in zip(class_names, support)]
    # Margins (inches): tick labels, the axis label beside them and a gap; the title above; the
    # colourbar's ticks and label on the right (the colourbar takes its width from the axes).
    left = _text_inches(figure, row_labels, font) + 0.55
    bottom = _text_inches(figure, list(class_names), font) + 0.55
    top, right = 0.5, 0.9
    figure.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height)
    axes = figure.add_subplot()
    image = axes.imshow(np.ma.masked_invalid(rates), cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    colorbar = figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    colorbar.set_label("share of the true class's pixels")
    axes.set_xticks(range(num_classes), labels=list(class_names), rotation=90, fontsize=font)
    axes.set_yticks(range(num_classes), labels=row_labels, fontsize=font)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class (truth pixels)")
    if num_classes <= _MAX_ANNOTATED_CLASSES:
        for row, col in zip(*np.nonzero(np.nan_to_num(rates) >= 0.005)):
            value = rates[row, col]
            axes.text(col, row, f"{100 * value:.0f}", ha="center", va="center", fontsize=font * 0.8,
                      color="white" if value > 0.5 else "black")
    axes.set_title(title or "confusion matrix (row-normalised, %)")
    return figure


def plot_prediction_grid(
    images: Sequence[np.ndarray],
    truths: Sequence[np.ndarray],
    predictions: Mapping[str, Sequence[np.ndarray]],
    class_names: Sequence[str],
    path: str | Path,
    title: str = "",
    dpi: int = 100,
) -> Path:
    """`prediction_grid_figure` written as a PNG to `path`."""
    return _save(prediction_grid_figure(images, truths, predictions, class_names, title, dpi), path)


def _fit(array: np.ndarray, side: int, resample: int) -> np.ndarray:
    """`array` (H, W, 3) uint8 scaled to fit a `side` x `side` cell, its aspect kept."""
    height, width = array.shape[:2]
    factor = side / max(height, width)
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    return np.asarray(Image.fromarray(array).resize(size, resample))


def prediction_grid_figure(
    images: Sequence[np.ndarray],
    truths: Sequence[np.ndarray],
    predictions: Mapping[str, Sequence[np.ndarray]],
    class_names: Sequence[str],
    title: str = "",
    dpi: int = 100,
) -> Figure:
    """One row per image: the image, its truth and each named prediction, in one shared palette.

    images: (H, W, 3) in [0, 255]; truths and predictions: (H, W) label maps (255 = ignore, grey).
    The legend lists the classes that appear in any shown truth or prediction.

    The cells are composed into one picture at the figure's resolution (each scaled to fit its
    square cell: images smoothly, coloured label maps by nearest pixel, so no colour between two
    classes appears) and placed unscaled: 24 axes, or a picture resampled by matplotlib, take several
    times as long to draw.
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
    # Fixed layout (pixels at `dpi`): square cells with gaps, a header for the title and the column
    # headings, and a footer for the legend, whose rows are known once the shown classes are.
    shown = {int(v) for maps in (truths, *predictions.values()) for label in maps for v in np.unique(label)}
    palette = label_palette()
    handles = [Patch(color=palette[v] / 255.0, label=class_names[v]) for v in sorted(shown) if v < len(class_names)]
    if IGNORE_INDEX in shown:
        handles.append(Patch(color=palette[IGNORE_INDEX] / 255.0, label="ignore"))
    legend_columns = min(6, max(1, len(handles)))
    cell, gap, margin = round(2.5 * dpi), round(0.1 * dpi), round(0.05 * dpi)
    header = round((0.35 + (0.35 if title else 0.0)) * dpi)
    footer = round((0.2 + 0.2 * -(-len(handles) // legend_columns)) * dpi)
    # RGBA, opaque: matplotlib places it as it is (an RGB picture is converted on every draw).
    mosaic = np.full((rows * (cell + gap) - gap, len(columns) * (cell + gap) - gap, 4), 255, np.uint8)
    for row in range(rows):
        for col, (_, maps) in enumerate(columns):
            if maps is None:
                tile = _fit(np.clip(np.asarray(images[row]), 0, 255).astype(np.uint8), cell, Image.Resampling.BILINEAR)
            else:
                tile = _fit(colorize(np.asarray(maps[row])), cell, Image.Resampling.NEAREST)
            top = row * (cell + gap) + (cell - tile.shape[0]) // 2
            left = col * (cell + gap) + (cell - tile.shape[1]) // 2
            mosaic[top:top + tile.shape[0], left:left + tile.shape[1], :3] = tile
    width, height = mosaic.shape[1] + 2 * margin, header + mosaic.shape[0] + footer
    figure = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    FigureCanvasAgg(figure)
    figure.figimage(mosaic, xo=margin, yo=footer, origin="upper")
    for col, (heading, _) in enumerate(columns):
        center = margin + col * (cell + gap) + cell / 2
        figure.text(center / width, (footer + mosaic.shape[0] + 0.08 * dpi) / height, heading,
                    ha="center", va="bottom", fontsize=10)
    figure.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 0.05 * dpi / height),
                  ncol=legend_columns, fontsize=8, frameon=False)
    if title:
        figure.suptitle(title, y=1 - 0.1 * dpi / height, va="top")
    return figure
