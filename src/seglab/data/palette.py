"""One palette for label maps, shared by evaluation figures and GAN sample grids: background black,
every class a distinct colour (none of them grey), ignore (255) mid grey."""

from __future__ import annotations

import colorsys

import numpy as np
from matplotlib import colormaps

from seglab.data.classes import IGNORE_INDEX

__all__ = ["IGNORE_COLOR", "colorize", "label_palette"]

IGNORE_COLOR = (128, 128, 128)
_GOLDEN_RATIO = 0.6180339887498949


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
