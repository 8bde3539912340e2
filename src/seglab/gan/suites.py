"""The two GX suites of the synthetic-data gate and `validate_samples`, which runs them over samples."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from seglab.atomic import atomic_dir, write_text_atomic
from seglab.data.classes import IGNORE_INDEX
from seglab.data.expectations import ROW_KEYS, annotate, ephemeral_context, run_checkpoint
from seglab.digest import json_safe
from seglab.gan.calibration import RealCalibration, calibrate, needs_calibration
from seglab.gan.checks import SyntheticChecks, resolve_checks
from seglab.gan.figures import (
    BATCH_FIGURES,
    CHANNELS,
    RealReference,
    batch_figures,
    compare_form,
    knn_radii,
    mobilenetv2_features,
    pairwise_rms_distances,
    realism_scores,
)
from seglab.gan.profile import synthetic_profile

log = logging.getLogger(__name__)

__all__ = ["BATCH_SUITE", "IMAGE_SUITE", "SyntheticValidation", "build_batch_suite", "build_image_suite",
           "validate_samples"]

IMAGE_SUITE = "seglab_synthetic_images"
BATCH_SUITE = "seglab_synthetic_batch"
MAX_SAMPLES_IN_SUMMARY = 100


def build_image_suite(checks: SyntheticChecks, num_classes: int):
    """`seglab_synthetic_images`: the per-image rules (module docstring) on a `synthetic_profile`."""
    import great_expectations as gx

    E = gx.expectations
    rules = [
        annotate(E.ExpectColumnValuesToBeNull(column="decode_error"), "decodable", "image and label decode"),
        annotate(E.ExpectColumnValuesToBeBetween(column="non_finite_pixels", min_value=0, max_value=0),
                 "finite", "no NaN or infinite pixel value"),
        annotate(E.ExpectColumnValuesToBeBetween(column="pixel_min", min_value=0), "value_min",
                 "pixel values are >= 0"),
        annotate(E.ExpectColumnValuesToBeBetween(column="pixel_max", max_value=255), "value_max",
                 "pixel values are <= 255"),
        annotate(E.ExpectColumnValuesToBeBetween(column="pixel_std", min_value=checks.min_std), "not_constant",
                 f"the image is not constant (pixel std >= {checks.min_std})"),
        annotate(E.ExpectColumnValuesToBeInSet(column="image_channels", value_set=[3]), "rgb", "the image is RGB"),
        annotate(E.ExpectColumnPairValuesToBeEqual(column_A="label_height", column_B="image_height"), "label_height",
                 "the label map's height equals the image's"),
        annotate(E.ExpectColumnPairValuesToBeEqual(column_A="label_width", column_B="image_width"), "label_width",
                 "the label map's width equals the image's"),
        annotate(E.ExpectColumnValuesToBeBetween(column="invalid_label_pixels", min_value=0, max_value=0),
                 "labels_in_class_set", f"every label value is a class (< {num_classes}) or {IGNORE_INDEX} (ignore)"),
        annotate(E.ExpectColumnValuesToBeBetween(column="labelled_share", min_value=checks.min_labelled_share),
                 "labelled_area", f"at least {checks.min_labelled_share:.1%} of the pixels carry a class > 0"),
    ]
    if checks.realism_k is not None:
        rules.append(annotate(
            E.ExpectColumnValuesToBeBetween(column="realism", min_value=1.0), "realistic",
            f"the image's feature lies within some real training image's {checks.realism_k}-NN radius "
            "(realism score >= 1)"))
    if checks.distinct_real_fraction is not None:
        rules.append(annotate(
            E.ExpectColumnValuesToBeBetween(column="distinctness", min_value=checks.distinct_real_fraction), "distinct",
            f"no earlier sample is nearer than {checks.distinct_real_fraction:g} x the two closest real images "
            "(not a copy)"))
    if checks.image_size is not None:
        height, width = checks.image_size
        rules += [
            annotate(E.ExpectColumnValuesToBeInSet(column="image_height", value_set=[height]), "image_height",
                     f"the image is {height} px high"),
            annotate(E.ExpectColumnValuesToBeInSet(column="image_width", value_set=[width]), "image_width",
                     f"the image is {width} px wide"),
        ]
    return gx.ExpectationSuite(name=IMAGE_SUITE, expectations=rules)


def build_batch_suite(checks: SyntheticChecks):
    """`seglab_synthetic_batch`: the per-batch rules (module docstring) on the one-row figures frame."""
    import great_expectations as gx

    E = gx.expectations
    rules = [annotate(E.ExpectColumnValuesToBeBetween(column="images", min_value=checks.min_images), "enough_images",
                      f"at least {checks.min_images} samples passed the per-image rules")]
    # A null figure would be skipped by the range rules below, so its absence is a rule of its own.
    rules += [annotate(E.ExpectColumnValuesToNotBeNull(column=f), f"computed:{f}", f"{f} could be computed")
              for f in BATCH_FIGURES]
    rules.append(annotate(E.ExpectColumnValuesToBeBetween(column="diversity", min_value=checks.diversity_min),
                          "diversity", f"mean pairwise distance >= {checks.diversity_min} (no mode collapse)"))
    for channel in CHANNELS:
        rules.append(annotate(E.ExpectColumnValuesToBeBetween(column=f"channel_mean_delta_{channel}",
                                                              min_value=-checks.mean_tol, max_value=checks.mean_tol),
                              f"channel_mean:{channel}", f"{channel} mean within {checks.mean_tol} of the real images'"))
        rules.append(annotate(E.ExpectColumnValuesToBeBetween(column=f"channel_std_delta_{channel}",
                                                              min_value=-checks.std_tol, max_value=checks.std_tol),
                              f"channel_std:{channel}", f"{channel} std within {checks.std_tol} of the real images'"))
    rules.append(annotate(E.ExpectColumnValuesToBeBetween(column="kid_mean", max_value=checks.kid_max), "kid",
                          f"KID to the real images <= {checks.kid_max}"))
    return gx.ExpectationSuite(name=BATCH_SUITE, expectations=rules)


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
    calibration: RealCalibration | None = None,
) -> SyntheticValidation:
    """Run both suites over (image, label) samples; write Data Docs + summary.json to `report_dir`
    (atomically). Per-image failures exclude those samples; a failed batch rule rejects them all.
    Thresholds set to "auto" are calibrated on `calibration` (held-out real images) for the batch
    that passed the per-image rules (seglab.gan.calibration); summary.json's `calibration` records
    how, `realism` and `distinct` the per-image rules against real images and the rest of the batch.
    Never raises for bad samples: the verdict is in the result (and the report)."""
    started = time.perf_counter()
    report_dir = Path(report_dir)
    checks = resolve_checks(checks, images)
    if len(images) and (reference.resolution, reference.feature_size) != (checks.resolution, checks.feature_size):
        raise ValueError(f"the real reference was computed at resolution {reference.resolution}, feature_size "
                         f"{reference.feature_size}; this batch is compared at {checks.resolution}, "
                         f"{checks.feature_size} (build it with real_reference(resolution=...))")
    if needs_calibration(checks) and calibration is None:
        raise ValueError("thresholds set to 'auto' need held-out real images to calibrate on: pass calibration= "
                         "(seglab.gan.calibration.real_calibration) or set numbers")
    profile = synthetic_profile(images, labels, num_classes=num_classes, keys=keys, decode_errors=decode_errors)
    features, judged_records = _judged_figures(images, profile, reference, checks, calibration)
    with atomic_dir(report_dir) as tmp:
        context = ephemeral_context(tmp)
        image_validation, image_entries = run_checkpoint(context, "validate_synthetic_images",
                                                         build_image_suite(checks, num_classes), profile, ROW_KEYS)
        rejected_by_rule = _rejected_rows(image_validation, profile)
        failed_image = set().union(*rejected_by_rule.values()) if rejected_by_rule else set()
        passed = [i for i in range(len(profile)) if i not in failed_image]
        checks, calibration_record = calibrate(checks, calibration, reference, len(passed))
        figures = batch_figures([np.asarray(images[i]) for i in passed], reference, checks,
                                features=None if features is None else features[passed])
        batch_validation, batch_entries = run_checkpoint(context, "validate_synthetic_batch",
                                                         build_batch_suite(checks), pd.DataFrame([figures]))
        batch_ok = bool(batch_validation.success)
        accepted = np.zeros(len(profile), bool)
        if batch_ok:
            accepted[passed] = True

        counts = {rule: len(rows) for rule, rows in rejected_by_rule.items() if rows}
        if not batch_ok and passed:
            for entry in batch_entries:
                if not entry["success"]:
                    counts[f"batch:{entry['rule']}"] = len(passed)
        rejected_samples = [
            {**{k: json_safe(profile.iloc[i][k]) for k in ROW_KEYS},
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
            "batch": {k: json_safe(v) for k, v in figures.items()},
            "real": {"source": reference.source, "images": reference.images,
                     "channel_mean": list(reference.channel_mean), "channel_std": list(reference.channel_std),
                     "diversity": reference.diversity},
            "settings": checks.model_dump(mode="json"),  # thresholds as applied (numbers, also when calibrated)
            "calibration": calibration_record,
            **judged_records,  # "realism", "distinct"
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


def _judged_figures(images: Sequence[Any], profile: pd.DataFrame, reference: RealReference, checks: SyntheticChecks,
                    calibration: RealCalibration | None) -> tuple[np.ndarray | None, dict]:
    """The per-image rules that judge a sample against real images or the rest of the batch.

    Adds to `profile` (null where an image cannot be judged, not decoded or not RGB: other rules
    reject it) `realism` (rule `realistic`, unless `realism_k` is None) and `distinctness` (rule
    `distinct`, unless `distinct_real_fraction` is None): the RMS distance at `diversity_size` to the
    nearest *earlier* judged sample, in units of the two closest real training images' distance
    (null for the first). Returns the features of every sample (NaN rows where not judged; None
    with the realism rule off) and the summary's records of both rules; the realism one with the
    share of the held-out real images (`calibration`) that pass the same test.
    """
    judged = [i for i, row in enumerate(profile.itertuples())
              if row.decode_error is None and row.image_channels == 3]
    records: dict[str, dict | None] = {"realism": None, "distinct": None}
    if checks.realism_k is None and checks.distinct_real_fraction is None:
        return None, records
    squares = np.stack([compare_form(np.asarray(images[i]), checks.resolution, checks.feature_size)
                        for i in judged]) if judged else np.zeros((0, checks.feature_size, checks.feature_size, 3))
    features = None
    if checks.realism_k is not None:
        features = np.full((len(profile), reference.features.shape[1]), np.nan)
        if judged:
            features[judged] = mobilenetv2_features(squares)
        radii = knn_radii(reference.features, checks.realism_k)
        scores = np.full(len(profile), np.nan)
        scores[judged] = realism_scores(features[judged], reference.features, radii)
        profile["realism"] = scores
        records["realism"] = {
            "rule": f"accepted when realism = max over real training images r of radius_{checks.realism_k}(r) / "
                    f"|f - f_r| >= 1, i.e. the feature f lies within some real image's {checks.realism_k}-NN ball",
            "k": checks.realism_k,
            "reference_images": reference.images,
            "radius_median": float(np.median(radii)),
            "synthetic_judged": len(judged),
            "synthetic_passed": int((scores >= 1.0).sum()),
        }
        if calibration is not None:
            held_out = realism_scores(calibration.features, reference.features, radii) >= 1.0
            records["realism"].update(held_out_source=calibration.source, held_out_images=calibration.images,
                                      held_out_passed=int(held_out.sum()),
                                      held_out_pass_share=float(held_out.mean()))
    if checks.distinct_real_fraction is not None:
        if not reference.nearest_distance:
            raise ValueError(f"the distinct rule needs the real reference's nearest distance > 0, got "
                             f"{reference.nearest_distance} ({reference.source}); set distinct_real_fraction to null")
        distances = pairwise_rms_distances(squares, checks.diversity_size) if judged else np.zeros((0, 0))
        ratio = np.full(len(profile), np.nan)
        for position, index in enumerate(judged[1:], start=1):
            ratio[index] = distances[position, :position].min() / reference.nearest_distance
        profile["distinctness"] = ratio
        records["distinct"] = {
            "rule": f"a sample nearer than {checks.distinct_real_fraction:g} x the closest two real training images "
                    "(RMS pixel distance at diversity_size) to an earlier sample of the batch is a copy: rejected",
            "real_nearest_distance": reference.nearest_distance,
            "threshold": checks.distinct_real_fraction * reference.nearest_distance,
            "copies": int((ratio < checks.distinct_real_fraction).sum()),
        }
    return features, records


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
