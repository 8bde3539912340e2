"""A tiny COCO-layout dataset built per test, so each bad input can be planted on purpose."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CATEGORIES = [
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 3, "name": "car", "supercategory": "vehicle"},
    {"id": 17, "name": "cat", "supercategory": "animal"},
    {"id": 18, "name": "dog", "supercategory": "animal"},
    {"id": 90, "name": "toothbrush", "supercategory": "indoor"},  # not in voc20
]


def square(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


class TinyCoco:
    """A COCO root with `train2017` and `val2017`; edit `.data[split]` then call `.write()`."""

    def __init__(self, root: Path):
        self.root = root
        self.data = {}
        rng = np.random.default_rng(0)
        for split, n in (("train2017", 3), ("val2017", 2)):
            (root / split).mkdir(parents=True, exist_ok=True)
            images, anns = [], []
            for i in range(n):
                image_id = (100 if split == "train2017" else 200) + i
                name = f"{image_id:012d}.jpg"
                Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(root / split / name, quality=90)
                images.append({"id": image_id, "file_name": name, "height": 40, "width": 60})
                anns.append({"id": image_id * 10, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                             "segmentation": square(5, 5, 25, 30), "area": 500.0, "bbox": [5, 5, 20, 25]})
                anns.append({"id": image_id * 10 + 1, "image_id": image_id, "category_id": 3, "iscrowd": 0,
                             "segmentation": square(35, 10, 55, 35), "area": 500.0, "bbox": [35, 10, 20, 25]})
            self.data[split] = {"images": images, "annotations": anns, "categories": list(CATEGORIES)}
        self.write()

    def write(self):
        (self.root / "annotations").mkdir(exist_ok=True)
        for split, d in self.data.items():
            (self.root / "annotations" / f"instances_{split}.json").write_text(json.dumps(d))
        return self

    def image_path(self, split: str, index: int = 0) -> Path:
        return self.root / split / self.data[split]["images"][index]["file_name"]


@pytest.fixture
def tiny_coco(tmp_path) -> TinyCoco:
    return TinyCoco(tmp_path / "coco")
