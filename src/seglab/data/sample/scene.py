"""One sample image: background, crowd and objects drawn back to front, the camera, and what to annotate.

Objects are drawn back to front, so later ones occlude earlier ones; each annotation records the
visible region, or (a share `amodal_fraction` of the occluded ones) the full outline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from seglab.data.sample.backgrounds import add_clutter, background
from seglab.data.sample.categories import CROWD_CATEGORIES, SAMPLE_CATEGORIES
from seglab.data.sample.objects import Light, Shape, cast_shadow, paint_shape, place_shape
from seglab.data.sample.shapes import FAMILIES

_MAX_OBJECTS = 6
MIN_OBJECT_PIXELS = 40         # smaller shapes are not worth an annotation
_MIN_VISIBLE_SHARE = 0.4         # an occluded instance keeps at least this share of its pixels
_MIN_INSIDE_SHARE = 0.7          # an object keeps at least this share of its bounding box in the image
_PLACEMENT_TRIES = 8


def camera(rng, canvas: np.ndarray, greyscale: bool) -> np.ndarray:
    """Uneven lighting, lens blur, tone curve and sensor noise, then 8 bits."""
    height, width = canvas.shape[:2]
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    a = rng.uniform(0, 2 * np.pi)
    ramp = ((xx / width - 0.5) * math.cos(a) + (yy / height - 0.5) * math.sin(a)) * rng.uniform(0.0, 0.3)
    vignette = ((xx / width - 0.5) ** 2 + (yy / height - 0.5) ** 2) * rng.uniform(0.0, 0.6)
    canvas = canvas * (1.0 + ramp - vignette)[..., None]
    sigma = rng.uniform(0.35, 0.9)
    canvas = ndimage.gaussian_filter(canvas, sigma=(sigma, sigma, 0))
    canvas = 255.0 * (np.clip(canvas, 0, 255) / 255.0) ** rng.uniform(0.85, 1.15)
    canvas = canvas + rng.uniform(1.5, 5.0) * rng.standard_normal(canvas.shape, dtype=np.float32)
    pixels = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    if greyscale:
        return np.asarray(Image.fromarray(pixels).convert("L"))
    return pixels


# ---------------------------------------------------------------------------------------------
# Scenes


@dataclass
class Annotation:
    """What one annotation will describe: a category and the region the annotator outlined."""

    category: str
    mask: np.ndarray        # bool, image size: the visible region, or the full one when amodal
    iscrowd: bool
    occluded: bool = False  # part of the object is hidden behind later objects
    amodal: bool = False    # the annotation outlines the hidden part too


@dataclass
class Scene:
    pixels: np.ndarray                  # uint8, (H, W, 3), or (H, W) for greyscale
    annotations: list[Annotation]      # back to front
    full_masks: list[np.ndarray]        # per annotation, the whole (amodal) region


@dataclass
class _Crowd:
    category: str
    members: list[Shape]
    region: np.ndarray


def _make_crowd(rng, height: int, width: int) -> _Crowd | None:
    """Many small objects of one category in a band, nearer ones lower and bigger; one region."""
    category = CROWD_CATEGORIES[int(rng.integers(len(CROWD_CATEGORIES)))]
    cx, cy = rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.7) * height
    half_w = rng.uniform(0.18, 0.35) * width
    half_h = rng.uniform(0.1, 0.25 if category == "bird" else 0.12) * height
    base = rng.uniform(0.08, 0.14) * min(height, width)
    count = int(rng.integers(8, 21))
    spots = np.stack([cx + rng.uniform(-half_w, half_w, count), cy + rng.uniform(-half_h, half_h, count)], axis=1)
    members: list[Shape] = []
    for x, y in spots[np.argsort(spots[:, 1], kind="stable")]:
        depth = (y - (cy - half_h)) / (2 * half_h)
        shape = place_shape(rng, category, height, width, (x, y), base * (0.8 + 0.4 * depth))
        if shape is not None and shape.inside_share >= 0.5:
            members.append(shape)
    if len(members) < 3:
        return None
    union = np.zeros((height, width), dtype=bool)
    for shape in members:
        union |= shape.full_mask(height, width)
    # An annotator outlines the group, gaps between members included.
    region = ndimage.binary_fill_holes(ndimage.binary_closing(union, np.ones((3, 3), bool), iterations=2) | union)
    if region.sum() < 4 * MIN_OBJECT_PIXELS:
        return None
    return _Crowd(category, members, region)


def _fits(full: np.ndarray, visible: list[np.ndarray], fulls: list[np.ndarray], min_share: list[float]) -> bool:
    """Would drawing `full` on top leave every earlier layer enough of itself?"""
    for vis, whole, share in zip(visible, fulls, min_share):
        kept = np.count_nonzero(vis & ~full)
        if kept < max(share * np.count_nonzero(whole), MIN_OBJECT_PIXELS):
            return False
    return True


def render_scene(rng, height: int, width: int, *, with_crowd: bool, greyscale: bool,
                  amodal_fraction: float) -> Scene:
    canvas = background(rng, height, width)
    add_clutter(rng, canvas)
    angle = rng.uniform(0, 2 * np.pi)
    light = Light(np.array([math.cos(angle), math.sin(angle)]), rng.uniform(0.15, 0.45) if rng.random() < 0.75 else 0.0)
    side = min(height, width)

    crowd = _make_crowd(rng, height, width) if with_crowd else None
    fulls: list[np.ndarray] = []      # per layer, back to front
    visible: list[np.ndarray] = []
    min_share: list[float] = []
    if crowd is not None:
        fulls.append(crowd.region)
        visible.append(crowd.region.copy())
        min_share.append(0.5)

    names = list(SAMPLE_CATEGORIES)
    weights = np.array([SAMPLE_CATEGORIES[n] for n in names])
    weights = weights / weights.sum()
    objects: list[Shape] = []
    for _ in range(int(rng.integers(1, _MAX_OBJECTS + 1))):
        category = names[int(rng.choice(len(names), p=weights))]
        lo, hi = FAMILIES[category].size
        for _attempt in range(_PLACEMENT_TRIES):
            size = math.exp(rng.uniform(math.log(lo), math.log(hi))) * side
            if objects and rng.random() < 0.5:  # next to an earlier object, so occlusions are common
                anchor = objects[int(rng.integers(len(objects)))]
                centre = anchor.centre + rng.normal(0.0, 0.4 * anchor.size, 2)
            else:
                centre = np.array([rng.uniform(0, width), rng.uniform(0, height)])
            shape = place_shape(rng, category, height, width, centre, size)
            if shape is None or shape.inside_share < _MIN_INSIDE_SHARE:
                continue
            full = shape.full_mask(height, width)
            if np.count_nonzero(full) < MIN_OBJECT_PIXELS or not _fits(full, visible, fulls, min_share):
                continue
            for vis in visible:
                vis &= ~full
            objects.append(shape)
            fulls.append(full)
            visible.append(full.copy())
            min_share.append(_MIN_VISIBLE_SHARE)
            break

    for shape in (crowd.members if crowd is not None else []) + objects:
        cast_shadow(canvas, shape, light)
        paint_shape(canvas, shape, light)
    pixels = camera(rng, canvas, greyscale)

    annotations: list[Annotation] = []
    categories = ([crowd.category] if crowd is not None else []) + [s.category for s in objects]
    for layer, (category, full, vis) in enumerate(zip(categories, fulls, visible)):
        occluded = bool(np.count_nonzero(vis) < np.count_nonzero(full))
        if crowd is not None and layer == 0:
            annotations.append(Annotation(category, vis, iscrowd=True, occluded=occluded))
            continue
        amodal = occluded and rng.random() < amodal_fraction
        annotations.append(Annotation(category, full if amodal else vis, iscrowd=False, occluded=occluded, amodal=amodal))
    return Scene(pixels, annotations, fulls)
