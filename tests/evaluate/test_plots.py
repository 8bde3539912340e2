"""The evaluation figures are laid out before they are drawn: nothing may fall outside them or overlap."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.text import Text
from matplotlib.transforms import Bbox

from seglab.data.classes import IGNORE_INDEX
from seglab.data.palette import label_palette
from seglab.evaluate.plots import (
    confusion_figure,
    plot_confusion,
    plot_prediction_grid,
    prediction_grid_figure,
)

COCO_LIKE = ["background", "potted plant", "dining table", "motorcycle", "traffic light", "fire hydrant",
             "baseball glove", "tennis racket", "wine glass", "hair drier", "toothbrush", "teddy bear"]


def _drawn_texts(figure) -> list[tuple[str, Bbox]]:
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    return [(t.get_text(), t.get_window_extent(renderer)) for t in figure.findobj(Text)
            if t.get_visible() and t.get_text()]


def _assert_inside(figure) -> None:
    frame = figure.bbox
    for text, box in _drawn_texts(figure):
        assert frame.x0 - 1 <= box.x0 and box.x1 <= frame.x1 + 1, f"{text!r} leaves the figure sideways: {box}"
        assert frame.y0 - 1 <= box.y0 and box.y1 <= frame.y1 + 1, f"{text!r} leaves the figure vertically: {box}"


@pytest.mark.parametrize("classes", [COCO_LIKE[:3], COCO_LIKE, [f"{name} {i}" for i in range(7) for name in COCO_LIKE]])
def test_every_label_of_the_confusion_figure_lies_inside_it(classes):
    rng = np.random.default_rng(0)
    # Large supports make the longest row labels ("teddy bear (123,456,789 px)").
    matrix = rng.integers(0, 10**8, (len(classes), len(classes)))
    matrix[1] = 0  # an absent class: a blank row
    _assert_inside(confusion_figure(matrix, classes, title="a model (plain): confusion, % of each true class's pixels"))


def test_the_prediction_grid_keeps_its_legend_and_headings_apart_from_the_images():
    rng = np.random.default_rng(0)
    shapes = [(240, 320), (320, 160), (100, 300)]
    images = [rng.integers(0, 256, (*shape, 3), dtype=np.uint8) for shape in shapes]
    truths = [rng.integers(0, len(COCO_LIKE), shape).astype(np.uint8) for shape in shapes]
    truths[0][:10] = IGNORE_INDEX
    figure = prediction_grid_figure(images, truths, {"plain": truths, "tta": truths}, COCO_LIKE, title="first 3")
    _assert_inside(figure)
    renderer = figure.canvas.get_renderer()
    (mosaic,) = figure.images  # every cell, composed into one picture placed unscaled
    x0, x1, y0, y1 = mosaic.get_extent()
    cells = Bbox([[x0, y0], [x1, y1]])
    assert figure.bbox.x0 <= x0 and x1 <= figure.bbox.x1 and figure.bbox.y0 <= y0 and y1 <= figure.bbox.y1
    assert (y1 - y0, x1 - x0) == mosaic.get_array().shape[:2]
    legend = figure.legends[0]
    assert len(legend.get_texts()) == len(COCO_LIKE) + 1  # every class shown, and "ignore"
    boxes = {"legend": legend.get_window_extent(renderer), "title": figure._suptitle.get_window_extent(renderer)}
    boxes |= {t.get_text(): t.get_window_extent(renderer) for t in figure.texts if t is not figure._suptitle}
    assert {"image", "truth", "prediction (plain)", "prediction (tta)"} <= set(boxes)
    for name, box in boxes.items():
        assert not box.overlaps(cells), f"the {name!r} overlaps an image"


def test_the_prediction_grid_shows_each_label_map_in_palette_colours_only():
    """Label maps are scaled by nearest pixel: no blend of two classes' colours appears in a cell."""
    label = np.zeros((97, 131), np.uint8)
    label[:, ::2] = 3
    label[::3] = IGNORE_INDEX
    figure = prediction_grid_figure([np.zeros((97, 131, 3), np.uint8)], [label], {"plain": label[None]}, COCO_LIKE)
    (mosaic,) = figure.images
    colours = {tuple(c) for c in mosaic.get_array()[:, 260:].reshape(-1, 4)}  # right of the image's cell
    allowed = {(*c, 255) for c in label_palette()[[0, 3, IGNORE_INDEX]]} | {(255, 255, 255, 255)}  # and the background
    assert colours <= allowed and len(colours) == 4


def test_the_figures_are_written_as_png(tmp_path):
    label = np.zeros((8, 8), np.uint8)
    for path in (plot_confusion(np.eye(2, dtype=np.int64), ["a", "b"], tmp_path / "c.png"),
                 plot_prediction_grid([np.zeros((8, 8, 3))], [label], {"plain": [label]}, ["a"], tmp_path / "g.png")):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
