"""Procedural backgrounds (gradients, fractal noise, stripes, tiles, sky over ground) and unlabelled clutter."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from seglab.data.sample.textures import hsv, jitter, random_colour


def fractal_noise(rng, height: int, width: int, cells: int = 3, octaves: int = 4) -> np.ndarray:
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


def background(rng, height: int, width: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    c1, c2 = random_colour(rng), random_colour(rng)
    kind = _BACKGROUNDS[int(rng.integers(len(_BACKGROUNDS)))]
    angle = rng.uniform(0, 2 * np.pi)
    along = xx * math.cos(angle) + yy * math.sin(angle)
    across = -xx * math.sin(angle) + yy * math.cos(angle)
    if kind == "gradient":
        t = (along - along.min()) / max(float(np.ptp(along)), 1e-6)
        img = _mix(c1, c2, t)
    elif kind == "noise":
        img = _mix(c1, c2, fractal_noise(rng, height, width, cells=int(rng.integers(2, 6))))
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
        ridge = horizon - fractal_noise(rng, 1, width, cells=3)[0] * rng.uniform(0.0, 0.2) * height
        sky_top = hsv(rng.uniform(0.55, 0.65), rng.uniform(0.2, 0.6), rng.uniform(0.6, 0.95))
        sky = _mix(sky_top, np.minimum(sky_top * 1.25 + 20, 255), np.clip(yy / max(horizon, 1.0), 0, 1))
        g1, g2 = _GROUND[int(rng.integers(len(_GROUND)))]
        ground = _mix(jitter(rng, g1), jitter(rng, g2), fractal_noise(rng, height, width, cells=int(rng.integers(3, 8))))
        img = np.where((yy < ridge[None, :])[..., None], sky, ground)
    texture = fractal_noise(rng, height, width, cells=int(rng.integers(4, 16)), octaves=3) - 0.5
    return (img + texture[..., None] * rng.uniform(5, 30)).astype(np.float32)


def add_clutter(rng, canvas: np.ndarray) -> None:
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
        colour = random_colour(rng, sat=(0.0, 0.8), val=(0.15, 0.95))
        canvas[mask] = (colour[None, None, :] * shade[..., None] * np.ones((1, width, 1), np.float32))[mask]
