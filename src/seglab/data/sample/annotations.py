"""Masks -> COCO segmentations: exact polygons (holes spliced in), uncompressed RLE, annotation records."""

from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils
from scipy import ndimage
from skimage.measure import find_contours

from seglab.data.sample.categories import CATEGORY_ID
from seglab.data.sample.scene import Annotation

_EIGHT = np.ones((3, 3), dtype=bool)


def _drop_collinear(ring: np.ndarray) -> np.ndarray:
    """Keep only the corners of a ring (a vertex where the path turns back is a corner too)."""
    before, after = ring - np.roll(ring, 1, axis=0), np.roll(ring, -1, axis=0) - ring
    cross = before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]
    straight = (np.abs(cross) < 1e-9) & ((before * after).sum(axis=1) > 0)
    return ring[~straight]


def _bridge_hole(outer: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """Splice `hole` into `outer` through a vertical slit from the hole's top vertex straight up.

    pycocotools fills a polygon by the parity of its edges' column crossings, and a vertical
    slit walked down and back up crosses no column, so the result is the outer region minus the
    hole, exactly. (COCO polygon lists are unions, so a hole cannot be a polygon of its own.)
    """
    top = int(np.lexsort((hole[:, 0], hole[:, 1]))[0])
    hx, hy = hole[top]
    start, end = outer, np.roll(outer, -1, axis=0)
    # Candidates above the hole on the line x = hx: existing vertices, or crossings of sloped edges.
    on_line = (start[:, 0] == hx) & (start[:, 1] < hy)
    lo, hi = np.minimum(start[:, 0], end[:, 0]), np.maximum(start[:, 0], end[:, 0])
    crossing = (lo < hx) & (hx < hi)
    dx = np.where(crossing, end[:, 0] - start[:, 0], 1.0)
    cross_y = start[:, 1] + (hx - start[:, 0]) * (end[:, 1] - start[:, 1]) / dx
    crossing &= cross_y < hy
    y_vertex = np.where(on_line, start[:, 1], -np.inf)
    y_edge = np.where(crossing, cross_y, -np.inf)
    i_vertex, i_edge = int(np.argmax(y_vertex)), int(np.argmax(y_edge))
    if not np.isfinite(max(y_vertex[i_vertex], y_edge[i_edge])):
        raise AssertionError("a hole lies outside its component's outer contour")
    ring = np.concatenate([np.roll(hole, -top, axis=0), hole[top:top + 1]])
    if y_vertex[i_vertex] >= y_edge[i_edge]:
        anchor = outer[i_vertex:i_vertex + 1]
        return np.concatenate([outer[:i_vertex + 1], ring, anchor, outer[i_vertex + 1:]])
    anchor = np.array([[hx, y_edge[i_edge]]])
    return np.concatenate([outer[:i_edge + 1], anchor, ring, anchor, outer[i_edge + 1:]])


def _shoelace(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def mask_to_polygons(mask: np.ndarray) -> list[list[float]]:
    """COCO polygons, one per 8-connected component, whose pycocotools rasterisation is exactly `mask`.

    Contours run along pixel edges (marching squares at 0.5, shifted into COCO's coordinates,
    where pixel corners are integers); straight runs keep only their end points; holes are
    spliced into their component's outline through vertical slits (see `_bridge_hole`).
    """
    labels, _ = ndimage.label(np.asarray(mask, dtype=bool), structure=_EIGHT)
    polygons: list[list[float]] = []
    for k, box in enumerate(ndimage.find_objects(labels), start=1):
        component = np.pad(labels[box] == k, 1).astype(np.uint8)
        y0, x0 = box[0].start, box[1].start
        # (row, col) in the padded crop, pixel centres at integers -> COCO (x, y), pixel corners at integers
        rings = [_drop_collinear(np.stack([c[:-1, 1] + (x0 - 0.5), c[:-1, 0] + (y0 - 0.5)], axis=1))
                 for c in find_contours(component, 0.5, fully_connected="high")]
        # Foreground 8-connected: one outer contour, any others are its holes.
        rings.sort(key=_shoelace, reverse=True)
        outline = rings[0]
        for hole in sorted(rings[1:], key=lambda r: float(r[:, 1].min())):
            outline = _bridge_hole(outline, hole)
        polygons.append([float(c) for c in outline.ravel()])
    return polygons


def mask_to_uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE (as crowd annotations store it): column-major runs, zeros first."""
    mask = np.asarray(mask, dtype=bool)
    flat = mask.ravel(order="F")
    starts = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate([[0], starts, [flat.size]])).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"counts": [int(c) for c in counts], "size": [int(mask.shape[0]), int(mask.shape[1])]}


def coco_annotation(ann: Annotation, image_id: int, ann_id: int, height: int, width: int) -> dict | None:
    if ann.iscrowd:
        segmentation: list | dict = mask_to_uncompressed_rle(ann.mask)
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        segmentation = mask_to_polygons(ann.mask)
        if not segmentation:
            return None
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    area = float(mask_utils.area(rle))
    if area <= 0:
        return None
    bbox = [float(b) for b in mask_utils.toBbox(rle)]
    if ann.iscrowd:  # COCO stores crowd area and box as integers
        area, bbox = int(area), [int(b) for b in bbox]
    # Key order as in COCO's own files.
    return {"segmentation": segmentation, "area": area, "iscrowd": int(ann.iscrowd), "image_id": image_id,
            "bbox": bbox, "category_id": CATEGORY_ID[ann.category], "id": ann_id}
