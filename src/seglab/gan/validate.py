"""The `validate_synthetic` stage: a Great Expectations gate between a GAN's output and training.

A synthetic (image, label map) pair only reaches a segmenter after passing two GX suites, run
through Checkpoints whose `UpdateDataDocsAction` renders HTML Data Docs into
`data/reports/synthetic/<gan>/` next to a `summary.json`:

1. `seglab_synthetic_images`, on the per-image profile (`synthetic_profile`, one row per sample).
   A sample breaking any of these rules is excluded; the others go on (counted per rule):

       decodable                 decode_error is null (image and label payloads decode)
       finite                    non_finite_pixels == 0 (no NaN/inf; JPEGs cannot hold them, raw
                                 float arrays given to `validate_samples` can)
       value_min, value_max      pixel_min >= 0 and pixel_max <= 255
       not_constant              pixel_std >= min_std (all black, all grey, ...)
       rgb                       image_channels == 3
       image_height, image_width the expected size (`image_size`; unset: the batch's most common size)
       label_height, label_width the label map is as large as the image
       labels_in_class_set       invalid_label_pixels == 0: every value < num_classes or 255 (ignore)
       labelled_area             labelled_share >= min_labelled_share (share of pixels of a class > 0,
                                 not 255): a label map of only background/ignore teaches nothing

2. `seglab_synthetic_batch`, on a one-row frame of figures computed over the samples that passed
   (1), against the real training images. A broken rule rejects the whole batch: a generator
   that collapsed or drifted away from the data is not trusted for any of its samples.

       enough_images             at least `min_images` samples passed (1); fewer are too few to judge
       computed:<figure>         each figure below could be computed (not null)
       diversity                 mean pairwise distance >= diversity_min (mode collapse)
       channel_mean:<c>          |mean_c(synthetic) - mean_c(real)| <= mean_tol, c in r, g, b
       channel_std:<c>           |std_c(synthetic) - std_c(real)| <= std_tol
       kid                       KID mean <= kid_max

   summary.json's `rejected_by_rule` counts the samples each rule rejected (a sample can break
   several); `batch:<rule>` counts those a broken batch rule took down with the batch.

Definitions. Every image, real or synthetic alike, is centre-cropped to a square, brought to
`resolution`² (the synthetic images' own size unless set: a generator working at 64 px is judged
against real images seen at 64 px, so KID measures content rather than the resolution gap), then
resized to `feature_size`² (default 224, MobileNetV2's native input); PIL bilinear, antialiased.
The batch figures use that form:

- diversity: mean over all pairs (i < j) of the RMS pixel difference between the two images at
  `diversity_size`² (default 64), pixels scaled to [0, 1]. 0 for n copies of one image; 0.24 on
  the embedded sample's images, 0.35 on coco-mini's (the real training value is reported beside it).
- channel mean/std: over all pixels of all images, per RGB channel, in [0, 255] units.
- KID (Bińkowski et al. 2018, "Demystifying MMD GANs"): the unbiased MMD² between the two sets of
  features with the kernel k(x, y) = (xᵀy / d + 1)³, averaged over `kid_subsets` random subsets
  of `min(kid_subset_size, n_synthetic, n_real)` samples from each set (drawn without
  replacement, seeded); reported as mean ± std over the subsets. Features: the 1280-d global
  average pool of the offline-ImageNet MobileNetV2 classifier (`imagenet_classifier
  ("mobilenetv2")`'s `avg_pool` layer, the input of its logits), standing in for Inception's pool3.

Accepted samples are written to `<out>/train/part-*.parquet` with the synthetic shards' own
schema and metadata (plus `seglab.synthetic_validation`), one output file per input file that
kept any row. `<out>/validation.json` always records the decision; when nothing is accepted no
shard is written and `<out>/NONE_ACCEPTED` says why. Training asks `accepted_synthetic_shards`,
which returns None (and logs "training on real data only") in that case.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from seglab.atomic import atomic_dir, write_text_atomic
from seglab.data.classes import IGNORE_INDEX
from seglab.data.shards import SHARD_SCHEMA, ShardWriter, decode_rgb, read_classes, shard_files
from seglab.data.synthetic import NONE_ACCEPTED, VALIDATION_FILE, accepted_synthetic_shards  # noqa: F401 (re-exported)
from seglab.data.validate import _DATA_DOCS_SITE, _ephemeral_context, _summarise_result

if TYPE_CHECKING:
    from seglab.config import Config

log = logging.getLogger(__name__)

IMAGE_SUITE = "seglab_synthetic_images"
BATCH_SUITE = "seglab_synthetic_batch"
GENERATOR_FIELDS = (pa.field("generator", pa.string()), pa.field("generator_seed", pa.int64()))
CHANNELS = ("r", "g", "b")
# Identify a sample in GX results (the same keys seglab.data.validate reports rows by).
ROW_KEYS = ("shard_split", "image_id", "file_name", "shard_file", "shard_row")
PROFILE_COLUMNS = ROW_KEYS + (
    "image_height", "image_width", "image_channels",
    "label_height", "label_width",
    "non_finite_pixels", "pixel_min", "pixel_max", "pixel_std",
    "invalid_label_pixels", "labelled_share",
    "decode_error",
)
BATCH_FIGURES = ("diversity", *(f"channel_mean_delta_{c}" for c in CHANNELS),
                 *(f"channel_std_delta_{c}" for c in CHANNELS), "kid_mean")
DEFAULT_VALID = Path("data/synthetic_valid")
DEFAULT_REPORT = Path("data/reports/synthetic")
MAX_SAMPLES_IN_SUMMARY = 100


@dataclass(frozen=True)
class SyntheticChecks:
    """Thresholds of the two suites and how the batch figures are computed (see the module docstring).

    Calibration (feature_size 224, resolution 64, val images as the "synthetic" batch against the
    train reference; KID mean over 100 subsets), embedded sample (120/40) | coco-mini voc20 (158/133):

        real val                          KID -0.000 | -0.002   diversity 0.25 | 0.35
        val + N(0, 2) noise at 64 px          0.036 |  0.033
        val + N(0, 4)                         0.074 |  0.093
        val + N(0, 8)                         0.109 |  0.159
        val blurred (Gaussian, 1 px)          0.058 |  0.092
        val at half resolution                0.099 |  0.108
        3 images repeated                     0.233 |  0.366   diversity 0.19 | 0.21
        1 image repeated                      0.446 |  0.676   diversity 0
        uniform noise                         0.840 |  1.108   diversity 0.21 (passes: KID catches it)
        black                                 0.829 |  1.111

    So kid_max 0.15 accepts real images with mild degradations and refuses every collapsed or
    garbage batch. Real-vs-real channel means/stds differ by <= 6.3 / 4.8 (sample) and 2.5 / 1.5
    (coco-mini); mean_tol 30 / std_tol 20 leave room for a GAN's colour drift while refusing
    the collapsed batches (43 / 25 off). Real images have pixel std >= 15.9 (sample), 28.2 (coco-mini).
    min_labelled_share refuses label maps with (almost) nothing labelled: every sample image has
    >= 0.99% labelled pixels, while 26 of coco-mini's 158 voc20 train images have none (such
    background-only layouts are real, but as synthetic samples they teach no class).
    """

    image_size: int | tuple[int, int] | None = None  # expected (height, width) or side; None: the batch's most
    #                                                 common size (a stray size is still caught)
    resolution: int | None = None        # side both sets are compared at; None: min(expected size)
    min_std: float = 5.0                 # per-image pixel std, [0, 255] units
    min_labelled_share: float = 0.005    # share of pixels labelled with a class > 0 (sample's real: >= 0.0099)
    min_images: int = 8                  # samples that must pass the per-image rules for a verdict
    diversity_min: float = 0.1           # mean pairwise RMS distance, pixels in [0, 1] (real: 0.24-0.35)
    diversity_size: int = 64
    mean_tol: float = 30.0               # |channel mean difference|, [0, 255] units
    std_tol: float = 20.0                # |channel std difference|, [0, 255] units
    kid_max: float = 0.15
    kid_subsets: int = 100
    kid_subset_size: int = 100           # Bińkowski et al. use 1000 of >= 10k; 100 keeps a spread at ~100-500 images
    feature_size: int = 224
    reference_images: int = 500          # real training images used as the reference (seeded subset)
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.image_size is not None:
            size = (self.image_size,) * 2 if isinstance(self.image_size, (int, np.integer)) else tuple(self.image_size)
            if len(size) == 2 and all(isinstance(s, (int, np.integer)) and s >= 1 for s in size):
                object.__setattr__(self, "image_size", (int(size[0]), int(size[1])))
            else:
                problems.append(f"image_size must be a side, (height, width) or None, got {self.image_size!r}")
        for name in ("min_std", "mean_tol", "std_tol", "kid_max", "diversity_min"):
            if not float(getattr(self, name)) >= 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.min_labelled_share <= 1:
            problems.append(f"min_labelled_share must be in [0, 1], got {self.min_labelled_share!r}")
        if self.resolution is not None and int(self.resolution) < 4:
            problems.append(f"resolution must be >= 4 or None, got {self.resolution!r}")
        for name, low in (("min_images", 2), ("kid_subsets", 1), ("kid_subset_size", 2), ("feature_size", 32),
                          ("diversity_size", 4), ("reference_images", 2)):
            if int(getattr(self, name)) < low:
                problems.append(f"{name} must be >= {low}, got {getattr(self, name)!r}")
        if problems:
            raise ValueError("validate_synthetic settings: " + "; ".join(problems))


def resolve_checks(checks: SyntheticChecks, images: Sequence[Any]) -> SyntheticChecks:
    """Fill what `checks` leaves to the data: the expected size (the batch's most common (H, W))
    and the comparison resolution (the expected size's smaller side)."""
    image_size = checks.image_size
    if image_size is None:
        sizes = Counter(tuple(np.shape(im)[:2]) for im in images if im is not None and np.ndim(im) in (2, 3))
        # Ties go to the larger size, so the choice does not depend on sample order.
        image_size = max(sizes.items(), key=lambda kv: (kv[1], kv[0]))[0] if sizes else None
    resolution = checks.resolution
    if resolution is None and image_size is not None:
        resolution = min(image_size)
    return replace(checks, image_size=image_size, resolution=resolution)


# ---- per-image profile -------------------------------------------------------------------------

def _image_stats(image: Any) -> dict:
    array = np.asarray(image)
    if array.ndim not in (2, 3) or array.dtype.kind not in "uif" or array.size == 0:
        raise ValueError(f"expected an (H, W[, C]) numeric image, got shape {array.shape} dtype {array.dtype}")
    values = array.astype(np.float64, copy=False)
    finite = np.isfinite(values)
    stats = {"image_height": array.shape[0], "image_width": array.shape[1],
             "image_channels": array.shape[2] if array.ndim == 3 else 1,
             "non_finite_pixels": int(values.size - finite.sum()),
             "pixel_min": None, "pixel_max": None, "pixel_std": None}
    if finite.any():
        kept = values[finite]
        stats.update(pixel_min=float(kept.min()), pixel_max=float(kept.max()), pixel_std=float(kept.std()))
    return stats


def _label_stats(label: Any, num_classes: int) -> dict:
    values = np.asarray(label)
    if values.ndim != 2 or values.dtype.kind not in "ui":
        raise ValueError(f"expected a single-channel integer label map, got shape {values.shape} dtype {values.dtype}")
    values = values.astype(np.int64, copy=False)
    in_set = ((values >= 0) & (values < num_classes)) | (values == IGNORE_INDEX)
    labelled = (values > 0) & (values < num_classes) & (values != IGNORE_INDEX)
    return {"label_height": values.shape[0], "label_width": values.shape[1],
            "invalid_label_pixels": int(values.size - in_set.sum()),
            "labelled_share": float(labelled.mean()) if values.size else 0.0}


def _array_keys(count: int) -> list[dict]:
    return [{"shard_split": "train", "image_id": i, "file_name": f"sample-{i:05d}", "shard_file": "<arrays>",
             "shard_row": i} for i in range(count)]


def synthetic_profile(
    images: Sequence[Any],
    labels: Sequence[Any],
    *,
    num_classes: int,
    keys: Sequence[dict] | None = None,
    decode_errors: Sequence[str | None] | None = None,
) -> pd.DataFrame:
    """One row per sample (`PROFILE_COLUMNS`): what the per-image rules check.

    `images`: (H, W, 3) arrays, uint8 or float in [0, 255] (floats may hold NaN, which is
    reported); `labels`: (H, W) integer class maps. A None image/label, or an array of the
    wrong kind, becomes `decode_error` with the reason. `keys` identify each sample
    (`ROW_KEYS`; default: its index); `decode_errors` carries failures from decoding shards.
    """
    if len(images) != len(labels):
        raise ValueError(f"synthetic_profile: {len(images)} images but {len(labels)} labels")
    if num_classes < 1 or num_classes > IGNORE_INDEX:
        raise ValueError(f"num_classes must be in [1, {IGNORE_INDEX}], got {num_classes}")
    keys = list(keys) if keys is not None else _array_keys(len(images))
    rows = []
    for i, (image, label) in enumerate(zip(images, labels)):
        row: dict[str, Any] = dict.fromkeys(PROFILE_COLUMNS)
        row.update({k: keys[i][k] for k in ROW_KEYS})
        errors = [decode_errors[i]] if decode_errors is not None and decode_errors[i] else []
        for name, payload, stats in (("image", image, _image_stats),
                                     ("label", label, lambda v: _label_stats(v, num_classes))):
            if payload is None:
                if not errors:
                    errors.append(f"{name} missing")
                continue
            try:
                row.update(stats(payload))
            except ValueError as e:
                errors.append(f"{name}: {e}")
        row["decode_error"] = "; ".join(errors) or None
        rows.append(row)
    frame = pd.DataFrame(rows, columns=list(PROFILE_COLUMNS))
    # Integer columns stay nullable integers (a failed decode leaves them null).
    for column in ("image_height", "image_width", "image_channels", "label_height", "label_width",
                   "non_finite_pixels", "invalid_label_pixels", "image_id", "shard_row"):
        frame[column] = frame[column].astype("Int64")
    return frame


# ---- image features and batch figures ----------------------------------------------------------

def square_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop to a square, resize to size x size (bilinear, antialiased): float32 (size, size, 3)."""
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    array = np.nan_to_num(array.astype(np.float32), nan=0.0, posinf=255.0, neginf=0.0)
    height, width = array.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    crop = np.clip(array[top:top + side, left:left + side, :3], 0, 255)
    # float32 arrays open in PIL's float mode "F": no uint8 rounding before the resize.
    channels = [np.asarray(Image.fromarray(np.ascontiguousarray(crop[..., c]))
                           .resize((size, size), Image.Resampling.BILINEAR)) for c in range(3)]
    return np.stack(channels, axis=-1)


def compare_form(image: np.ndarray, resolution: int | None, feature_size: int) -> np.ndarray:
    """The form batch figures see: square crop, at `resolution` (None: as is), resized to `feature_size`."""
    if resolution is not None:
        image = np.clip(square_resize(image, resolution), 0, 255)
    return square_resize(image, feature_size)


@lru_cache(maxsize=1)
def _feature_model():
    import keras

    from seglab.models.classifier import imagenet_classifier

    classifier, _ = imagenet_classifier("mobilenetv2", weights="imagenet-offline")
    # The pooled 1280-d vector feeding the logits: the analogue of Inception's pool3 features.
    return keras.Model(classifier.input, classifier.get_layer("avg_pool").output, name="mobilenetv2_kid_features")


def mobilenetv2_features(images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """(N, S, S, 3) float RGB in [0, 255] -> (N, 1280) float64 offline-ImageNet MobileNetV2 pooled features."""
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) images, got shape {images.shape}")
    if len(images) == 0:
        return np.zeros((0, 1280))
    # predict runs a compiled function: ~10x faster than eager calls on CPU.
    return _feature_model().predict(images, batch_size=batch_size, verbose=0).astype(np.float64)


def polynomial_mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² between samples x (m, d) and y (n, d) with k(a, b) = (aᵀb / d + 1)³."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"expected two (n, d) feature arrays with the same d, got {x.shape} and {y.shape}")
    m, n, d = len(x), len(y), x.shape[1]
    if m < 2 or n < 2:
        raise ValueError(f"the unbiased MMD² needs >= 2 samples per set, got {m} and {n}")
    return _mmd2_from_kernels((x @ x.T / d + 1.0) ** 3, (y @ y.T / d + 1.0) ** 3, (x @ y.T / d + 1.0) ** 3)


def _mmd2_from_kernels(k_xx: np.ndarray, k_yy: np.ndarray, k_xy: np.ndarray) -> float:
    m, n = len(k_xx), len(k_yy)
    # The unbiased estimator leaves out each sample's kernel with itself (the diagonals).
    return float((k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
                 + (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
                 - 2.0 * k_xy.mean())


def kernel_inception_distance(
    features_a: np.ndarray, features_b: np.ndarray, *, subsets: int = 100, subset_size: int = 1000, seed: int = 0,
) -> tuple[float, float]:
    """KID as mean ± std of the unbiased polynomial MMD² over `subsets` random subsets (Bińkowski et al. 2018).

    Each subset draws min(subset_size, len(a), len(b)) samples from each set without replacement.
    """
    features_a, features_b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    size = min(subset_size, len(features_a), len(features_b))
    if size < 2:
        raise ValueError(f"KID needs >= 2 samples in each set, got {len(features_a)} and {len(features_b)}")
    if features_a.ndim != 2 or features_b.ndim != 2 or features_a.shape[1] != features_b.shape[1]:
        raise ValueError(f"expected two (n, d) feature arrays with the same d, got {features_a.shape} and "
                         f"{features_b.shape}")
    d = features_a.shape[1]
    # Kernels of all pairs once; each subset's estimate then only indexes them.
    k_aa = (features_a @ features_a.T / d + 1.0) ** 3
    k_bb = (features_b @ features_b.T / d + 1.0) ** 3
    k_ab = (features_a @ features_b.T / d + 1.0) ** 3
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        i = rng.choice(len(features_a), size, replace=False)
        j = rng.choice(len(features_b), size, replace=False)
        values.append(_mmd2_from_kernels(k_aa[np.ix_(i, i)], k_bb[np.ix_(j, j)], k_ab[np.ix_(i, j)]))
    return float(np.mean(values)), float(np.std(values))


def mean_pairwise_distance(images: np.ndarray, size: int = 64) -> float:
    """Mean over pairs of the RMS difference of two images at size x size, pixels in [0, 1]."""
    images = np.asarray(images)
    if len(images) < 2:
        raise ValueError(f"a pairwise distance needs >= 2 images, got {len(images)}")
    if images.shape[1:3] != (size, size):
        images = np.stack([square_resize(im, size) for im in images])
    flat = images.reshape(len(images), -1).astype(np.float64) / 255.0
    squared_norms = (flat ** 2).sum(axis=1)
    squared = np.maximum(squared_norms[:, None] + squared_norms[None, :] - 2.0 * flat @ flat.T, 0.0)
    upper = np.triu_indices(len(flat), k=1)
    return float(np.sqrt(squared[upper] / flat.shape[1]).mean())


@dataclass(frozen=True)
class RealReference:
    """What synthetic batches are compared with: figures of the real training images."""

    features: np.ndarray = field(repr=False)  # (n, 1280) MobileNetV2 pooled features
    channel_mean: tuple[float, float, float]
    channel_std: tuple[float, float, float]
    diversity: float
    images: int
    resolution: int | None
    feature_size: int
    source: str = "<arrays>"


def _channel_stats(square_images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    pixels = square_images.reshape(-1, 3).astype(np.float64)
    return tuple(float(v) for v in pixels.mean(axis=0)), tuple(float(v) for v in pixels.std(axis=0))


def real_reference(images: Sequence[np.ndarray], *, resolution: int | None, feature_size: int = 224,
                   diversity_size: int = 64, source: str = "<arrays>") -> RealReference:
    """Features, channel statistics and diversity of real (H, W, 3) uint8 images seen at `resolution`."""
    if len(images) < 2:
        raise ValueError(f"the real reference needs >= 2 images, got {len(images)} ({source})")
    squares = np.stack([compare_form(im, resolution, feature_size) for im in images])
    mean, std = _channel_stats(squares)
    return RealReference(mobilenetv2_features(squares), mean, std, mean_pairwise_distance(squares, diversity_size),
                         len(squares), resolution, feature_size, source)


def real_reference_from_shards(shard_dir: str | Path, split: str = "train", *, resolution: int | None,
                               max_images: int = 500, feature_size: int = 224, diversity_size: int = 64,
                               seed: int = 0) -> RealReference:
    """`real_reference` of a shard split: all images, or a seeded subset of `max_images`."""
    table = pa.concat_tables(pq.read_table(f, columns=["image"]) for f in shard_files(shard_dir, split))
    rows = np.arange(table.num_rows)
    if len(rows) > max_images:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_images, replace=False))
    payloads = table.column("image")
    images = [decode_rgb(payloads[int(i)].as_py()) for i in rows]
    return real_reference(images, resolution=resolution, feature_size=feature_size, diversity_size=diversity_size,
                          source=f"{Path(shard_dir) / split} ({len(images)} of {table.num_rows} images)")


def batch_figures(images: Sequence[np.ndarray], reference: RealReference, checks: SyntheticChecks) -> dict:
    """The batch rules' figures for `images` (those that passed the per-image rules); null where
    too few images exist to compute one."""
    figures: dict[str, Any] = {"images": len(images), **dict.fromkeys(BATCH_FIGURES), "kid_std": None}
    if not images:
        return figures
    if (reference.resolution, reference.feature_size) != (checks.resolution, checks.feature_size):
        raise ValueError(f"the real reference was computed at resolution {reference.resolution}, feature_size "
                         f"{reference.feature_size}; the checks ask for {checks.resolution}, {checks.feature_size}")
    squares = np.stack([compare_form(im, checks.resolution, checks.feature_size) for im in images])
    mean, std = _channel_stats(squares)
    for c, channel in enumerate(CHANNELS):
        figures[f"channel_mean_delta_{channel}"] = mean[c] - reference.channel_mean[c]
        figures[f"channel_std_delta_{channel}"] = std[c] - reference.channel_std[c]
    if len(images) >= 2:
        figures["diversity"] = mean_pairwise_distance(squares, checks.diversity_size)
        figures["kid_mean"], figures["kid_std"] = kernel_inception_distance(
            mobilenetv2_features(squares), reference.features, subsets=checks.kid_subsets,
            subset_size=checks.kid_subset_size, seed=checks.seed)
    return figures


# ---- the suites --------------------------------------------------------------------------------

def _rule(expectation, name: str, description: str):
    expectation.description = description
    expectation.meta = {"rule": name}
    return expectation


def build_image_suite(checks: SyntheticChecks, num_classes: int):
    """`seglab_synthetic_images`: the per-image rules (module docstring) on a `synthetic_profile`."""
    import great_expectations as gx

    E = gx.expectations
    rules = [
        _rule(E.ExpectColumnValuesToBeNull(column="decode_error"), "decodable", "image and label decode"),
        _rule(E.ExpectColumnValuesToBeBetween(column="non_finite_pixels", min_value=0, max_value=0),
              "finite", "no NaN or infinite pixel value"),
        _rule(E.ExpectColumnValuesToBeBetween(column="pixel_min", min_value=0), "value_min",
              "pixel values are >= 0"),
        _rule(E.ExpectColumnValuesToBeBetween(column="pixel_max", max_value=255), "value_max",
              "pixel values are <= 255"),
        _rule(E.ExpectColumnValuesToBeBetween(column="pixel_std", min_value=checks.min_std), "not_constant",
              f"the image is not constant (pixel std >= {checks.min_std})"),
        _rule(E.ExpectColumnValuesToBeInSet(column="image_channels", value_set=[3]), "rgb", "the image is RGB"),
        _rule(E.ExpectColumnPairValuesToBeEqual(column_A="label_height", column_B="image_height"), "label_height",
              "the label map's height equals the image's"),
        _rule(E.ExpectColumnPairValuesToBeEqual(column_A="label_width", column_B="image_width"), "label_width",
              "the label map's width equals the image's"),
        _rule(E.ExpectColumnValuesToBeBetween(column="invalid_label_pixels", min_value=0, max_value=0),
              "labels_in_class_set", f"every label value is a class (< {num_classes}) or {IGNORE_INDEX} (ignore)"),
        _rule(E.ExpectColumnValuesToBeBetween(column="labelled_share", min_value=checks.min_labelled_share),
              "labelled_area", f"at least {checks.min_labelled_share:.1%} of the pixels carry a class > 0"),
    ]
    if checks.image_size is not None:
        height, width = checks.image_size
        rules += [
            _rule(E.ExpectColumnValuesToBeInSet(column="image_height", value_set=[height]), "image_height",
                  f"the image is {height} px high"),
            _rule(E.ExpectColumnValuesToBeInSet(column="image_width", value_set=[width]), "image_width",
                  f"the image is {width} px wide"),
        ]
    return gx.ExpectationSuite(name=IMAGE_SUITE, expectations=rules)


def build_batch_suite(checks: SyntheticChecks):
    """`seglab_synthetic_batch`: the per-batch rules (module docstring) on the one-row figures frame."""
    import great_expectations as gx

    E = gx.expectations
    rules = [_rule(E.ExpectColumnValuesToBeBetween(column="images", min_value=checks.min_images), "enough_images",
                   f"at least {checks.min_images} samples passed the per-image rules")]
    # A null figure would be skipped by the range rules below, so its absence is a rule of its own.
    rules += [_rule(E.ExpectColumnValuesToNotBeNull(column=f), f"computed:{f}", f"{f} could be computed")
              for f in BATCH_FIGURES]
    rules.append(_rule(E.ExpectColumnValuesToBeBetween(column="diversity", min_value=checks.diversity_min),
                       "diversity", f"mean pairwise distance >= {checks.diversity_min} (no mode collapse)"))
    for channel in CHANNELS:
        rules.append(_rule(E.ExpectColumnValuesToBeBetween(column=f"channel_mean_delta_{channel}",
                                                           min_value=-checks.mean_tol, max_value=checks.mean_tol),
                           f"channel_mean:{channel}", f"{channel} mean within {checks.mean_tol} of the real images'"))
        rules.append(_rule(E.ExpectColumnValuesToBeBetween(column=f"channel_std_delta_{channel}",
                                                           min_value=-checks.std_tol, max_value=checks.std_tol),
                           f"channel_std:{channel}", f"{channel} std within {checks.std_tol} of the real images'"))
    rules.append(_rule(E.ExpectColumnValuesToBeBetween(column="kid_mean", max_value=checks.kid_max), "kid",
                       f"KID to the real images <= {checks.kid_max}"))
    return gx.ExpectationSuite(name=BATCH_SUITE, expectations=rules)


def _run_checkpoint(context, name: str, suite, frame: pd.DataFrame, index_columns: list[str] | None):
    import great_expectations as gx

    suite = context.suites.add(suite)
    batch = context.data_sources.add_pandas(f"{name}_source").add_dataframe_asset(name) \
        .add_batch_definition_whole_dataframe(f"{name}_all")
    definition = context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
    result_format: dict[str, Any] = {"result_format": "COMPLETE"}
    if index_columns:
        result_format["unexpected_index_column_names"] = index_columns
    checkpoint = context.checkpoints.add(gx.Checkpoint(
        name=name, validation_definitions=[definition], result_format=result_format,
        actions=[gx.checkpoint.UpdateDataDocsAction(name="update_data_docs", site_names=[_DATA_DOCS_SITE])]))
    outcome = checkpoint.run(batch_parameters={"dataframe": frame})
    (validation,) = outcome.run_results.values()
    order = {e.meta["rule"]: i for i, e in enumerate(suite.expectations)}
    return validation, order


def _rejected_rows(validation, profile: pd.DataFrame) -> dict[str, set[int]]:
    """rule -> profile positions GX found unexpected (an expectation that raised rejects every row)."""
    position = {(row.shard_file, int(row.shard_row)): i for i, row in enumerate(profile.itertuples())}
    rejected: dict[str, set[int]] = {}
    for result in validation.results:
        rule = result.expectation_config.meta["rule"]
        if result.success:
            continue
        d = result.to_json_dict()
        if (d.get("exception_info") or {}).get("raised_exception"):
            rejected[rule] = set(range(len(profile)))
            continue
        rows = set()
        for entry in (d.get("result") or {}).get("unexpected_index_list") or []:
            rows.add(position[(entry["shard_file"], int(entry["shard_row"]))])
        rejected[rule] = rows
    return rejected


@dataclass
class SyntheticValidation:
    """The outcome: which samples were accepted and the summary written to the report folder."""

    accepted: np.ndarray  # bool per sample
    summary: dict


def validate_samples(
    images: Sequence[Any],
    labels: Sequence[Any],
    *,
    reference: RealReference,
    num_classes: int,
    report_dir: str | Path,
    checks: SyntheticChecks = SyntheticChecks(),
    keys: Sequence[dict] | None = None,
    decode_errors: Sequence[str | None] | None = None,
    extra_summary: dict | None = None,
) -> SyntheticValidation:
    """Run both suites over (image, label) samples; write Data Docs + summary.json to `report_dir`
    (atomically). Per-image failures exclude those samples; a failed batch rule rejects them all.
    Never raises for bad samples: the verdict is in the result (and the report)."""
    started = time.perf_counter()
    report_dir = Path(report_dir)
    checks = resolve_checks(checks, images)
    if len(images) and (reference.resolution, reference.feature_size) != (checks.resolution, checks.feature_size):
        raise ValueError(f"the real reference was computed at resolution {reference.resolution}, feature_size "
                         f"{reference.feature_size}; this batch is compared at {checks.resolution}, "
                         f"{checks.feature_size} (build it with real_reference(resolution=...))")
    profile = synthetic_profile(images, labels, num_classes=num_classes, keys=keys, decode_errors=decode_errors)
    with atomic_dir(report_dir) as tmp:
        context = _ephemeral_context(tmp)
        image_validation, image_order = _run_checkpoint(context, "validate_synthetic_images",
                                                        build_image_suite(checks, num_classes), profile,
                                                        list(ROW_KEYS))
        rejected_by_rule = _rejected_rows(image_validation, profile)
        failed_image = set().union(*rejected_by_rule.values()) if rejected_by_rule else set()
        passed = [i for i in range(len(profile)) if i not in failed_image]
        figures = batch_figures([np.asarray(images[i]) for i in passed], reference, checks)
        batch_validation, batch_order = _run_checkpoint(context, "validate_synthetic_batch",
                                                        build_batch_suite(checks), pd.DataFrame([figures]), None)
        batch_ok = bool(batch_validation.success)
        accepted = np.zeros(len(profile), bool)
        if batch_ok:
            accepted[passed] = True

        image_entries = sorted((_summarise_result(r) for r in image_validation.results),
                               key=lambda e: image_order.get(e["rule"], 1e9))
        batch_entries = sorted((_summarise_result(r) for r in batch_validation.results),
                               key=lambda e: batch_order.get(e["rule"], 1e9))
        counts = {rule: len(rows) for rule, rows in rejected_by_rule.items() if rows}
        if not batch_ok and passed:
            for entry in batch_entries:
                if not entry["success"]:
                    counts[f"batch:{entry['rule']}"] = len(passed)
        rejected_samples = [
            {**{k: _plain(profile.iloc[i][k]) for k in ROW_KEYS},
             "rules": sorted(r for r, rows in rejected_by_rule.items() if i in rows)}
            for i in sorted(failed_image)][:MAX_SAMPLES_IN_SUMMARY]
        n_accepted = int(accepted.sum())
        summary = {
            "success": n_accepted > 0,
            "decision": _decision(n_accepted, len(profile), len(passed), batch_entries, checks.min_images),
            "suites": [IMAGE_SUITE, BATCH_SUITE],
            "images": len(profile),
            "accepted": n_accepted,
            "rejected": len(profile) - n_accepted,
            "rejected_per_image": len(failed_image),
            "rejected_by_batch": 0 if batch_ok else len(passed),
            "rejected_by_rule": dict(sorted(counts.items())),
            "batch_success": batch_ok,
            "batch": {k: _plain(v) for k, v in figures.items()},
            "real": {"source": reference.source, "images": reference.images,
                     "channel_mean": list(reference.channel_mean), "channel_std": list(reference.channel_std),
                     "diversity": reference.diversity},
            "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(checks).items()},
            "num_classes": num_classes,
            "features": "offline-ImageNet MobileNetV2 avg_pool (1280-d) of images centre-cropped to a square, "
                        f"brought to {checks.resolution} px, resized to {checks.feature_size} px",
            "data_docs": "index.html",
            "rejected_samples": rejected_samples,
            "rejected_samples_total": len(failed_image),
            "expectations": {"images": image_entries, "batch": batch_entries},
            **(extra_summary or {}),
        }
        if not (tmp / "index.html").is_file():
            raise RuntimeError(f"GX did not build the Data Docs index in {tmp}")
        write_text_atomic(tmp / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    log.info("validated %d synthetic samples in %.1fs: %s", len(profile), time.perf_counter() - started,
             summary["decision"])
    return SyntheticValidation(accepted, summary)


def _plain(value: Any) -> Any:
    """JSON-friendly scalars (numpy/pandas types -> Python; NA/NaN -> None)."""
    if value is None or value is pd.NA:
        return None
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if not np.isfinite(value) else float(value)
    return value


def _decision(accepted: int, images: int, passed: int, batch_entries: list[dict], min_images: int) -> str:
    if accepted:
        return f"accepted {accepted} of {images} synthetic samples"
    if images == 0:
        return "no synthetic samples to validate: training on real data only"
    if passed < min_images:
        return (f"all {images} synthetic samples rejected: {passed} passed the per-image rules, fewer than "
                f"min_images={min_images}: training on real data only")
    broken = ", ".join(e["rule"] for e in batch_entries if not e["success"])
    return (f"all {images} synthetic samples rejected: the batch of {passed} that passed the per-image rules "
            f"broke {broken}: training on real data only")


# ---- shards in, shards out ---------------------------------------------------------------------

def _check_synthetic_schema(path: Path, schema: pa.Schema, classes: list[str]) -> None:
    expected = {f.name: f.type for f in [*SHARD_SCHEMA, *GENERATOR_FIELDS]}
    actual = {f.name: f.type for f in schema}
    problems = [f"missing column {n!r}" for n in expected if n not in actual]
    problems += [f"{n} is {actual[n]}, expected {t}" for n, t in expected.items() if n in actual and actual[n] != t]
    if problems:
        raise ValueError(f"{path}: not a synthetic shard ({'; '.join(problems)}); expected the SHARD_SCHEMA "
                         "columns plus generator (string) and generator_seed (int64)")
    file_classes = read_classes(path)
    if file_classes != classes:
        raise ValueError(f"{path}: seglab.classes {file_classes} differ from the real training shards' {classes}; "
                         "synthetic labels must use the real class mapping")


def _decode_synthetic(table: pa.Table) -> tuple[list, list, list[str | None]]:
    images, labels, errors = [], [], []
    for image_bytes, label_bytes in zip(table.column("image").to_pylist(), table.column("label").to_pylist()):
        image = label = None
        problems = []
        try:
            with Image.open(io.BytesIO(image_bytes)) as im:
                image = np.asarray(im)  # as stored: a greyscale JPEG stays (H, W), caught by `rgb`
        except Exception as e:  # PIL raises several types for corrupt data
            problems.append(f"image: {type(e).__name__}: {e}")
        try:
            with Image.open(io.BytesIO(label_bytes)) as lm:
                label = np.asarray(lm)
        except Exception as e:
            problems.append(f"label: {type(e).__name__}: {e}")
        images.append(image)
        labels.append(label)
        errors.append("; ".join(problems) or None)
    return images, labels, errors


def _sizes_from_synthesis(checks: SyntheticChecks, synthetic_dir: Path) -> tuple[SyntheticChecks, str]:
    """Unset sizes from `synthesize.json` beside the shards: the written size is the expected one, the
    generator's own (`gan_image_size`) the comparison resolution."""
    path = synthetic_dir / "synthesize.json"
    if (checks.image_size is not None and checks.resolution is not None) or not path.is_file():
        return checks, "settings" if checks.image_size is not None else "the batch's most common size"
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    for key in ("image_size", "gan_image_size"):
        value = info.get(key) if isinstance(info, dict) else None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{path}: {key!r} must be a positive integer, got {value!r}")
    image_size = checks.image_size or (info["image_size"], info["image_size"])
    resolution = checks.resolution or min(info["gan_image_size"], *image_size)
    return replace(checks, image_size=image_size, resolution=resolution), str(path)


def _digest(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(path.name.encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def validate_synthetic(
    synthetic_dir: str | Path,
    real_dir: str | Path,
    out_dir: str | Path,
    report_dir: str | Path,
    *,
    gan: str,
    checks: SyntheticChecks = SyntheticChecks(),
    split: str = "train",
    reference: RealReference | None = None,
) -> dict:
    """`<synthetic_dir>/<split>/part-*.parquet` -> accepted samples in `<out_dir>/<split>/`, the verdict in
    `<out_dir>/validation.json` (+ `NONE_ACCEPTED` when none passed), Data Docs + summary.json in `report_dir`.

    Sizes `checks` leaves unset come from `<synthetic_dir>/synthesize.json` when present (`image_size`:
    the expected size; `gan_image_size`, the generator's own: the comparison resolution), else
    from the batch (`resolve_checks`); summary.json's `sizes_from` says which.
    Contract errors raise (missing shards, wrong schema, a class list other than the real shards');
    bad samples never do: they are rejected and counted.
    """
    synthetic_dir, real_dir, out_dir = Path(synthetic_dir), Path(real_dir), Path(out_dir)
    files = shard_files(synthetic_dir, split)
    real_files = shard_files(real_dir, split)
    classes = read_classes(real_files[0])
    tables = []
    for path in files:
        parquet = pq.ParquetFile(path)
        _check_synthetic_schema(path, parquet.schema_arrow, classes)
        tables.append(parquet.read())
    keys, images, labels, errors = [], [], [], []
    for path, table in zip(files, tables):
        file_images, file_labels, file_errors = _decode_synthetic(table)
        images += file_images
        labels += file_labels
        errors += file_errors
        for row, (image_id, file_name) in enumerate(zip(table.column("image_id").to_pylist(),
                                                        table.column("file_name").to_pylist())):
            keys.append({"shard_split": split, "image_id": image_id, "file_name": file_name,
                         "shard_file": path.relative_to(synthetic_dir).as_posix(), "shard_row": row})
    generators = sorted({g for t in tables for g in t.column("generator").to_pylist()})
    seeds = sorted({s for t in tables for s in t.column("generator_seed").to_pylist()})
    checks, sizes_from = _sizes_from_synthesis(checks, synthetic_dir)
    checks = resolve_checks(checks, images)
    if reference is None:
        reference = real_reference_from_shards(real_dir, split, resolution=checks.resolution,
                                               max_images=checks.reference_images,
                                               feature_size=checks.feature_size,
                                               diversity_size=checks.diversity_size, seed=checks.seed)
    synthetic_digest, real_digest = _digest(files), _digest(real_files)
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(checks).items()}
    params_hash = hashlib.sha256(json.dumps({"settings": settings, "synthetic": synthetic_digest,
                                             "real": real_digest}, sort_keys=True).encode()).hexdigest()[:16]
    validation = validate_samples(
        images, labels, reference=reference, num_classes=len(classes), report_dir=report_dir, checks=checks,
        keys=keys, decode_errors=errors,
        extra_summary={"gan": gan, "generator": generators, "generator_seed": seeds, "params_hash": params_hash,
                       "sizes_from": sizes_from,
                       "validated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "synthetic_dir": str(synthetic_dir), "synthetic_digest": synthetic_digest,
                       "real_dir": str(real_dir), "real_digest": real_digest, "out_dir": str(out_dir)})
    summary = validation.summary
    _write_accepted(tables, validation.accepted, out_dir, split, summary, report_dir)
    level = logging.INFO if summary["accepted"] else logging.WARNING
    log.log(level, "validate_synthetic@%s: %s (report %s)", gan, summary["decision"], Path(report_dir) / "index.html")
    return summary


def _write_accepted(tables: list[pa.Table], accepted: np.ndarray, out_dir: Path, split: str, summary: dict,
                    report_dir: str | Path) -> None:
    verdict = {k: summary[k] for k in ("gan", "generator", "generator_seed", "params_hash", "validated_at",
                                       "success", "decision", "images", "accepted", "rejected",
                                       "rejected_by_rule")}
    verdict["report"] = str(Path(report_dir) / "summary.json")
    with atomic_dir(out_dir) as tmp:
        # One output part per input file that kept a row: the generator's sharding as it was.
        writer = ShardWriter(tmp / split, tables[0].schema.metadata or {}, schema=tables[0].schema,
                             max_shard_mb=math.inf)
        start = 0
        for table in tables:
            keep = accepted[start:start + table.num_rows]
            start += table.num_rows
            for row in table.filter(pa.array(keep)).to_pylist():
                writer.add(row)
            writer.end_part({**(table.schema.metadata or {}),
                             b"seglab.synthetic_validation": json.dumps(verdict, default=str).encode()})
        written = len(writer.files)
        verdict["files"] = written
        if not written:
            write_text_atomic(tmp / NONE_ACCEPTED, summary["decision"] + "\n")
        write_text_atomic(tmp / VALIDATION_FILE, json.dumps(verdict, indent=2, default=str) + "\n")


def checks_from_config(cfg: "Config") -> SyntheticChecks:
    """`SyntheticChecks` from params.yaml's `validate_synthetic` section (defaults where it has none)."""
    section = getattr(cfg, "validate_synthetic", None)
    values = section.model_dump() if section is not None else {}
    known = set(SyntheticChecks.__dataclass_fields__)
    settings = {k: v for k, v in values.items() if k in known}
    settings.setdefault("seed", cfg.seed)
    return replace(SyntheticChecks(), **settings)


def run_validate_synthetic(cfg: "Config", gan_name: str, *, checks: SyntheticChecks | None = None,
                           synthetic_root: str | Path | None = None, valid_root: str | Path | None = None,
                           report_root: str | Path | None = None) -> dict:
    """The `validate_synthetic@<gan>` stage: `data/synthetic/<gan>` -> `data/synthetic_valid/<gan>` +
    `data/reports/synthetic/<gan>/{index.html, summary.json}`, against the real `<shard.out>/train`.

    Folders: the arguments, else params (`gan.synthetic_out`, `validate_synthetic.out`,
    `validate_synthetic.report`) where those exist, else the defaults above. Sizes not set in
    params come from `synthesize.json` beside the synthetic shards (see `validate_synthetic`).
    """
    from seglab.gan.train import gan_paths

    section = getattr(cfg, "validate_synthetic", None)
    synthetic_root = synthetic_root or gan_paths(cfg)["synthetic_out"]
    valid_root = valid_root or getattr(section, "out", None) or DEFAULT_VALID
    report_root = report_root or getattr(section, "report", None) or DEFAULT_REPORT
    checks = checks or checks_from_config(cfg)
    return validate_synthetic(Path(synthetic_root) / gan_name, cfg.shard.out, Path(valid_root) / gan_name,
                              Path(report_root) / gan_name, gan=gan_name, checks=checks)
