"""Tiny Parquet shards for the GAN tests: shapes of known classes on textured backgrounds."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from seglab.data.classes import ClassSet
from seglab.data.coco import LabelRules, encode_png
from seglab.data.shards import shard_metadata, write_shards

CLASSES = ("background", "cat", "dog")
_COLOURS = np.array([[90, 90, 90], [220, 40, 40], [40, 200, 60]], np.uint8)


def _pair(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    label = np.zeros((height, width), np.uint8)
    for value in (1, 2):  # one rectangle per class, an ignore rim around the second
        h, w = rng.integers(height // 4, height // 2), rng.integers(width // 4, width // 2)
        y, x = rng.integers(0, height - h), rng.integers(0, width - w)
        if value == 2:
            label[max(0, y - 1):y + h + 1, max(0, x - 1):x + w + 1] = 255
        label[y:y + h, x:x + w] = value
    image = _COLOURS[np.where(label == 255, 0, label)].astype(np.int16)
    image += rng.integers(-20, 21, image.shape, dtype=np.int16)
    return np.clip(image, 0, 255).astype(np.uint8), label


def write_tiny_shards(shard_dir: Path, *, images: int = 24, seed: int = 0, classes=CLASSES) -> Path:
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(images):
        image, label = _pair(rng, 24, 32)
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=95)
        counts = np.bincount(label.ravel(), minlength=256)
        rows.append({
            "image_id": index + 1, "file_name": f"{index + 1:06d}.jpg", "split": "train", "source": "gan-test",
            "height": 24, "width": 32, "orig_height": 24, "orig_width": 32,
            "image": buffer.getvalue(), "label": encode_png(label),
            "class_pixels": [int(c) for c in counts[:len(classes)]], "ignore_pixels": int(counts[255]),
        })
    class_set = ClassSet("custom", tuple(classes), tuple(range(len(classes))))
    write_shards(rows, shard_dir / "train", shard_metadata(class_set, "train", LabelRules()), 16.0)
    return shard_dir


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    return write_tiny_shards(tmp_path_factory.mktemp("gan_shards") / "shards")


@pytest.fixture(scope="session")
def make_tiny_shards():
    """`write_tiny_shards(shard_dir, images=..., seed=..., classes=...)` for tests that need their own."""
    return write_tiny_shards
