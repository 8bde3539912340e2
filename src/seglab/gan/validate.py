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
       realistic                 realism >= 1 (unless realism_k is null): the image's feature lies
                                 within the k-NN radius of some real training image's feature, k =
                                 realism_k (the precision criterion of Kynkäänniemi et al. 2019,
                                 "Improved Precision and Recall"; the radii are real-vs-real distances
                                 of the training reference, summary.json's `realism` also reports the
                                 share of held-out real images that pass the same test)
       distinct                  distinctness >= distinct_real_fraction (unless null): no earlier sample
                                 of the batch is nearer than that fraction of the distance between the
                                 two closest real training images (a copy: 3 images repeated leave 3)

2. `seglab_synthetic_batch`, on a one-row frame of figures computed over the samples that passed
   (1), against the real training images. A broken rule rejects the whole batch: a generator
   that collapsed or drifted away from the data is not trusted for any of its samples.

       enough_images             at least `min_images` samples passed (1); fewer are too few to judge
       computed:<figure>         each figure below could be computed (not null)
       diversity                 mean pairwise distance >= diversity_min (mode collapse)
       channel_mean:<c>          |mean_c(synthetic) - mean_c(real)| <= mean_tol, c in r, g, b
       channel_std:<c>           |std_c(synthetic) - std_c(real)| <= std_tol
       kid                       KID mean <= kid_max

   kid_max, mean_tol and std_tol set to "auto" are calibrated for this batch on real-vs-real
   figures of the held-out `calibration_split` (seglab.gan.calibration); summary.json's
   `calibration` records the figures, the rule and the thresholds, `settings` the numbers applied.

   summary.json's `rejected_by_rule` counts the samples each rule rejected (a sample can break
   several); `batch:<rule>` counts those a broken batch rule took down with the batch.

Definitions. Every image, real or synthetic alike, is centre-cropped to a square, brought to
`resolution`² (the synthetic images' own size unless set: a generator working at 64 px is judged
against real images seen at 64 px, so KID measures content rather than the resolution gap), then
resized to `feature_size`² (default 224, MobileNetV2's native input); PIL bilinear, antialiased.
The batch figures use that form:

- diversity: mean over all pairs (i < j) of the RMS pixel difference between the two images at
  `diversity_size`² (default 64), pixels scaled to [0, 1]. 0 for n copies of one image (the real
  training value is reported beside it).
- channel mean/std: over all pixels of all images, per RGB channel, in [0, 255] units.
- realism (per image): max over the real training images r of radius_k(r) / |f - f_r|, where f
  is the image's feature (below), f_r a real one and radius_k(r) the distance from f_r to its k-th
  nearest other real feature; >= 1 exactly when f lies in some real k-NN ball.
- distinctness (per image): the RMS pixel distance (as diversity's) to the nearest earlier sample
  of the batch, divided by that of the two closest real training images; null for the first.
- KID (Bińkowski et al. 2018, "Demystifying MMD GANs"): the unbiased MMD² between the two sets of
  features with the kernel k(x, y) = (xᵀy / d + 1)³, averaged over `kid_subsets` random subsets
  of `min(kid_subset_size, n_synthetic, n_real)` samples from each set (drawn without
  replacement, seeded; with kid_max calibrated, kid_subset_size is the size it was calibrated at,
  seglab.gan.calibration); reported as mean ± std over the subsets. Features: the 1280-d global
  average pool of the offline-ImageNet MobileNetV2 classifier (`imagenet_classifier
  ("mobilenetv2")`'s `avg_pool` layer, the input of its logits), standing in for Inception's pool3.

Accepted samples are written to `<out>/train/part-*.parquet` with the synthetic shards' own
schema and metadata (plus `seglab.synthetic_validation`), one output file per input file that
kept any row. `<out>/validation.json` always records the decision; when nothing is accepted no
shard is written and `<out>/NONE_ACCEPTED` says why. Training asks `accepted_synthetic_shards`
(seglab.data.synthetic), which returns None (and logs "training on real data only") in that case.

Modules: `checks` (the settings), `profile` (per-image rows), `figures` (batch figures, KID),
`suites` (the two GX suites, `validate_samples`); this one reads and writes the shards. Why the
thresholds are what they are: docs/synthetic-validation.md.
"""

from __future__ import annotations

import io
import json
import logging
import math
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from seglab.atomic import atomic_dir, write_text_atomic
from seglab.config import Config
from seglab.data.shards import SHARD_SCHEMA, ShardWriter, read_classes, shard_files
from seglab.data.synthetic import NONE_ACCEPTED, VALIDATION_FILE
from seglab.digest import sha256_files, sha256_json
from seglab.gan.calibration import RealCalibration, needs_calibration, real_calibration_from_shards
from seglab.gan.checks import SyntheticChecks, checks_from_config, resolve_checks
from seglab.gan.figures import RealReference, real_reference_from_shards
from seglab.gan.suites import validate_samples

log = logging.getLogger(__name__)

__all__ = ["GENERATOR_FIELDS", "run_validate_synthetic", "validate_synthetic"]

GENERATOR_FIELDS = (pa.field("generator", pa.string()), pa.field("generator_seed", pa.int64()))


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
    return checks.model_copy(update={"image_size": image_size, "resolution": resolution}), str(path)


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
    calibration: RealCalibration | None = None,
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
    if needs_calibration(checks):
        held_out_files = shard_files(real_dir, checks.calibration_split)
        real_files = [*real_files, *held_out_files]
        if calibration is None:
            calibration = real_calibration_from_shards(real_dir, checks.calibration_split,
                                                       resolution=checks.resolution,
                                                       max_images=checks.reference_images,
                                                       feature_size=checks.feature_size, seed=checks.seed)
    synthetic_digest, real_digest = sha256_files(files), sha256_files(real_files)
    settings = checks.model_dump(mode="json")
    params_hash = sha256_json({"settings": settings, "synthetic": synthetic_digest, "real": real_digest})[:16]
    validation = validate_samples(
        images, labels, reference=reference, num_classes=len(classes), report_dir=report_dir, checks=checks,
        keys=keys, decode_errors=errors, calibration=calibration,
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
        written = len(writer.close())
        verdict["files"] = written
        if not written:
            write_text_atomic(tmp / NONE_ACCEPTED, summary["decision"] + "\n")
        write_text_atomic(tmp / VALIDATION_FILE, json.dumps(verdict, indent=2, default=str) + "\n")


def run_validate_synthetic(cfg: Config, gan_name: str, *, checks: SyntheticChecks | None = None) -> dict:
    """The `validate_synthetic@<gan>` stage: `<gan.synthetic_out>/<gan>` -> `<validate_synthetic.out>/<gan>` +
    `<validate_synthetic.report>/<gan>/{index.html, summary.json}`, against the real `<shard.out>/train`.

    Sizes not set in params come from `synthesize.json` beside the synthetic shards (see `validate_synthetic`).
    """
    section = cfg.validate_synthetic
    return validate_synthetic(cfg.gan.synthetic_out / gan_name, cfg.shard.out, section.out / gan_name,
                              section.report / gan_name, gan=gan_name, checks=checks or checks_from_config(cfg))
