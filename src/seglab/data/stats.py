"""Pixel counts per label value over a split, from the shards' `class_pixels` / `ignore_pixels` columns.

The segmenters start their classifier at the class prior and weigh their loss by median-frequency
class weights (`seglab.train.plan`), the GAN generators their label logits
(`seglab.gan.common.label_prior`): all count here, without decoding a single label map.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from seglab.data.shards import read_classes, read_split, shard_files

__all__ = ["PixelCounts", "median_frequency_weights", "pixel_counts"]


@dataclass(frozen=True)
class PixelCounts:
    """Labelled pixels per class (index = label value) and ignore (255) pixels over some images."""

    classes: np.ndarray  # int64, one entry per class, background included
    ignore: int
    images: int
    # int64, per class: the labelled pixels of the images that class occurs in (ignore pixels not
    # counted), the denominator of its median-frequency "frequency"
    in_images_with: np.ndarray


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
    in_images_with = np.zeros(num_classes, np.int64)
    ignore = images = 0
    for folder in folders:
        table = read_split(folder, split, columns=["class_pixels", "ignore_pixels"])
        per_image = _per_image(table.column("class_pixels"), num_classes)
        counts += per_image.sum(axis=0)
        in_images_with += ((per_image > 0) * per_image.sum(axis=1, keepdims=True)).sum(axis=0)
        ignore += int(np.sum(table.column("ignore_pixels").to_numpy(), dtype=np.int64))
        images += table.num_rows
    return PixelCounts(counts, ignore, images, in_images_with)


def _per_image(class_pixels: pa.ChunkedArray, num_classes: int) -> np.ndarray:
    """The rows' `class_pixels` lists as an (images, num_classes) int64 matrix, longer lists cut."""
    lists = class_pixels.combine_chunks()
    lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False).astype(np.int64)
    values = pc.list_flatten(lists).to_numpy(zero_copy_only=False).astype(np.int64)
    rows = np.repeat(np.arange(len(lists)), lengths)
    position = np.arange(len(values)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    kept = position < num_classes
    matrix = np.zeros((len(lists), num_classes), np.int64)
    matrix[rows[kept], position[kept]] = values[kept]
    return matrix


def median_frequency_weights(counts: PixelCounts) -> np.ndarray:
    """Median-frequency class weights (Eigen & Fergus 2015; SegNet's on CamVid), float64 per class.

    freq(c) = pixels of c / labelled pixels of the images c occurs in; weight(c) = median of freq over
    the classes that occur / freq(c): rare classes weigh more, a class at the median weighs 1.
    Ignore pixels count nowhere. A class with no pixel in `counts` has no frequency: it is left out
    of the median and weighs 0 (no training pixel of it to weigh; SegNet weighs void so).
    """
    present = counts.classes > 0
    if not present.any():
        raise ValueError(f"no labelled pixel in {counts.images} images: no class frequency to weigh classes by")
    frequency = counts.classes[present] / counts.in_images_with[present]
    weights = np.zeros(counts.classes.size, np.float64)
    weights[present] = np.median(frequency) / frequency
    return weights
