"""Objects in an image: a shape family placed, rasterised, shadowed and painted onto the canvas."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from seglab.data.sample.shapes import FAMILIES
from seglab.data.sample.textures import Paint


@dataclass
class Shape:
    """One object placed in an image: its parts rasterised into a part-index map over its crop."""

    category: str
    paints: list[Paint]
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


def place_shape(rng, category: str, height: int, width: int, centre, size: float) -> Shape | None:
    """Build, normalise, transform and rasterise one object; None if it falls outside the image."""
    family = FAMILIES[category]
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
    return Shape(
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


def _paste_max(buf: np.ndarray, src: np.ndarray, oy: int, ox: int) -> None:
    """Write `src` into `buf` at offset (oy, ox), clipped to `buf` (keeps the larger value)."""
    sy0, sx0 = max(0, -oy), max(0, -ox)
    dy0, dx0 = max(0, oy), max(0, ox)
    hgt = min(src.shape[0] - sy0, buf.shape[0] - dy0)
    wid = min(src.shape[1] - sx0, buf.shape[1] - dx0)
    if hgt > 0 and wid > 0:
        np.maximum(buf[dy0:dy0 + hgt, dx0:dx0 + wid], src[sy0:sy0 + hgt, sx0:sx0 + wid],
                   out=buf[dy0:dy0 + hgt, dx0:dx0 + wid])


@dataclass(frozen=True)
class Light:
    direction: np.ndarray   # unit vector in image coordinates, pointing where shadows fall
    shadow: float           # 0 = overcast, no shadows


def cast_shadow(canvas: np.ndarray, shape: Shape, light: Light) -> None:
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


def paint_shape(canvas: np.ndarray, shape: Shape, light: Light) -> None:
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
