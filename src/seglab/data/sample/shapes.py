"""The eight sample categories as shape families: parts in an object's own frame, and their paints.

Each builder draws its random choices from the given Generator in a fixed order: reordering them
changes every image after the first object (the sample's `GENERATOR_VERSION` must then change).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from seglab.data.sample.textures import Paint, grain, hsv, jitter, pick, spots, tabby

# Shape primitives, in an object's local frame (x right, y down; normalised later)

Part = tuple[str, np.ndarray, bool]  # (paint role, polygon points (N, 2), subtract?)


def ellipse(cx, cy, rx, ry, angle: float = 0.0, n: int = 36) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x, y = rx * np.cos(t), ry * np.sin(t)
    c, s = math.cos(angle), math.sin(angle)
    return np.stack([cx + c * x - s * y, cy + s * x + c * y], axis=1)


def rect(x0, y0, x1, y1) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def poly(*xy) -> np.ndarray:
    return np.array(xy, dtype=np.float64).reshape(-1, 2)


def capsule(p0, p1, width, n: int = 8) -> np.ndarray:
    """A thick segment with round caps: limbs, tails, tubes."""
    p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
    d = p1 - p0
    ang = math.atan2(d[1], d[0])
    r = width / 2
    cap1 = [p1 + r * np.array([math.cos(a), math.sin(a)]) for a in np.linspace(ang - np.pi / 2, ang + np.pi / 2, n)]
    cap0 = [p0 + r * np.array([math.cos(a), math.sin(a)]) for a in np.linspace(ang + np.pi / 2, ang + 3 * np.pi / 2, n)]
    return np.array(cap1 + cap0)


def round_rect(x0, y0, x1, y1, r, n: int = 6) -> np.ndarray:
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
    parts: list[Part] = [
        ("trousers", capsule((-0.06, 0.15), (-0.03 - stance, 0.5), 0.09), False),
        ("trousers", capsule((0.06, 0.15), (0.03 + stance, 0.5), 0.09), False),
        ("shirt", poly(-0.15, -0.22, 0.15, -0.22, 0.12, 0.19, -0.12, 0.19), False),
        ("shirt", capsule((-0.135, -0.19), arm_l, 0.07), False),
        ("shirt", capsule((0.135, -0.19), arm_r, 0.07), False),
        ("skin", ellipse(arm_l[0], arm_l[1] + 0.02, 0.035, 0.04), False),
        ("skin", ellipse(arm_r[0], arm_r[1] + 0.02, 0.035, 0.04), False),
        ("skin", rect(-0.035, -0.28, 0.035, -0.2), False),
        ("skin", ellipse(0.0, -0.36, 0.085, 0.105), False),
        ("hair", ellipse(0.0, -0.405, 0.092, 0.07 + rng.uniform(0, 0.03)), False),
    ]
    paints = {
        "trousers": Paint(jitter(rng, pick(rng, _TROUSERS))),
        "shirt": Paint(hsv(rng.random(), rng.uniform(0.35, 0.9), rng.uniform(0.4, 0.95)), "folds",
                        params={"freq": rng.uniform(4, 8), "phase": rng.uniform(0, 2 * np.pi)}),
        "skin": Paint(jitter(rng, pick(rng, _SKIN), 0.08)),
        "hair": Paint(jitter(rng, pick(rng, _HAIR))),
    }
    return parts, paints


def _car(rng):
    body_h, cabin_h = rng.uniform(0.16, 0.22), rng.uniform(0.14, 0.2)
    back, front = rng.uniform(-0.36, -0.25), rng.uniform(0.18, 0.3)
    parts: list[Part] = [
        ("body", round_rect(-0.5, 0.0, 0.5, body_h, 0.05), False),
        ("body", poly(back, 0.01, front, 0.01, front - 0.13, -cabin_h, back + 0.08, -cabin_h), False),
        ("glass", poly(back + 0.05, -0.01, front - 0.05, -0.01, front - 0.15, -cabin_h + 0.03, back + 0.11, -cabin_h + 0.03), False),
        ("body", rect(-0.04, -cabin_h, -0.005, 0.0), False),
        ("light", rect(0.44, 0.03, 0.5, 0.07), False),
        ("taillight", rect(-0.5, 0.03, -0.46, 0.07), False),
    ]
    for x in (-0.3, 0.3):
        parts.append(("tyre", ellipse(x, body_h, 0.1, 0.1), False))
        parts.append(("hub", ellipse(x, body_h, 0.045, 0.045), False))
    body = jitter(rng, pick(rng, _CAR_BODY))
    paints = {
        "body": Paint(body, "gloss", params={"centre": rng.uniform(-0.3, 0.3), "width": 0.06}),
        "glass": Paint(jitter(rng, (45, 60, 75)), "gloss", params={"centre": rng.uniform(-0.2, 0.2), "width": 0.03}),
        "light": Paint(np.array([250, 240, 200], np.float32)),
        "taillight": Paint(np.array([200, 30, 30], np.float32)),
        "tyre": Paint(jitter(rng, (22, 22, 22))),
        "hub": Paint(jitter(rng, (165, 165, 170))),
    }
    return parts, paints


def _cat(rng):
    tail_up = rng.uniform(-0.35, -0.1)
    parts: list[Part] = [
        ("fur", capsule((-0.29, 0.03), (-0.42, -0.05), 0.05), False),
        ("fur", capsule((-0.42, -0.05), (-0.47, tail_up), 0.05), False),
        ("fur", ellipse(0.0, 0.05, 0.32, 0.15), False),
    ]
    for x in (-0.22, -0.14, 0.14, 0.22):
        parts.append(("fur", capsule((x, 0.1), (x + rng.uniform(-0.04, 0.04), 0.3), 0.06), False))
    parts += [
        ("fur", ellipse(0.33, -0.12, 0.12, 0.11), False),
        ("fur", poly(0.22, -0.15, 0.25, -0.32, 0.32, -0.2), False),
        ("fur", poly(0.35, -0.2, 0.42, -0.32, 0.45, -0.14), False),
        ("eye", ellipse(0.29, -0.13, 0.022, 0.016), False),
        ("eye", ellipse(0.38, -0.13, 0.022, 0.016), False),
        ("nose", poly(0.32, -0.08, 0.36, -0.08, 0.34, -0.05), False),
    ]
    fur = jitter(rng, pick(rng, _CAT_FUR))
    paints = {
        "fur": tabby(rng, fur) if rng.random() < 0.6 else Paint(fur),
        "eye": Paint(jitter(rng, (150, 190, 60))),
        "nose": Paint(jitter(rng, (220, 140, 150))),
    }
    return parts, paints


def _dog(rng):
    parts: list[Part] = [("fur", capsule((-0.3, -0.03), (-0.45, rng.uniform(-0.28, -0.1)), 0.05), False)]
    for x in (-0.24, -0.15, 0.15, 0.24):
        parts.append(("fur", capsule((x, 0.05), (x + rng.uniform(-0.05, 0.05), 0.33), 0.07), False))
    parts += [
        ("fur", ellipse(0.0, 0.0, 0.33, 0.14), False),
        ("fur", capsule((0.22, -0.02), (0.32, -0.15), 0.12), False),
        ("fur", ellipse(0.36, -0.2, 0.1, 0.09), False),
        ("fur", ellipse(0.47, -0.16, 0.08, 0.05), False),
        ("nose", ellipse(0.54, -0.17, 0.022, 0.02), False),
        ("ear", ellipse(0.31, -0.16, 0.04, 0.09, angle=rng.uniform(-0.4, 0.2)), False),
        ("eye", ellipse(0.4, -0.23, 0.015, 0.015), False),
    ]
    fur = jitter(rng, pick(rng, _DOG_FUR))
    patch = jitter(rng, pick(rng, _DOG_FUR))
    paints = {
        "fur": spots(rng, fur, patch) if rng.random() < 0.5 else Paint(fur),
        "ear": Paint(fur * 0.65),
        "nose": Paint(jitter(rng, (20, 18, 18))),
        "eye": Paint(jitter(rng, (30, 20, 10))),
    }
    return parts, paints


def _bird(rng):
    flying = rng.random() < 0.3
    parts: list[Part] = [("wing", poly(-0.25, 0.0, -0.5, -0.06, -0.48, 0.08), False)]
    if not flying:
        parts += [("leg", capsule((0.0, 0.12), (0.02, 0.28), 0.02), False),
                  ("leg", capsule((0.06, 0.12), (0.08, 0.28), 0.02), False)]
    parts += [
        ("plumage", ellipse(0.0, 0.0, 0.28, 0.15), False),
        ("plumage", ellipse(0.25, -0.12, 0.1, 0.1), False),
        ("beak", poly(0.33, -0.15, 0.45, -0.11, 0.33, -0.08), False),
        ("eye", ellipse(0.28, -0.14, 0.018, 0.018), False),
    ]
    if flying:
        parts.append(("wing", poly(-0.12, -0.05, 0.1, -0.06, -0.05, -0.45, -0.2, -0.4), False))
    else:
        parts.append(("wing", ellipse(-0.05, -0.02, 0.2, 0.08, angle=-0.2), False))
    plumage = jitter(rng, pick(rng, _PLUMAGE))
    paints = {
        "plumage": Paint(plumage),
        "wing": Paint(plumage * 0.6),
        "beak": Paint(jitter(rng, (240, 150, 30))),
        "eye": Paint(np.array([15, 15, 15], np.float32)),
        "leg": Paint(jitter(rng, (200, 150, 80))),
    }
    return parts, paints


def _bottle(rng):
    w = rng.uniform(0.1, 0.15)
    neck = w * rng.uniform(0.3, 0.45)
    shoulder = rng.uniform(-0.15, 0.0)
    parts: list[Part] = [
        ("glass", round_rect(-w, shoulder, w, 0.5, 0.02), False),
        ("glass", poly(-w, shoulder + 0.01, w, shoulder + 0.01, neck, -0.3, -neck, -0.3), False),
        ("glass", rect(-neck, -0.45, neck, -0.29), False),
        ("cap", rect(-neck * 1.15, -0.5, neck * 1.15, -0.44), False),
    ]
    if rng.random() < 0.8:
        parts.append(("label", rect(-w, 0.08, w, 0.3), False))
    paints = {
        "glass": Paint(jitter(rng, pick(rng, _BOTTLE_GLASS)), "gloss",
                        params={"centre": rng.uniform(-0.6, -0.2) * w, "width": 0.025}),
        "label": Paint(jitter(rng, pick(rng, _BOTTLE_LABEL))),
        "cap": Paint(jitter(rng, pick(rng, _BOTTLE_CAP))),
    }
    return parts, paints


def _chair(rng):
    parts: list[Part] = [
        ("frame", capsule((-0.18, 0.05), (-0.18, 0.42), 0.04), False),
        ("frame", capsule((0.18, 0.05), (0.18, 0.42), 0.04), False),
        ("frame", rect(-0.22, -0.5, 0.22, 0.0), False),
    ]
    if rng.random() < 0.6:  # a slatted back: the gaps show what is behind the chair
        slats = int(rng.integers(2, 4))
        edges = np.linspace(-0.17, 0.17, 2 * slats)
        for i in range(0, len(edges) - 1, 2):
            parts.append(("frame", rect(edges[i], -0.42, edges[i + 1], -0.08), True))
    parts += [
        ("seat", poly(-0.26, 0.0, 0.26, 0.0, 0.28, 0.07, -0.28, 0.07), False),
        ("frame", capsule((-0.25, 0.06), (-0.26, 0.5), 0.045), False),
        ("frame", capsule((0.25, 0.06), (0.26, 0.5), 0.045), False),
    ]
    if rng.random() < 0.65:
        wood = jitter(rng, pick(rng, _WOOD))
        paints = {"frame": grain(rng, wood, angle=np.pi / 2), "seat": grain(rng, wood * 1.08)}
    else:
        plastic = jitter(rng, pick(rng, _PLASTIC), 0.06)
        paints = {"frame": Paint(plastic), "seat": Paint(plastic * 0.9)}
    return parts, paints


def _bicycle(rng):
    rear, front, bracket = (-0.3, 0.12), (0.3, 0.12), (0.0, 0.12)
    seat, head = (-0.07, -0.15), (0.22, -0.15)
    parts: list[Part] = []
    for cx, cy in (rear, front):
        parts.append(("tyre", ellipse(cx, cy, 0.19, 0.19, n=48), False))
        parts.append(("tyre", ellipse(cx, cy, 0.155, 0.155, n=48), True))  # the wheel is see-through
        for a in np.linspace(0, np.pi, 3, endpoint=False) + rng.uniform(0, np.pi):
            d = 0.16 * np.array([math.cos(a), math.sin(a)])
            parts.append(("spoke", capsule((cx - d[0], cy - d[1]), (cx + d[0], cy + d[1]), 0.012, n=3), False))
        parts.append(("hub", ellipse(cx, cy, 0.03, 0.03), False))
    for a, b in ((rear, bracket), (bracket, seat), (seat, rear), (bracket, head), (seat, head), (head, front)):
        parts.append(("frame", capsule(a, b, 0.032), False))
    parts += [
        ("frame", capsule(seat, (seat[0] - 0.01, seat[1] - 0.04), 0.025), False),
        ("saddle", ellipse(seat[0] - 0.01, seat[1] - 0.05, 0.06, 0.02), False),
        ("bar", capsule(head, (0.2, -0.25), 0.025), False),
        ("bar", capsule((0.2, -0.25), (0.27, -0.26), 0.025), False),
    ]
    paints = {
        "tyre": Paint(jitter(rng, (25, 25, 25))),
        "spoke": Paint(jitter(rng, (185, 185, 190))),
        "hub": Paint(jitter(rng, (170, 170, 170))),
        "frame": Paint(hsv(rng.random(), rng.uniform(0.5, 1.0), rng.uniform(0.4, 0.95))),
        "saddle": Paint(jitter(rng, (30, 28, 28))),
        "bar": Paint(jitter(rng, (60, 60, 60))),
    }
    return parts, paints


@dataclass(frozen=True)
class Family:
    build: Callable
    size: tuple[float, float]   # largest extent, as a share of the image's shorter side (log-uniform)
    max_rotation: float         # degrees either way


FAMILIES: dict[str, Family] = {
    "person": Family(_person, (0.4, 0.95), 12),
    "car": Family(_car, (0.35, 0.9), 8),
    "cat": Family(_cat, (0.3, 0.7), 15),
    "dog": Family(_dog, (0.32, 0.8), 15),
    "bird": Family(_bird, (0.2, 0.5), 35),
    "bottle": Family(_bottle, (0.25, 0.65), 20),
    "chair": Family(_chair, (0.35, 0.8), 10),
    "bicycle": Family(_bicycle, (0.35, 0.85), 12),
}
