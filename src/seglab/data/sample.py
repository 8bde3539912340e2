"""The `sample` stage: a small COCO-format dataset that seglab generates itself.

Procedural scenes with eight VOC-20 categories (person, car, cat, dog, bird, bottle, chair,
bicycle), each a family of multi-part shapes with its own colour and texture distribution, on
procedural backgrounds (gradients, fractal noise, stripes, tiles, sky-over-ground scenes) with
unlabelled clutter, soft shadows, camera blur and sensor noise; some images are greyscale, as in
COCO. Objects are drawn back to front, so later ones occlude earlier ones.

Annotations follow COCO 2017 exactly (`instances_<split>.json`, all 80 categories declared):

- most instances are annotated with their *visible* region, traced into COCO polygons that
  rasterise (pycocotools) to exactly the object's visible pixels: one polygon per connected piece,
  holes (a see-through wheel, a chair back, an occluder in the middle) spliced in through a
  zero-width slit, since a COCO polygon list is a union and cannot carry holes as polygons;
- a small share (`amodal_fraction`) of occluded instances carry their full (amodal) outline, so
  those annotations overlap their occluders, as happens in real COCO;
- a few images (`crowd_fraction`) hold a crowd: a cluster of many small objects of one category,
  annotated as one uncompressed-RLE region with `iscrowd: 1`.

`area` and `bbox` come from pycocotools' rasterisation of the stored segmentation, so they agree
with what any COCO loader computes. Annotation ids grow from back to front within an image.

Everything is drawn from numpy Generators seeded by (seed, split[, image index]), never from a
global RNG: a rerun writes byte-identical files.
"""

from __future__ import annotations

import colorsys
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from scipy import ndimage
from skimage.measure import find_contours

from seglab.atomic import atomic_dir

# All 80 COCO 2017 categories with their real ids (1..90 with COCO's gaps): (id, name, supercategory).
COCO_CATEGORIES: tuple[tuple[int, str, str], ...] = (
    (1, "person", "person"),
    (2, "bicycle", "vehicle"),
    (3, "car", "vehicle"),
    (4, "motorcycle", "vehicle"),
    (5, "airplane", "vehicle"),
    (6, "bus", "vehicle"),
    (7, "train", "vehicle"),
    (8, "truck", "vehicle"),
    (9, "boat", "vehicle"),
    (10, "traffic light", "outdoor"),
    (11, "fire hydrant", "outdoor"),
    (13, "stop sign", "outdoor"),
    (14, "parking meter", "outdoor"),
    (15, "bench", "outdoor"),
    (16, "bird", "animal"),
    (17, "cat", "animal"),
    (18, "dog", "animal"),
    (19, "horse", "animal"),
    (20, "sheep", "animal"),
    (21, "cow", "animal"),
    (22, "elephant", "animal"),
    (23, "bear", "animal"),
    (24, "zebra", "animal"),
    (25, "giraffe", "animal"),
    (27, "backpack", "accessory"),
    (28, "umbrella", "accessory"),
    (31, "handbag", "accessory"),
    (32, "tie", "accessory"),
    (33, "suitcase", "accessory"),
    (34, "frisbee", "sports"),
    (35, "skis", "sports"),
    (36, "snowboard", "sports"),
    (37, "sports ball", "sports"),
    (38, "kite", "sports"),
    (39, "baseball bat", "sports"),
    (40, "baseball glove", "sports"),
    (41, "skateboard", "sports"),
    (42, "surfboard", "sports"),
    (43, "tennis racket", "sports"),
    (44, "bottle", "kitchen"),
    (46, "wine glass", "kitchen"),
    (47, "cup", "kitchen"),
    (48, "fork", "kitchen"),
    (49, "knife", "kitchen"),
    (50, "spoon", "kitchen"),
    (51, "bowl", "kitchen"),
    (52, "banana", "food"),
    (53, "apple", "food"),
    (54, "sandwich", "food"),
    (55, "orange", "food"),
    (56, "broccoli", "food"),
    (57, "carrot", "food"),
    (58, "hot dog", "food"),
    (59, "pizza", "food"),
    (60, "donut", "food"),
    (61, "cake", "food"),
    (62, "chair", "furniture"),
    (63, "couch", "furniture"),
    (64, "potted plant", "furniture"),
    (65, "bed", "furniture"),
    (67, "dining table", "furniture"),
    (70, "toilet", "furniture"),
    (72, "tv", "electronic"),
    (73, "laptop", "electronic"),
    (74, "mouse", "electronic"),
    (75, "remote", "electronic"),
    (76, "keyboard", "electronic"),
    (77, "cell phone", "electronic"),
    (78, "microwave", "appliance"),
    (79, "oven", "appliance"),
    (80, "toaster", "appliance"),
    (81, "sink", "appliance"),
    (82, "refrigerator", "appliance"),
    (84, "book", "indoor"),
    (85, "clock", "indoor"),
    (86, "vase", "indoor"),
    (87, "scissors", "indoor"),
    (88, "teddy bear", "indoor"),
    (89, "hair drier", "indoor"),
    (90, "toothbrush", "indoor"),
)
CATEGORY_ID = {name: cid for cid, name, _ in COCO_CATEGORIES}

# The categories the sample draws (all in torchvision's VOC-20 subset), with their relative frequency
# (person is the most common, as in COCO).
SAMPLE_CATEGORIES: dict[str, float] = {
    "person": 2.0, "car": 1.0, "cat": 1.0, "dog": 1.0, "bird": 1.0, "bottle": 1.0, "chair": 1.0, "bicycle": 1.0,
}
# Categories that form crowds (a group of people, a flock, a car park, a shelf of bottles).
CROWD_CATEGORIES = ("person", "bird", "car", "bottle")
SPLITS = ("train2017", "val2017")
JPEG_QUALITY = 90
# Bumped whenever the drawing changes, so a dataset names the generator that made it.
GENERATOR_VERSION = "1"

_MAX_OBJECTS = 6
_MIN_OBJECT_PIXELS = 40          # smaller shapes are not worth an annotation
_MIN_VISIBLE_SHARE = 0.4         # an occluded instance keeps at least this share of its pixels
_MIN_INSIDE_SHARE = 0.7          # an object keeps at least this share of its bounding box in the image
_PLACEMENT_TRIES = 8
_IDS_PER_SPLIT = 1_000_000       # image ids: split index * this + 1-based image index
_IDS_PER_IMAGE = 100             # annotation ids: image id * this + 1-based depth rank


# ---------------------------------------------------------------------------------------------
# Colours and textures


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255.0


def _random_colour(rng: np.random.Generator, sat=(0.1, 0.7), val=(0.3, 0.95)) -> np.ndarray:
    return _hsv(rng.random(), rng.uniform(*sat), rng.uniform(*val))


def _jitter(rng: np.random.Generator, rgb, amount: float = 0.12) -> np.ndarray:
    """A palette colour varied in brightness and slightly in hue, as lighting and dye vary."""
    rgb = np.asarray(rgb, dtype=np.float32)
    return np.clip(rgb * rng.uniform(1 - amount, 1 + amount) + rng.normal(0.0, 8.0, 3), 0, 255).astype(np.float32)


def _pick(rng: np.random.Generator, palette) -> np.ndarray:
    return np.asarray(palette[int(rng.integers(len(palette)))], dtype=np.float32)


@dataclass
class _Paint:
    """How one part of an object is coloured, as a function of the object's own (u, v) frame.

    Textures live in the object frame, so stripes and grain turn and scale with the object.
    """

    base: np.ndarray
    texture: str = "flat"          # flat | tabby | spots | grain | gloss | folds
    second: np.ndarray | None = None
    params: dict = field(default_factory=dict)

    def render(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        base = self.base[None, :]
        p = self.params
        if self.texture == "flat":
            return np.broadcast_to(base, (u.size, 3)).copy()
        if self.texture == "tabby":
            phase = 2 * np.pi * p["freq"] * (u * p["cos"] + v * p["sin"]) + 1.5 * np.sin(2 * np.pi * 3 * v + p["phase"])
            dark = np.sin(phase) > 0.3
            return base * np.where(dark, 0.55, 1.0)[:, None]
        if self.texture == "spots":
            field_ = sum(np.sin(2 * np.pi * (a * u + b * v) + ph) for a, b, ph in p["waves"])
            return np.where((field_ > 1.0)[:, None], self.second[None, :], base)
        if self.texture == "grain":
            along = u * p["cos"] + v * p["sin"]
            across = -u * p["sin"] + v * p["cos"]
            ring = np.sin(2 * np.pi * (p["freq"] * across + 1.2 * np.sin(2 * np.pi * 2 * along + p["phase"])))
            return base * (1.0 + 0.13 * ring)[:, None]
        if self.texture == "gloss":
            band = np.exp(-(((u - p["centre"]) / p["width"]) ** 2))
            return base * (1 - 0.55 * band)[:, None] + 240.0 * 0.55 * band[:, None]
        if self.texture == "folds":
            return base * (1.0 + 0.08 * np.sin(2 * np.pi * p["freq"] * u + p["phase"]))[:, None]
        raise ValueError(f"unknown texture {self.texture!r}")


def _tabby(rng, base) -> _Paint:
    angle = rng.uniform(-0.4, 0.4)
    return _Paint(base, "tabby", params={"freq": rng.uniform(9, 14), "cos": math.cos(angle), "sin": math.sin(angle),
                                         "phase": rng.uniform(0, 2 * np.pi)})


def _spots(rng, base, second) -> _Paint:
    waves = [(rng.uniform(-5, 5), rng.uniform(-5, 5), rng.uniform(0, 2 * np.pi)) for _ in range(3)]
    return _Paint(base, "spots", second=second, params={"waves": waves})


def _grain(rng, base, angle: float = 0.0) -> _Paint:
    return _Paint(base, "grain", params={"freq": rng.uniform(18, 30), "cos": math.cos(angle), "sin": math.sin(angle),
                                         "phase": rng.uniform(0, 2 * np.pi)})


# ---------------------------------------------------------------------------------------------
# Shape primitives, in an object's local frame (x right, y down; normalised later)

_Part = tuple[str, np.ndarray, bool]  # (paint role, polygon points (N, 2), subtract?)


def _ellipse(cx, cy, rx, ry, angle: float = 0.0, n: int = 36) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x, y = rx * np.cos(t), ry * np.sin(t)
    c, s = math.cos(angle), math.sin(angle)
    return np.stack([cx + c * x - s * y, cy + s * x + c * y], axis=1)


def _rect(x0, y0, x1, y1) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def _poly(*xy) -> np.ndarray:
    return np.array(xy, dtype=np.float64).reshape(-1, 2)


def _capsule(p0, p1, width, n: int = 8) -> np.ndarray:
    """A thick segment with round caps: limbs, tails, tubes."""
    p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
    d = p1 - p0
    ang = math.atan2(d[1], d[0])
    r = width / 2
    cap1 = [p1 + r * np.array([math.cos(a), math.sin(a)]) for a in np.linspace(ang - np.pi / 2, ang + np.pi / 2, n)]
    cap0 = [p0 + r * np.array([math.cos(a), math.sin(a)]) for a in np.linspace(ang + np.pi / 2, ang + 3 * np.pi / 2, n)]
    return np.array(cap1 + cap0)


def _round_rect(x0, y0, x1, y1, r, n: int = 6) -> np.ndarray:
    pts = []
    for cx, cy, a0 in ((x1 - r, y0 + r, -np.pi / 2), (x1 - r, y1 - r, 0.0), (x0 + r, y1 - r, np.pi / 2), (x0 + r, y0 + r, np.pi)):
        for a in np.linspace(a0, a0 + np.pi / 2, n):
            pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return np.array(pts)


# ---------------------------------------------------------------------------------------------
# The eight categories: a shape family (parts, drawn in order) and a colour distribution each

_SKIN = [(255, 219, 172), (241, 194, 125), (224, 172, 105), (198, 134, 66), (141, 85, 36), (92, 58, 32)]
_HAIR = [(20, 15, 10), (60, 40, 25), (110, 75, 40), (200, 170, 110), (150, 150, 150)]
_TROUSERS = [(30, 40, 80), (25, 25, 30), (60, 70, 90), (170, 150, 110), (90, 90, 95)]
_CAR_BODY = [(180, 20, 25), (25, 60, 160), (235, 235, 235), (170, 175, 180), (20, 20, 22), (230, 190, 30), (30, 90, 50)]
_CAT_FUR = [(215, 125, 50), (125, 125, 130), (35, 33, 33), (230, 215, 185), (150, 110, 70)]
_DOG_FUR = [(140, 90, 45), (205, 165, 105), (40, 32, 25), (235, 230, 220), (175, 120, 60)]
_PLUMAGE = [(200, 35, 35), (45, 95, 200), (150, 110, 70), (240, 205, 40), (35, 35, 35), (90, 150, 80)]
_BOTTLE_GLASS = [(40, 120, 55), (110, 60, 20), (170, 205, 215), (40, 80, 160)]
_BOTTLE_LABEL = [(240, 235, 220), (200, 40, 40), (250, 250, 250), (230, 200, 60)]
_BOTTLE_CAP = [(200, 200, 200), (200, 30, 30), (240, 200, 30), (30, 30, 30)]
_WOOD = [(130, 80, 40), (170, 120, 70), (90, 55, 30), (200, 160, 110)]
_PLASTIC = [(240, 240, 240), (200, 40, 40), (30, 30, 30), (40, 90, 170)]


def _person(rng):
    swing, stance = rng.uniform(-0.1, 0.12), rng.uniform(0.02, 0.12)
    arm_l, arm_r = (-0.2 - swing, 0.12), (0.2 + rng.uniform(-0.1, 0.12), 0.12)
    parts: list[_Part] = [
        ("trousers", _capsule((-0.06, 0.15), (-0.03 - stance, 0.5), 0.09), False),
        ("trousers", _capsule((0.06, 0.15), (0.03 + stance, 0.5), 0.09), False),
        ("shirt", _poly(-0.15, -0.22, 0.15, -0.22, 0.12, 0.19, -0.12, 0.19), False),
        ("shirt", _capsule((-0.135, -0.19), arm_l, 0.07), False),
        ("shirt", _capsule((0.135, -0.19), arm_r, 0.07), False),
        ("skin", _ellipse(arm_l[0], arm_l[1] + 0.02, 0.035, 0.04), False),
        ("skin", _ellipse(arm_r[0], arm_r[1] + 0.02, 0.035, 0.04), False),
        ("skin", _rect(-0.035, -0.28, 0.035, -0.2), False),
        ("skin", _ellipse(0.0, -0.36, 0.085, 0.105), False),
        ("hair", _ellipse(0.0, -0.405, 0.092, 0.07 + rng.uniform(0, 0.03)), False),
    ]
    paints = {
        "trousers": _Paint(_jitter(rng, _pick(rng, _TROUSERS))),
        "shirt": _Paint(_hsv(rng.random(), rng.uniform(0.35, 0.9), rng.uniform(0.4, 0.95)), "folds",
                        params={"freq": rng.uniform(4, 8), "phase": rng.uniform(0, 2 * np.pi)}),
        "skin": _Paint(_jitter(rng, _pick(rng, _SKIN), 0.08)),
        "hair": _Paint(_jitter(rng, _pick(rng, _HAIR))),
    }
    return parts, paints


def _car(rng):
    body_h, cabin_h = rng.uniform(0.16, 0.22), rng.uniform(0.14, 0.2)
    back, front = rng.uniform(-0.36, -0.25), rng.uniform(0.18, 0.3)
    parts: list[_Part] = [
        ("body", _round_rect(-0.5, 0.0, 0.5, body_h, 0.05), False),
        ("body", _poly(back, 0.01, front, 0.01, front - 0.13, -cabin_h, back + 0.08, -cabin_h), False),
        ("glass", _poly(back + 0.05, -0.01, front - 0.05, -0.01, front - 0.15, -cabin_h + 0.03, back + 0.11, -cabin_h + 0.03), False),
        ("body", _rect(-0.04, -cabin_h, -0.005, 0.0), False),
        ("light", _rect(0.44, 0.03, 0.5, 0.07), False),
        ("taillight", _rect(-0.5, 0.03, -0.46, 0.07), False),
    ]
    for x in (-0.3, 0.3):
        parts.append(("tyre", _ellipse(x, body_h, 0.1, 0.1), False))
        parts.append(("hub", _ellipse(x, body_h, 0.045, 0.045), False))
    body = _jitter(rng, _pick(rng, _CAR_BODY))
    paints = {
        "body": _Paint(body, "gloss", params={"centre": rng.uniform(-0.3, 0.3), "width": 0.06}),
        "glass": _Paint(_jitter(rng, (45, 60, 75)), "gloss", params={"centre": rng.uniform(-0.2, 0.2), "width": 0.03}),
        "light": _Paint(np.array([250, 240, 200], np.float32)),
        "taillight": _Paint(np.array([200, 30, 30], np.float32)),
        "tyre": _Paint(_jitter(rng, (22, 22, 22))),
        "hub": _Paint(_jitter(rng, (165, 165, 170))),
    }
    return parts, paints


def _cat(rng):
    tail_up = rng.uniform(-0.35, -0.1)
    parts: list[_Part] = [
        ("fur", _capsule((-0.29, 0.03), (-0.42, -0.05), 0.05), False),
        ("fur", _capsule((-0.42, -0.05), (-0.47, tail_up), 0.05), False),
        ("fur", _ellipse(0.0, 0.05, 0.32, 0.15), False),
    ]
    for x in (-0.22, -0.14, 0.14, 0.22):
        parts.append(("fur", _capsule((x, 0.1), (x + rng.uniform(-0.04, 0.04), 0.3), 0.06), False))
    parts += [
        ("fur", _ellipse(0.33, -0.12, 0.12, 0.11), False),
        ("fur", _poly(0.22, -0.15, 0.25, -0.32, 0.32, -0.2), False),
        ("fur", _poly(0.35, -0.2, 0.42, -0.32, 0.45, -0.14), False),
        ("eye", _ellipse(0.29, -0.13, 0.022, 0.016), False),
        ("eye", _ellipse(0.38, -0.13, 0.022, 0.016), False),
        ("nose", _poly(0.32, -0.08, 0.36, -0.08, 0.34, -0.05), False),
    ]
    fur = _jitter(rng, _pick(rng, _CAT_FUR))
    paints = {
        "fur": _tabby(rng, fur) if rng.random() < 0.6 else _Paint(fur),
        "eye": _Paint(_jitter(rng, (150, 190, 60))),
        "nose": _Paint(_jitter(rng, (220, 140, 150))),
    }
    return parts, paints


def _dog(rng):
    parts: list[_Part] = [("fur", _capsule((-0.3, -0.03), (-0.45, rng.uniform(-0.28, -0.1)), 0.05), False)]
    for x in (-0.24, -0.15, 0.15, 0.24):
        parts.append(("fur", _capsule((x, 0.05), (x + rng.uniform(-0.05, 0.05), 0.33), 0.07), False))
    parts += [
        ("fur", _ellipse(0.0, 0.0, 0.33, 0.14), False),
        ("fur", _capsule((0.22, -0.02), (0.32, -0.15), 0.12), False),
        ("fur", _ellipse(0.36, -0.2, 0.1, 0.09), False),
        ("fur", _ellipse(0.47, -0.16, 0.08, 0.05), False),
        ("nose", _ellipse(0.54, -0.17, 0.022, 0.02), False),
        ("ear", _ellipse(0.31, -0.16, 0.04, 0.09, angle=rng.uniform(-0.4, 0.2)), False),
        ("eye", _ellipse(0.4, -0.23, 0.015, 0.015), False),
    ]
    fur = _jitter(rng, _pick(rng, _DOG_FUR))
    patch = _jitter(rng, _pick(rng, _DOG_FUR))
    paints = {
        "fur": _spots(rng, fur, patch) if rng.random() < 0.5 else _Paint(fur),
        "ear": _Paint(fur * 0.65),
        "nose": _Paint(_jitter(rng, (20, 18, 18))),
        "eye": _Paint(_jitter(rng, (30, 20, 10))),
    }
    return parts, paints


def _bird(rng):
    flying = rng.random() < 0.3
    parts: list[_Part] = [("wing", _poly(-0.25, 0.0, -0.5, -0.06, -0.48, 0.08), False)]
    if not flying:
        parts += [("leg", _capsule((0.0, 0.12), (0.02, 0.28), 0.02), False),
                  ("leg", _capsule((0.06, 0.12), (0.08, 0.28), 0.02), False)]
    parts += [
        ("plumage", _ellipse(0.0, 0.0, 0.28, 0.15), False),
        ("plumage", _ellipse(0.25, -0.12, 0.1, 0.1), False),
        ("beak", _poly(0.33, -0.15, 0.45, -0.11, 0.33, -0.08), False),
        ("eye", _ellipse(0.28, -0.14, 0.018, 0.018), False),
    ]
    if flying:
        parts.append(("wing", _poly(-0.12, -0.05, 0.1, -0.06, -0.05, -0.45, -0.2, -0.4), False))
    else:
        parts.append(("wing", _ellipse(-0.05, -0.02, 0.2, 0.08, angle=-0.2), False))
    plumage = _jitter(rng, _pick(rng, _PLUMAGE))
    paints = {
        "plumage": _Paint(plumage),
        "wing": _Paint(plumage * 0.6),
        "beak": _Paint(_jitter(rng, (240, 150, 30))),
        "eye": _Paint(np.array([15, 15, 15], np.float32)),
        "leg": _Paint(_jitter(rng, (200, 150, 80))),
    }
    return parts, paints


def _bottle(rng):
    w = rng.uniform(0.1, 0.15)
    neck = w * rng.uniform(0.3, 0.45)
    shoulder = rng.uniform(-0.15, 0.0)
    parts: list[_Part] = [
        ("glass", _round_rect(-w, shoulder, w, 0.5, 0.02), False),
        ("glass", _poly(-w, shoulder + 0.01, w, shoulder + 0.01, neck, -0.3, -neck, -0.3), False),
        ("glass", _rect(-neck, -0.45, neck, -0.29), False),
        ("cap", _rect(-neck * 1.15, -0.5, neck * 1.15, -0.44), False),
    ]
    if rng.random() < 0.8:
        parts.append(("label", _rect(-w, 0.08, w, 0.3), False))
    paints = {
        "glass": _Paint(_jitter(rng, _pick(rng, _BOTTLE_GLASS)), "gloss",
                        params={"centre": rng.uniform(-0.6, -0.2) * w, "width": 0.025}),
        "label": _Paint(_jitter(rng, _pick(rng, _BOTTLE_LABEL))),
        "cap": _Paint(_jitter(rng, _pick(rng, _BOTTLE_CAP))),
    }
    return parts, paints


def _chair(rng):
    parts: list[_Part] = [
        ("frame", _capsule((-0.18, 0.05), (-0.18, 0.42), 0.04), False),
        ("frame", _capsule((0.18, 0.05), (0.18, 0.42), 0.04), False),
        ("frame", _rect(-0.22, -0.5, 0.22, 0.0), False),
    ]
    if rng.random() < 0.6:  # a slatted back: the gaps show what is behind the chair
        slats = int(rng.integers(2, 4))
        edges = np.linspace(-0.17, 0.17, 2 * slats)
        for i in range(0, len(edges) - 1, 2):
            parts.append(("frame", _rect(edges[i], -0.42, edges[i + 1], -0.08), True))
    parts += [
        ("seat", _poly(-0.26, 0.0, 0.26, 0.0, 0.28, 0.07, -0.28, 0.07), False),
        ("frame", _capsule((-0.25, 0.06), (-0.26, 0.5), 0.045), False),
        ("frame", _capsule((0.25, 0.06), (0.26, 0.5), 0.045), False),
    ]
    if rng.random() < 0.65:
        wood = _jitter(rng, _pick(rng, _WOOD))
        paints = {"frame": _grain(rng, wood, angle=np.pi / 2), "seat": _grain(rng, wood * 1.08)}
    else:
        plastic = _jitter(rng, _pick(rng, _PLASTIC), 0.06)
        paints = {"frame": _Paint(plastic), "seat": _Paint(plastic * 0.9)}
    return parts, paints


def _bicycle(rng):
    rear, front, bracket = (-0.3, 0.12), (0.3, 0.12), (0.0, 0.12)
    seat, head = (-0.07, -0.15), (0.22, -0.15)
    parts: list[_Part] = []
    for cx, cy in (rear, front):
        parts.append(("tyre", _ellipse(cx, cy, 0.19, 0.19, n=48), False))
        parts.append(("tyre", _ellipse(cx, cy, 0.155, 0.155, n=48), True))  # the wheel is see-through
        for a in np.linspace(0, np.pi, 3, endpoint=False) + rng.uniform(0, np.pi):
            d = 0.16 * np.array([math.cos(a), math.sin(a)])
            parts.append(("spoke", _capsule((cx - d[0], cy - d[1]), (cx + d[0], cy + d[1]), 0.012, n=3), False))
        parts.append(("hub", _ellipse(cx, cy, 0.03, 0.03), False))
    for a, b in ((rear, bracket), (bracket, seat), (seat, rear), (bracket, head), (seat, head), (head, front)):
        parts.append(("frame", _capsule(a, b, 0.032), False))
    parts += [
        ("frame", _capsule(seat, (seat[0] - 0.01, seat[1] - 0.04), 0.025), False),
        ("saddle", _ellipse(seat[0] - 0.01, seat[1] - 0.05, 0.06, 0.02), False),
        ("bar", _capsule(head, (0.2, -0.25), 0.025), False),
        ("bar", _capsule((0.2, -0.25), (0.27, -0.26), 0.025), False),
    ]
    paints = {
        "tyre": _Paint(_jitter(rng, (25, 25, 25))),
        "spoke": _Paint(_jitter(rng, (185, 185, 190))),
        "hub": _Paint(_jitter(rng, (170, 170, 170))),
        "frame": _Paint(_hsv(rng.random(), rng.uniform(0.5, 1.0), rng.uniform(0.4, 0.95))),
        "saddle": _Paint(_jitter(rng, (30, 28, 28))),
        "bar": _Paint(_jitter(rng, (60, 60, 60))),
    }
    return parts, paints


@dataclass(frozen=True)
class _Family:
    build: Callable
    size: tuple[float, float]   # largest extent, as a share of the image's shorter side (log-uniform)
    max_rotation: float         # degrees either way


_FAMILIES: dict[str, _Family] = {
    "person": _Family(_person, (0.4, 0.95), 12),
    "car": _Family(_car, (0.35, 0.9), 8),
    "cat": _Family(_cat, (0.3, 0.7), 15),
    "dog": _Family(_dog, (0.32, 0.8), 15),
    "bird": _Family(_bird, (0.2, 0.5), 35),
    "bottle": _Family(_bottle, (0.25, 0.65), 20),
    "chair": _Family(_chair, (0.35, 0.8), 10),
    "bicycle": _Family(_bicycle, (0.35, 0.85), 12),
}


# ---------------------------------------------------------------------------------------------
# Placed shapes


@dataclass
class _Shape:
    """One object placed in an image: its parts rasterised into a part-index map over its crop."""

    category: str
    paints: list[_Paint]
    centre: np.ndarray
    angle: float
    scale: np.ndarray            # px per local unit along local x and y
    flip: bool
    crop: tuple[int, int, int, int]   # y0, y1, x0, x1
    part_map: np.ndarray         # uint8 over the crop: 0 = not this object, k = paints[k - 1]
    inside_share: float
    size: float

    def to_local(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dx, dy = x - self.centre[0], y - self.centre[1]
        c, s = math.cos(-self.angle), math.sin(-self.angle)
        u, v = (c * dx - s * dy) / self.scale[0], (s * dx + c * dy) / self.scale[1]
        return (-u if self.flip else u), v

    def full_mask(self, height: int, width: int) -> np.ndarray:
        mask = np.zeros((height, width), dtype=bool)
        y0, y1, x0, x1 = self.crop
        mask[y0:y1, x0:x1] = self.part_map > 0
        return mask


def _place_shape(rng, category: str, height: int, width: int, centre, size: float) -> _Shape | None:
    """Build, normalise, transform and rasterise one object; None if it falls outside the image."""
    family = _FAMILIES[category]
    parts, paint_by_role = family.build(rng)
    additive = np.concatenate([p for _, p, sub in parts if not sub])
    lo, hi = additive.min(axis=0), additive.max(axis=0)
    origin, extent = (lo + hi) / 2, float((hi - lo).max())
    aspect = rng.uniform(0.87, 1.15)
    scale = np.array([size * aspect, size / aspect]) / extent
    angle = math.radians(rng.uniform(-family.max_rotation, family.max_rotation))
    flip = bool(rng.random() < 0.5)
    c, s = math.cos(angle), math.sin(angle)
    rotation = np.array([[c, -s], [s, c]])
    centre = np.asarray(centre, dtype=np.float64)

    def to_image(points: np.ndarray) -> np.ndarray:
        local = (points - origin) * scale
        if flip:
            local[:, 0] = -local[:, 0]
        return local @ rotation.T + centre

    placed = [(role, to_image(points), sub) for role, points, sub in parts]
    everything = np.concatenate([p for _, p, _ in placed])
    bx0, by0 = everything.min(axis=0)
    bx1, by1 = everything.max(axis=0)
    x0, y0 = max(0, int(math.floor(bx0)) - 1), max(0, int(math.floor(by0)) - 1)
    x1, y1 = min(width, int(math.ceil(bx1)) + 2), min(height, int(math.ceil(by1)) + 2)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return None
    box_area = max((bx1 - bx0) * (by1 - by0), 1e-6)
    inside = max(0.0, min(bx1, width) - max(bx0, 0)) * max(0.0, min(by1, height) - max(by0, 0))
    roles = list(paint_by_role)
    canvas = Image.new("L", (x1 - x0, y1 - y0), 0)
    draw = ImageDraw.Draw(canvas)
    for role, points, sub in placed:
        # PIL puts integer coordinates at pixel centres; ours are at pixel corners.
        xy = [(float(px) - x0 - 0.5, float(py) - y0 - 0.5) for px, py in points]
        draw.polygon(xy, fill=0 if sub else roles.index(role) + 1)
    # Textures use the normalised frame (object extent 1, centred), so they scale with the object.
    return _Shape(
        category=category,
        paints=[paint_by_role[r] for r in roles],
        centre=centre,
        angle=angle,
        scale=np.array([size * aspect, size / aspect]),
        flip=flip,
        crop=(y0, y1, x0, x1),
        part_map=np.asarray(canvas, dtype=np.uint8).copy(),
        inside_share=inside / box_area,
        size=size,
    )


# ---------------------------------------------------------------------------------------------
# Backgrounds, clutter, shadows, painting, camera


def _paste_max(buf: np.ndarray, src: np.ndarray, oy: int, ox: int) -> None:
    """Write `src` into `buf` at offset (oy, ox), clipped to `buf` (keeps the larger value)."""
    sy0, sx0 = max(0, -oy), max(0, -ox)
    dy0, dx0 = max(0, oy), max(0, ox)
    hgt = min(src.shape[0] - sy0, buf.shape[0] - dy0)
    wid = min(src.shape[1] - sx0, buf.shape[1] - dx0)
    if hgt > 0 and wid > 0:
        np.maximum(buf[dy0:dy0 + hgt, dx0:dx0 + wid], src[sy0:sy0 + hgt, sx0:sx0 + wid],
                   out=buf[dy0:dy0 + hgt, dx0:dx0 + wid])



def _fractal_noise(rng, height: int, width: int, cells: int = 3, octaves: int = 4) -> np.ndarray:
    """Smooth value noise in [0, 1]: random grids of doubling resolution, upsampled and summed."""
    total = np.zeros((height, width), np.float32)
    amplitude = 1.0
    for octave in range(octaves):
        n = cells * 2 ** octave + 1
        grid = rng.random((n, n), dtype=np.float32)
        total += amplitude * np.asarray(Image.fromarray(grid).resize((width, height), Image.Resampling.BICUBIC))
        amplitude *= 0.5
    lo, hi = float(total.min()), float(total.max())
    return (total - lo) / max(hi - lo, 1e-6)


def _mix(c1: np.ndarray, c2: np.ndarray, t: np.ndarray) -> np.ndarray:
    return c1[None, None, :] * (1.0 - t[..., None]) + c2[None, None, :] * t[..., None]


_GROUND = [((70, 120, 50), (105, 150, 65)), ((80, 80, 85), (115, 115, 120)), ((200, 180, 140), (165, 145, 105)),
           ((150, 110, 70), (115, 80, 50))]
_BACKGROUNDS = ("gradient", "noise", "stripes", "tiles", "scene")


def _background(rng, height: int, width: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    c1, c2 = _random_colour(rng), _random_colour(rng)
    kind = _BACKGROUNDS[int(rng.integers(len(_BACKGROUNDS)))]
    angle = rng.uniform(0, 2 * np.pi)
    along = xx * math.cos(angle) + yy * math.sin(angle)
    across = -xx * math.sin(angle) + yy * math.cos(angle)
    if kind == "gradient":
        t = (along - along.min()) / max(float(np.ptp(along)), 1e-6)
        img = _mix(c1, c2, t)
    elif kind == "noise":
        img = _mix(c1, c2, _fractal_noise(rng, height, width, cells=int(rng.integers(2, 6))))
    elif kind == "stripes":
        wave = np.sin(2 * np.pi * along / rng.uniform(6, 40))
        if rng.random() < 0.5:
            wave = np.sign(wave)
        img = _mix(c1, c2, 0.5 + 0.5 * wave * rng.uniform(0.3, 1.0))
    elif kind == "tiles":
        tile = rng.uniform(10, 40)
        checker = (np.floor(along / tile) + np.floor(across / tile)) % 2
        grout = (np.minimum(along % tile, across % tile) < 1.5).astype(np.float32)
        img = _mix(c1, c2, checker * rng.uniform(0.2, 1.0)) * (1.0 - 0.45 * grout[..., None])
    else:  # sky over ground, with a horizon that wanders
        horizon = rng.uniform(0.25, 0.65) * height
        ridge = horizon - _fractal_noise(rng, 1, width, cells=3)[0] * rng.uniform(0.0, 0.2) * height
        sky_top = _hsv(rng.uniform(0.55, 0.65), rng.uniform(0.2, 0.6), rng.uniform(0.6, 0.95))
        sky = _mix(sky_top, np.minimum(sky_top * 1.25 + 20, 255), np.clip(yy / max(horizon, 1.0), 0, 1))
        g1, g2 = _GROUND[int(rng.integers(len(_GROUND)))]
        ground = _mix(_jitter(rng, g1), _jitter(rng, g2), _fractal_noise(rng, height, width, cells=int(rng.integers(3, 8))))
        img = np.where((yy < ridge[None, :])[..., None], sky, ground)
    texture = _fractal_noise(rng, height, width, cells=int(rng.integers(4, 16)), octaves=3) - 0.5
    return (img + texture[..., None] * rng.uniform(5, 30)).astype(np.float32)


def _add_clutter(rng, canvas: np.ndarray) -> None:
    """Unlabelled blobs on the background: not everything that stands out is an object."""
    height, width = canvas.shape[:2]
    for _ in range(int(rng.integers(0, 4))):
        radius = rng.uniform(0.05, 0.25) * min(height, width)
        corners = int(rng.integers(3, 10))
        angles = np.sort(rng.uniform(0, 2 * np.pi, corners))
        radii = radius * rng.uniform(0.5, 1.0, corners)
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        xy = [(float(cx + r * math.cos(a)), float(cy + r * math.sin(a))) for r, a in zip(radii, angles)]
        layer = Image.new("L", (width, height), 0)
        ImageDraw.Draw(layer).polygon(xy, fill=1)
        mask = np.asarray(layer, dtype=bool)
        shade = 1.0 + 0.25 * (np.linspace(-1, 1, height, dtype=np.float32)[:, None] * rng.uniform(-1, 1))
        colour = _random_colour(rng, sat=(0.0, 0.8), val=(0.15, 0.95))
        canvas[mask] = (colour[None, None, :] * shade[..., None] * np.ones((1, width, 1), np.float32))[mask]


@dataclass(frozen=True)
class _Light:
    direction: np.ndarray   # unit vector in image coordinates, pointing where shadows fall
    shadow: float           # 0 = overcast, no shadows


def _cast_shadow(canvas: np.ndarray, shape: _Shape, light: _Light) -> None:
    if light.shadow <= 0:
        return
    height, width = canvas.shape[:2]
    sigma = max(1.0, 0.035 * shape.size)
    shift = np.rint(light.direction * 0.05 * shape.size).astype(int)
    margin = int(math.ceil(3 * sigma)) + int(np.abs(shift).max()) + 1
    y0, y1, x0, x1 = shape.crop
    Y0, Y1 = max(0, y0 - margin), min(height, y1 + margin)
    X0, X1 = max(0, x0 - margin), min(width, x1 + margin)
    buf = np.zeros((Y1 - Y0, X1 - X0), np.float32)
    _paste_max(buf, (shape.part_map > 0).astype(np.float32), y0 - Y0 + int(shift[1]), x0 - X0 + int(shift[0]))
    canvas[Y0:Y1, X0:X1] *= (1.0 - light.shadow * ndimage.gaussian_filter(buf, sigma))[..., None]


def _paint(canvas: np.ndarray, shape: _Shape, light: _Light) -> None:
    y0, _, x0, _ = shape.crop
    ys, xs = np.nonzero(shape.part_map)
    px, py = xs + x0 + 0.5, ys + y0 + 0.5
    u, v = shape.to_local(px, py)
    part = shape.part_map[ys, xs]
    colour = np.empty((ys.size, 3), np.float32)
    for k, paint in enumerate(shape.paints, start=1):
        sel = part == k
        if sel.any():
            colour[sel] = paint.render(u[sel], v[sel])
    # The side facing the light is brighter: a cue to 3-D shape, as in photos.
    facing = ((px - shape.centre[0]) * light.direction[0] + (py - shape.centre[1]) * light.direction[1]) / shape.size
    canvas[ys + y0, xs + x0] = colour * (1.0 - 0.35 * facing)[:, None]


def _camera(rng, canvas: np.ndarray, greyscale: bool) -> np.ndarray:
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
class _Annotation:
    """What one annotation will describe: a category and the region the annotator outlined."""

    category: str
    mask: np.ndarray        # bool, image size: the visible region, or the full one when amodal
    iscrowd: bool
    occluded: bool = False  # part of the object is hidden behind later objects
    amodal: bool = False    # the annotation outlines the hidden part too


@dataclass
class _Scene:
    pixels: np.ndarray                  # uint8, (H, W, 3), or (H, W) for greyscale
    annotations: list[_Annotation]      # back to front
    full_masks: list[np.ndarray]        # per annotation, the whole (amodal) region


@dataclass
class _Crowd:
    category: str
    members: list[_Shape]
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
    members: list[_Shape] = []
    for x, y in spots[np.argsort(spots[:, 1], kind="stable")]:
        depth = (y - (cy - half_h)) / (2 * half_h)
        shape = _place_shape(rng, category, height, width, (x, y), base * (0.8 + 0.4 * depth))
        if shape is not None and shape.inside_share >= 0.5:
            members.append(shape)
    if len(members) < 3:
        return None
    union = np.zeros((height, width), dtype=bool)
    for shape in members:
        union |= shape.full_mask(height, width)
    # An annotator outlines the group, gaps between members included.
    region = ndimage.binary_fill_holes(ndimage.binary_closing(union, np.ones((3, 3), bool), iterations=2) | union)
    if region.sum() < 4 * _MIN_OBJECT_PIXELS:
        return None
    return _Crowd(category, members, region)


def _fits(full: np.ndarray, visible: list[np.ndarray], fulls: list[np.ndarray], min_share: list[float]) -> bool:
    """Would drawing `full` on top leave every earlier layer enough of itself?"""
    for vis, whole, share in zip(visible, fulls, min_share):
        kept = np.count_nonzero(vis & ~full)
        if kept < max(share * np.count_nonzero(whole), _MIN_OBJECT_PIXELS):
            return False
    return True


def _render_scene(rng, height: int, width: int, *, with_crowd: bool, greyscale: bool,
                  amodal_fraction: float) -> _Scene:
    canvas = _background(rng, height, width)
    _add_clutter(rng, canvas)
    angle = rng.uniform(0, 2 * np.pi)
    light = _Light(np.array([math.cos(angle), math.sin(angle)]), rng.uniform(0.15, 0.45) if rng.random() < 0.75 else 0.0)
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
    objects: list[_Shape] = []
    for _ in range(int(rng.integers(1, _MAX_OBJECTS + 1))):
        category = names[int(rng.choice(len(names), p=weights))]
        lo, hi = _FAMILIES[category].size
        for _attempt in range(_PLACEMENT_TRIES):
            size = math.exp(rng.uniform(math.log(lo), math.log(hi))) * side
            if objects and rng.random() < 0.5:  # next to an earlier object, so occlusions are common
                anchor = objects[int(rng.integers(len(objects)))]
                centre = anchor.centre + rng.normal(0.0, 0.4 * anchor.size, 2)
            else:
                centre = np.array([rng.uniform(0, width), rng.uniform(0, height)])
            shape = _place_shape(rng, category, height, width, centre, size)
            if shape is None or shape.inside_share < _MIN_INSIDE_SHARE:
                continue
            full = shape.full_mask(height, width)
            if np.count_nonzero(full) < _MIN_OBJECT_PIXELS or not _fits(full, visible, fulls, min_share):
                continue
            for vis in visible:
                vis &= ~full
            objects.append(shape)
            fulls.append(full)
            visible.append(full.copy())
            min_share.append(_MIN_VISIBLE_SHARE)
            break

    for shape in (crowd.members if crowd is not None else []) + objects:
        _cast_shadow(canvas, shape, light)
        _paint(canvas, shape, light)
    pixels = _camera(rng, canvas, greyscale)

    annotations: list[_Annotation] = []
    categories = ([crowd.category] if crowd is not None else []) + [s.category for s in objects]
    for layer, (category, full, vis) in enumerate(zip(categories, fulls, visible)):
        occluded = bool(np.count_nonzero(vis) < np.count_nonzero(full))
        if crowd is not None and layer == 0:
            annotations.append(_Annotation(category, vis, iscrowd=True, occluded=occluded))
            continue
        amodal = occluded and rng.random() < amodal_fraction
        annotations.append(_Annotation(category, full if amodal else vis, iscrowd=False, occluded=occluded, amodal=amodal))
    return _Scene(pixels, annotations, fulls)


# ---------------------------------------------------------------------------------------------
# Masks -> COCO segmentations

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


def _coco_annotation(ann: _Annotation, image_id: int, ann_id: int, height: int, width: int) -> dict | None:
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


# ---------------------------------------------------------------------------------------------
# The stage


def _save_jpeg(pixels: np.ndarray, path: Path) -> None:
    Image.fromarray(pixels).save(path, format="JPEG", quality=JPEG_QUALITY)


def _share(count: int, fraction: float, *, at_least_one: bool) -> int:
    k = int(round(fraction * count))
    return max(k, 1) if (at_least_one and fraction > 0 and count > 0) else k


def _generate_split(root: Path, split: str, split_index: int, count: int, *, min_side: int, max_side: int,
                    crowd_fraction: float, amodal_fraction: float, greyscale_fraction: float,
                    seed: int) -> tuple[dict, dict]:
    (root / split).mkdir()
    split_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(split_index,)))
    crowd_images = set(split_rng.choice(count, _share(count, crowd_fraction, at_least_one=True), replace=False).tolist())
    grey_images = set(split_rng.choice(count, _share(count, greyscale_fraction, at_least_one=False), replace=False).tolist())
    images, annotations = [], []
    stats = Counter()
    per_category: Counter = Counter()
    for index in range(count):
        # One stream per image, so a change in how one image is drawn does not ripple into the rest.
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(split_index, index)))
        height, width = (int(s) for s in rng.integers(min_side, max_side + 1, size=2))
        scene = _render_scene(rng, height, width, with_crowd=index in crowd_images, greyscale=index in grey_images,
                              amodal_fraction=amodal_fraction)
        image_id = split_index * _IDS_PER_SPLIT + index + 1
        file_name = f"{image_id:012d}.jpg"
        _save_jpeg(scene.pixels, root / split / file_name)
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width, "license": 1})
        stats["greyscale"] += scene.pixels.ndim == 2
        for depth, ann in enumerate(scene.annotations, start=1):
            record = _coco_annotation(ann, image_id, image_id * _IDS_PER_IMAGE + depth, height, width)
            if record is None:
                continue
            annotations.append(record)
            if ann.iscrowd:
                stats["crowd"] += 1
                continue
            stats["instances"] += 1
            stats["occluded"] += ann.occluded
            stats["amodal"] += ann.amodal
            stats["polygons"] += len(record["segmentation"])
            per_category[ann.category] += 1
    coco = {
        "info": {
            "description": f"seglab embedded sample: procedurally generated scenes in COCO 2017 format "
                           f"({split}, seed {seed}, sides {min_side}-{max_side})",
            "url": "",
            "version": GENERATOR_VERSION,
            "contributor": "seglab.data.sample",
        },
        "licenses": [{"id": 1, "name": "Apache-2.0 (generated by seglab)", "url": "https://www.apache.org/licenses/LICENSE-2.0"}],
        "images": images,
        "annotations": annotations,
        "categories": [{"supercategory": sup, "id": cid, "name": name} for cid, name, sup in COCO_CATEGORIES],
    }
    summary = {"images": count, **{k: int(stats[k]) for k in ("instances", "crowd", "occluded", "amodal", "polygons", "greyscale")},
               "per_category": {name: int(per_category[name]) for name in SAMPLE_CATEGORIES}}
    return coco, summary


def generate_sample(
    out_dir: str | Path,
    *,
    train_images: int = 120,
    val_images: int = 40,
    min_side: int = 160,
    max_side: int = 320,
    crowd_fraction: float = 0.15,
    seed: int = 0,
    amodal_fraction: float = 0.1,
    greyscale_fraction: float = 0.05,
) -> dict:
    """Write the embedded sample dataset to `out_dir` in COCO 2017 layout; return summary counts.

    Layout: `train2017/*.jpg`, `val2017/*.jpg`, `annotations/instances_{train2017,val2017}.json`.
    The folder is replaced as a whole (`atomic_dir`): a failure leaves the previous one intact.
    `crowd_fraction` of the images (at least one per split when > 0) get a crowd region;
    `amodal_fraction` of the occluded instances are outlined in full; `greyscale_fraction` of
    the images are single-channel, like COCO's few greyscale photos.
    """
    problems = []
    for name, value in (("train_images", train_images), ("val_images", val_images)):
        if not isinstance(value, (int, np.integer)) or not 1 <= value < _IDS_PER_SPLIT:
            problems.append(f"{name} must be an integer in [1, {_IDS_PER_SPLIT - 1}], got {value!r}")
    if not isinstance(min_side, (int, np.integer)) or min_side < 32:
        problems.append(f"min_side must be an integer >= 32, got {min_side!r}")
    if not isinstance(max_side, (int, np.integer)) or max_side < min_side:
        problems.append(f"max_side must be an integer >= min_side ({min_side!r}), got {max_side!r}")
    for name, value in (("crowd_fraction", crowd_fraction), ("amodal_fraction", amodal_fraction),
                        ("greyscale_fraction", greyscale_fraction)):
        if not 0.0 <= float(value) <= 1.0:
            problems.append(f"{name} must be in [0, 1], got {value!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        problems.append(f"seed must be a non-negative integer, got {seed!r}")
    if problems:
        raise ValueError("generate_sample: " + "; ".join(problems))

    out_dir = Path(out_dir)
    summary: dict = {"out": str(out_dir), "seed": int(seed), "generator_version": GENERATOR_VERSION, "splits": {}}
    with atomic_dir(out_dir) as tmp:
        (tmp / "annotations").mkdir()
        for split_index, (split, count) in enumerate(zip(SPLITS, (train_images, val_images))):
            coco, split_summary = _generate_split(
                tmp, split, split_index, int(count), min_side=int(min_side), max_side=int(max_side),
                crowd_fraction=float(crowd_fraction), amodal_fraction=float(amodal_fraction),
                greyscale_fraction=float(greyscale_fraction), seed=int(seed),
            )
            (tmp / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco, separators=(",", ":")))
            summary["splits"][split] = split_summary
    return summary


def run_sample(cfg) -> dict:
    """The `sample` stage: `generate_sample` with `cfg.sample.*` and `cfg.seed`."""
    s = cfg.sample
    return generate_sample(s.out, train_images=s.train_images, val_images=s.val_images, min_side=s.min_side,
                           max_side=s.max_side, crowd_fraction=s.crowd_fraction, amodal_fraction=s.amodal_fraction,
                           greyscale_fraction=s.greyscale_fraction, seed=cfg.seed)
