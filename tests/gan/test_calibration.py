"""The real-vs-real calibration rule of the synthetic gate (seglab.gan.calibration), on small arrays."""

from __future__ import annotations

import numpy as np
import pytest

from seglab.config import Config
from seglab.gan.calibration import RealCalibration, calibrate, needs_calibration
from seglab.gan.checks import SyntheticChecks, checks_from_config
from seglab.gan.figures import RealReference, kid_subset_values

AUTO = SyntheticChecks(image_size=(8, 8), kid_max="auto", mean_tol="auto", std_tol="auto", calibration_quantile=0.9,
                       kid_real_multiple=3.0, channel_real_multiple=2.0, calibration_batches=400, kid_subsets=50,
                       kid_subset_size=20, seed=0)


def _reference(features: np.ndarray, mean=(100.0, 100.0, 100.0), std=(50.0, 50.0, 50.0)) -> RealReference:
    return RealReference(features, tuple(mean), tuple(std), diversity=0.2, images=len(features), resolution=8,
                         feature_size=32)


def _calibration(features: np.ndarray, image_means: np.ndarray, image_stds: np.ndarray) -> RealCalibration:
    """Held-out images with the given per-image channel means and stds, (n, 3) each."""
    moments = np.stack([image_means, image_stds ** 2 + image_means ** 2], axis=1)
    return RealCalibration(features, moments, len(features), resolution=8, feature_size=32)


def test_kid_max_is_the_multiple_of_the_real_quantile():
    rng = np.random.default_rng(0)
    reference = _reference(rng.normal(size=(40, 16)))
    held_out = rng.normal(size=(30, 16))
    calibration = _calibration(held_out, np.full((30, 3), 100.0), np.full((30, 3), 50.0))
    checks, record = calibrate(AUTO, calibration, reference, batch_size=25)
    # The subset size: min(kid_subset_size 20, reference 40, half the held-out 30 = 15).
    values = kid_subset_values(held_out, reference.features, subsets=400, subset_size=15, seed=0)  # calibration_batches
    assert record["real_vs_real"]["kid_subset_size"] == 15
    assert checks.kid_max == pytest.approx(3.0 * np.quantile(values, 0.9))
    assert checks.kid_subset_size == 15  # the synthetic batch is measured at the same subset size
    assert record["thresholds"]["kid_max"] == checks.kid_max
    assert set(record["calibrated"]) == {"kid_max", "mean_tol", "std_tol"} and set(record["rule"]) == set(
        record["calibrated"])
    # Held-out images from another distribution than the reference widen the bound.
    shifted = _calibration(held_out + 1.0, np.full((30, 3), 100.0), np.full((30, 3), 50.0))
    assert calibrate(AUTO, shifted, reference, batch_size=25)[0].kid_max > 10 * checks.kid_max


def test_kid_max_does_not_depend_on_how_many_images_passed():
    # Taken from the batch, the subset size made the bound stricter the more samples passed the
    # per-image rules (per-subset spread ~ 1/m): a better filter then got a harder test.
    rng = np.random.default_rng(4)
    reference = _reference(rng.normal(size=(80, 16)))
    calibration = _calibration(rng.normal(size=(40, 16)), np.full((40, 3), 100.0), np.full((40, 3), 50.0))
    bounds = {n: calibrate(AUTO, calibration, reference, batch_size=n)[0] for n in (8, 20, 39)}
    assert len({checks.kid_max for checks in bounds.values()}) == 1
    assert {checks.kid_subset_size for checks in bounds.values()} == {20}  # min(20, 80, 40 // 2)
    # The subset size follows the data: fewer held-out images, smaller subsets, a wider bound.
    few = _calibration(rng.normal(size=(12, 16)), np.full((12, 3), 100.0), np.full((12, 3), 50.0))
    checks, record = calibrate(AUTO, few, reference, batch_size=39)
    assert checks.kid_subset_size == record["real_vs_real"]["kid_subset_size"] == 6
    assert "subsets of 6" in record["rule"]["kid_max"]
    # A fixed kid_max leaves the configured subset size alone.
    fixed, _ = calibrate(AUTO.model_copy(update={"kid_max": 0.2}), calibration, reference, batch_size=39)
    assert fixed.kid_subset_size == AUTO.kid_subset_size


def test_channel_tolerances_follow_the_held_out_offsets():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(10, 16))
    # Every held-out image 10 brighter in green, same spread: each batch is off by exactly that.
    means = np.tile([100.0, 110.0, 100.0], (10, 1))
    checks, record = calibrate(AUTO, _calibration(features, means, np.full((10, 3), 50.0)), _reference(features),
                               batch_size=12)
    assert checks.mean_tol == pytest.approx(2.0 * 10.0)
    assert checks.std_tol == pytest.approx(0.0, abs=1e-9)
    assert record["real_vs_real"]["channel_mean_delta_quantile"] == pytest.approx(10.0)


def test_small_batches_get_wider_channel_tolerances():
    rng = np.random.default_rng(2)
    features = rng.normal(size=(40, 16))
    means = np.repeat(rng.normal(100.0, 15.0, size=(40, 1)), 3, axis=1)  # held-out images vary in brightness
    calibration = _calibration(features, means, np.full((40, 3), 50.0))
    small, _ = calibrate(AUTO, calibration, _reference(features, mean=means.mean(axis=0)), batch_size=4)
    large, _ = calibrate(AUTO, calibration, _reference(features, mean=means.mean(axis=0)), batch_size=200)
    assert small.mean_tol > 3 * large.mean_tol > 0


def test_fixed_numbers_are_kept_and_auto_needs_held_out_images():
    rng = np.random.default_rng(3)
    features = rng.normal(size=(10, 16))
    calibration = _calibration(features, np.full((10, 3), 100.0), np.full((10, 3), 50.0))
    mixed = AUTO.model_copy(update={"kid_max": 0.2})
    checks, record = calibrate(mixed, calibration, _reference(features), batch_size=10)
    assert checks.kid_max == 0.2 and record["calibrated"] == ["mean_tol", "std_tol"]
    fixed = AUTO.model_copy(update={"kid_max": 0.2, "mean_tol": 30.0, "std_tol": 20.0})
    assert not needs_calibration(fixed)
    assert calibrate(fixed, None, _reference(features), batch_size=10) == (fixed, {
        "calibrated": [], "thresholds": {"kid_max": 0.2, "mean_tol": 30.0, "std_tol": 20.0}})
    with pytest.raises(ValueError, match="kid_max, mean_tol, std_tol set to 'auto' need real held-out images"):
        calibrate(AUTO, None, _reference(features), batch_size=10)


def test_params_accept_auto_or_a_number():
    cfg = Config.model_validate({"seed": 0, "validate_synthetic": {"kid_max": 0.3, "mean_tol": "auto"}})
    checks = checks_from_config(cfg)
    assert (checks.kid_max, checks.mean_tol) == (0.3, "auto")
    with pytest.raises(ValueError, match="kid_max"):
        SyntheticChecks(kid_max="sometimes")
    with pytest.raises(ValueError, match="kid_max"):
        SyntheticChecks(kid_max=-0.1)
