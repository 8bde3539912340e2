"""Real-vs-real calibration of the synthetic gate's batch thresholds.

A hand-picked KID bound means one thing at 64 px on 64 images and another on a thousand photos at
224 px. So a threshold set to `auto` is a multiple of how far *real* images the generator never saw
stray from the training reference, judged exactly as a synthetic batch is (same compare form, same
reference, same KID subset size, channel figures over batches of the same size). The held-out
images are the `calibration_split` (val) of the real shards; with q = `calibration_quantile`:

    kid_max  = kid_real_multiple     x quantile_q(per-subset MMD² of held-out vs reference features)
    mean_tol = channel_real_multiple x quantile_q(max over r, g, b of |mean_c(batch) - mean_c(reference)|)
    std_tol  = channel_real_multiple x quantile_q(max over r, g, b of |std_c(batch) - std_c(reference)|)

The KID subsets have one size m = min(kid_subset_size, reference images, half the held-out images),
fixed by the data and not by the batch, and the synthetic batch is then measured at subsets of m
(or all of it, if smaller; KID is unbiased, so the subset size moves its spread, not its mean).
Half: with subsets of all held-out images every subset holds the same ones, and the quantile would
see only the reference's half of the sampling noise. Fixed: the per-subset spread shrinks about as
1/m, so a size taken from the batch made the bound stricter the more images passed the per-image
rules (docs/synthetic-validation.md). Each quantile is taken over `calibration_batches` draws:
KID subsets, and for the channel figures bootstrap batches (held-out images drawn with
replacement) as large as the synthetic batch being judged, so a small batch gets the wider
tolerance its own sampling noise needs. The worst channel is taken per batch because a batch must
pass all three channel rules. Where held-out real images pass a rule with probability q, the
multiple is the room given to a generator for being worse than real; the values and how they were
chosen: docs/synthetic-validation.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from seglab.gan.figures import (
    RealReference,
    compare_form,
    kid_subset_values,
    mobilenetv2_features,
    real_images_from_shards,
)

if TYPE_CHECKING:
    from seglab.gan.checks import SyntheticChecks

__all__ = ["AUTO", "CALIBRATED_THRESHOLDS", "RealCalibration", "calibrate", "calibrated_kid_subset_size",
           "needs_calibration", "real_calibration", "real_calibration_from_shards"]

AUTO = "auto"
CALIBRATED_THRESHOLDS = ("kid_max", "mean_tol", "std_tol")


@dataclass(frozen=True)
class RealCalibration:
    """Held-out real images in the compare form: their features and per-image channel moments."""

    features: np.ndarray = field(repr=False)         # (n, 1280), as RealReference.features
    channel_moments: np.ndarray = field(repr=False)  # (n, 2, 3): per image, E[x] and E[x²] per channel
    images: int
    resolution: int | None
    feature_size: int
    source: str = "<arrays>"


def real_calibration(images: Sequence[np.ndarray], *, resolution: int | None, feature_size: int = 224,
                     source: str = "<arrays>") -> RealCalibration:
    """`RealCalibration` of held-out real (H, W, 3) images seen at `resolution`."""
    if len(images) < 2:
        raise ValueError(f"calibration needs >= 2 held-out real images, got {len(images)} ({source})")
    squares = np.stack([compare_form(im, resolution, feature_size) for im in images]).astype(np.float64)
    pixels = squares.reshape(len(squares), -1, 3)
    moments = np.stack([pixels.mean(axis=1), (pixels ** 2).mean(axis=1)], axis=1)
    return RealCalibration(mobilenetv2_features(squares), moments, len(squares), resolution, feature_size, source)


def real_calibration_from_shards(shard_dir: str | Path, split: str, *, resolution: int | None, max_images: int = 500,
                                 feature_size: int = 224, seed: int = 0) -> RealCalibration:
    """`real_calibration` of a shard split (all images, or a seeded subset of `max_images`)."""
    images, source = real_images_from_shards(shard_dir, split, max_images=max_images, seed=seed)
    return real_calibration(images, resolution=resolution, feature_size=feature_size, source=source)


def needs_calibration(checks: SyntheticChecks) -> bool:
    return any(getattr(checks, name) == AUTO for name in CALIBRATED_THRESHOLDS)


def _bootstrap_channel_deltas(calibration: RealCalibration, reference: RealReference, batch_size: int, batches: int,
                              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per bootstrap batch, the worst channel's |mean delta| and |std delta| against the reference."""
    draws = rng.integers(0, calibration.images, size=(batches, batch_size))
    # Every image has the same pixel count in the compare form, so pooled moments are means of moments.
    pooled = calibration.channel_moments[draws].mean(axis=1)  # (batches, 2, 3)
    mean = pooled[:, 0]
    std = np.sqrt(np.maximum(pooled[:, 1] - mean ** 2, 0.0))
    mean_delta = np.abs(mean - np.asarray(reference.channel_mean)).max(axis=1)
    std_delta = np.abs(std - np.asarray(reference.channel_std)).max(axis=1)
    return mean_delta, std_delta


def calibrate(checks: SyntheticChecks, calibration: RealCalibration | None, reference: RealReference,
              batch_size: int) -> tuple[SyntheticChecks, dict]:
    """`checks` with every `auto` threshold replaced by its calibrated number for a synthetic batch of
    `batch_size` images (and, with kid_max calibrated, `kid_subset_size` by the m it was calibrated at),
    and the record of it (real-vs-real figures, rule, thresholds) for the report."""
    auto = [name for name in CALIBRATED_THRESHOLDS if getattr(checks, name) == AUTO]
    fixed = {name: getattr(checks, name) for name in CALIBRATED_THRESHOLDS if name not in auto}
    if not auto:
        return checks, {"calibrated": [], "thresholds": fixed}
    if calibration is None:
        raise ValueError(f"{', '.join(auto)} set to {AUTO!r} need real held-out images to calibrate on "
                         "(validate_synthetic.calibration_split); pass a RealCalibration or set numbers")
    if (calibration.resolution, calibration.feature_size) != (reference.resolution, reference.feature_size):
        raise ValueError(f"the calibration images were seen at resolution {calibration.resolution}, feature_size "
                         f"{calibration.feature_size}; the reference at {reference.resolution}, "
                         f"{reference.feature_size}")
    q = checks.calibration_quantile
    batch_size = max(int(batch_size), 2)
    subset_size = calibrated_kid_subset_size(checks, reference, calibration)
    # A tail quantile needs far more draws than the synthetic batch's mean does (docs/synthetic-validation.md).
    kid = kid_subset_values(calibration.features, reference.features, subsets=checks.calibration_batches,
                            subset_size=subset_size, seed=checks.seed)
    mean_delta, std_delta = _bootstrap_channel_deltas(calibration, reference, batch_size,
                                                      checks.calibration_batches, np.random.default_rng(checks.seed))
    real = {"kid": float(np.quantile(kid, q)), "mean_tol": float(np.quantile(mean_delta, q)),
            "std_tol": float(np.quantile(std_delta, q))}
    computed = {"kid_max": checks.kid_real_multiple * real["kid"],
                "mean_tol": checks.channel_real_multiple * real["mean_tol"],
                "std_tol": checks.channel_real_multiple * real["std_tol"]}
    thresholds = {**fixed, **{name: computed[name] for name in auto}}
    # The synthetic batch is measured as the held-out images were: subsets of the same size.
    applied = {**thresholds, **({"kid_subset_size": subset_size} if "kid_max" in auto else {})}
    record = {
        "calibrated": auto,
        "source": calibration.source,
        "held_out_images": calibration.images,
        "reference_images": reference.images,
        "batch_size": batch_size,
        "quantile": q,
        "real_vs_real": {
            "kid_subset_size": subset_size,
            "kid_subsets": int(len(kid)),
            "kid_mean": float(kid.mean()),
            "kid_std": float(kid.std()),
            "kid_quantile": real["kid"],
            "bootstrap_batches": checks.calibration_batches,
            "channel_mean_delta_quantile": real["mean_tol"],
            "channel_std_delta_quantile": real["std_tol"],
        },
        "rule": {name: rule for name, rule in {
            "kid_max": f"{checks.kid_real_multiple:g} x q{q:g} of the held-out images' per-subset KID "
                       f"({len(kid)} subsets of {subset_size})",
            "mean_tol": f"{checks.channel_real_multiple:g} x q{q:g} of the worst channel's |mean delta| over "
                        f"{checks.calibration_batches} held-out batches of {batch_size}",
            "std_tol": f"{checks.channel_real_multiple:g} x q{q:g} of the worst channel's |std delta| over "
                       f"{checks.calibration_batches} held-out batches of {batch_size}",
        }.items() if name in auto},
        "thresholds": thresholds,
    }
    return checks.model_copy(update=applied), record


def calibrated_kid_subset_size(checks: SyntheticChecks, reference: RealReference, calibration: RealCalibration) -> int:
    """m = min(kid_subset_size, reference images, half the held-out images), at least 2 (module docstring)."""
    return max(2, min(checks.kid_subset_size, reference.images, calibration.images // 2))
