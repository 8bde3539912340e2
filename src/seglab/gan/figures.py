"""The figures a synthetic batch is judged by, against real images: diversity, channel statistics, KID.

Every image is first brought to one form (`compare_form`): centre-cropped to a square, at the
comparison resolution, resized to the feature size; the definitions are in seglab.gan.validate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from seglab.data.shards import decode_rgb, shard_files

if TYPE_CHECKING:
    from seglab.gan.checks import SyntheticChecks

__all__ = ["BATCH_FIGURES", "CHANNELS", "RealReference", "batch_figures", "compare_form", "kernel_inception_distance",
           "kid_subset_values", "knn_radii", "mean_pairwise_distance", "mobilenetv2_features", "pairwise_rms_distances",
           "polynomial_mmd2_unbiased", "real_images_from_shards", "real_reference", "real_reference_from_shards",
           "realism_scores", "square_resize"]

CHANNELS = ("r", "g", "b")
BATCH_FIGURES = ("diversity", *(f"channel_mean_delta_{c}" for c in CHANNELS),
                 *(f"channel_std_delta_{c}" for c in CHANNELS), "kid_mean")


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
    values = kid_subset_values(features_a, features_b, subsets=subsets, subset_size=subset_size, seed=seed)
    return float(np.mean(values)), float(np.std(values))


def kid_subset_values(
    features_a: np.ndarray, features_b: np.ndarray, *, subsets: int = 100, subset_size: int = 1000, seed: int = 0,
) -> np.ndarray:
    """The unbiased polynomial MMD² of each of `subsets` random subset pairs (KID is their mean)."""
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
    return np.asarray(values)


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances between the rows of a (m, d) and b (n, d): (m, n)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    squared = (a ** 2).sum(axis=1)[:, None] + (b ** 2).sum(axis=1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.maximum(squared, 0.0))


def knn_radii(features: np.ndarray, k: int) -> np.ndarray:
    """Per real feature (n, d), the distance to its k-th nearest other real feature: (n,)."""
    features = np.asarray(features, np.float64)
    if not 1 <= k < len(features):
        raise ValueError(f"k-NN radii need more real images than k={k}, got {len(features)}")
    distances = _distances(features, features)
    np.fill_diagonal(distances, np.inf)  # a feature is not its own neighbour
    return np.partition(distances, k - 1, axis=1)[:, k - 1]


def realism_scores(features: np.ndarray, real_features: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Realism score of each feature (m, d) against the real ones (n, d) and their k-NN `radii` (n,):
    max over real r of radius_r / |feature - real_r| (Kynkäänniemi et al. 2019, "Improved Precision and
    Recall Metric for Assessing Generative Models", with all real neighbourhoods kept). >= 1 exactly
    when the feature lies inside some real image's k-NN ball, their precision criterion."""
    features = np.asarray(features, np.float64)
    if len(features) == 0:
        return np.zeros(0)
    distances = _distances(features, real_features)
    return (np.asarray(radii, np.float64)[None, :] / np.maximum(distances, 1e-12)).max(axis=1)


def pairwise_rms_distances(images: np.ndarray, size: int = 64) -> np.ndarray:
    """(n, n) RMS difference of every two images at size x size, pixels in [0, 1] (the diagonal ~0: the Gram
    form leaves rounding of ~1e-8)."""
    images = np.asarray(images)
    if images.shape[1:3] != (size, size):
        images = np.stack([square_resize(im, size) for im in images])
    flat = images.reshape(len(images), -1).astype(np.float64) / 255.0
    return _distances(flat, flat) / np.sqrt(flat.shape[1])


def mean_pairwise_distance(images: np.ndarray, size: int = 64) -> float:
    """Mean over pairs of the RMS difference of two images at size x size, pixels in [0, 1]."""
    if len(images) < 2:
        raise ValueError(f"a pairwise distance needs >= 2 images, got {len(images)}")
    distances = pairwise_rms_distances(images, size)
    return float(distances[np.triu_indices(len(distances), k=1)].mean())


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
    # The RMS difference (as `diversity`'s) of the two closest real images: how near two distinct real
    # images come; the per-image `distinct` rule's unit (None: not computed).
    nearest_distance: float | None = None


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
    distances = pairwise_rms_distances(squares, diversity_size)
    pairs = distances[np.triu_indices(len(distances), k=1)]
    return RealReference(mobilenetv2_features(squares), mean, std, float(pairs.mean()), len(squares), resolution,
                         feature_size, source, nearest_distance=float(pairs.min()))


def real_images_from_shards(shard_dir: str | Path, split: str, *, max_images: int,
                            seed: int = 0) -> tuple[list[np.ndarray], str]:
    """The RGB images of a shard split (all, or a seeded subset of `max_images`) and a description."""
    table = pa.concat_tables(pq.read_table(f, columns=["image"]) for f in shard_files(shard_dir, split))
    rows = np.arange(table.num_rows)
    if len(rows) > max_images:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_images, replace=False))
    payloads = table.column("image")
    images = [decode_rgb(payloads[int(i)].as_py()) for i in rows]
    return images, f"{Path(shard_dir) / split} ({len(images)} of {table.num_rows} images)"


def real_reference_from_shards(shard_dir: str | Path, split: str = "train", *, resolution: int | None,
                               max_images: int = 500, feature_size: int = 224, diversity_size: int = 64,
                               seed: int = 0) -> RealReference:
    """`real_reference` of a shard split: all images, or a seeded subset of `max_images`."""
    images, source = real_images_from_shards(shard_dir, split, max_images=max_images, seed=seed)
    return real_reference(images, resolution=resolution, feature_size=feature_size, diversity_size=diversity_size,
                          source=source)


def batch_figures(images: Sequence[np.ndarray], reference: RealReference, checks: SyntheticChecks,
                  features: np.ndarray | None = None) -> dict:
    """The batch rules' figures for `images` (those that passed the per-image rules); null where
    too few images exist to compute one. `features`: their MobileNetV2 features when already
    computed (in `images`' order), else computed here."""
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
        features = mobilenetv2_features(squares) if features is None else np.asarray(features)
        if len(features) != len(images):
            raise ValueError(f"batch_figures: {len(features)} features for {len(images)} images")
        figures["kid_mean"], figures["kid_std"] = kernel_inception_distance(
            features, reference.features, subsets=checks.kid_subsets,
            subset_size=checks.kid_subset_size, seed=checks.seed)
    return figures
