"""Colours and textures: how each part of a sample object is painted."""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass, field

import numpy as np


def hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255.0


def random_colour(rng: np.random.Generator, sat=(0.1, 0.7), val=(0.3, 0.95)) -> np.ndarray:
    return hsv(rng.random(), rng.uniform(*sat), rng.uniform(*val))


def jitter(rng: np.random.Generator, rgb, amount: float = 0.12) -> np.ndarray:
    """A palette colour varied in brightness and slightly in hue, as lighting and dye vary."""
    rgb = np.asarray(rgb, dtype=np.float32)
    return np.clip(rgb * rng.uniform(1 - amount, 1 + amount) + rng.normal(0.0, 8.0, 3), 0, 255).astype(np.float32)


def pick(rng: np.random.Generator, palette) -> np.ndarray:
    return np.asarray(palette[int(rng.integers(len(palette)))], dtype=np.float32)


@dataclass
class Paint:
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


def tabby(rng, base) -> Paint:
    angle = rng.uniform(-0.4, 0.4)
    return Paint(base, "tabby", params={"freq": rng.uniform(9, 14), "cos": math.cos(angle), "sin": math.sin(angle),
                                         "phase": rng.uniform(0, 2 * np.pi)})


def spots(rng, base, second) -> Paint:
    waves = [(rng.uniform(-5, 5), rng.uniform(-5, 5), rng.uniform(0, 2 * np.pi)) for _ in range(3)]
    return Paint(base, "spots", second=second, params={"waves": waves})


def grain(rng, base, angle: float = 0.0) -> Paint:
    return Paint(base, "grain", params={"freq": rng.uniform(18, 30), "cos": math.cos(angle), "sin": math.sin(angle),
                                         "phase": rng.uniform(0, 2 * np.pi)})
