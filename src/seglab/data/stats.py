"""Pixel counts per label value over a split, from the shards' `class_pixels` / `ignore_pixels` columns.

The segmenters start their classifier at the class prior (`seglab.train.plan`) and the GAN
generators their label logits (`seglab.gan.common.label_prior`): both count here, without decoding
a single label map.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from seglab.data.shards import read_classes, read_split, shard_files

__all__ = ["PixelCounts", "pixel_counts"]


@dataclass(frozen=True)
class PixelCounts:
    """Labelled pixels per class (index = label value) and ignore (255) pixels over some images."""

    classes: np.ndarray  # int64, one entry per class, background included
    ignore: int
    images: int


def pixel_counts(shard_dirs: str | Path | Sequence[str | Path], split: str,
                 num_classes: int | None = None) -> PixelCounts:
    """Pixel counts over `split` of one shard folder or several (e.g. real and synthetic shards).

    `num_classes`: entries of `PixelCounts.classes` (a row's longer list is cut, a shorter one
    counts 0 for the rest); None: the split's class list, from the first folder's shards.
    """
    folders = [Path(shard_dirs)] if isinstance(shard_dirs, (str, Path)) else [Path(d) for d in shard_dirs]
    if num_classes is None:
        num_classes = len(read_classes(shard_files(folders[0], split)[0]))
    counts = np.zeros(num_classes, np.int64)
    ignore = images = 0
    for folder in folders:
        table = read_split(folder, split, columns=["class_pixels", "ignore_pixels"])
        for row in table.column("class_pixels").to_pylist():
            counts[: min(len(row), num_classes)] += np.asarray(row[:num_classes], np.int64)
        ignore += int(np.sum(table.column("ignore_pixels").to_numpy(), dtype=np.int64))
        images += table.num_rows
    return PixelCounts(counts, ignore, images)
