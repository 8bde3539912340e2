"""validate_synthetic: the GX gate on synthetic (image, label) batches, its KID and its warehouse table.

The real data is a small embedded sample built per module (48 train / 24 val images, 96-160 px).
"Synthetic" batches are its val images brought to 64x64 (what a 64 px generator emits), lightly
perturbed for the reasonable case and broken on purpose for the others. All suite runs use the
fixed thresholds (the hand-set numbers the gate used before calibration) with the expected size
64x64, features at 224, and the per-image rules that judge a sample against real images or the
batch off (realism_k and distinct_real_fraction None), so each rule is seen alone; the calibrated
("auto") thresholds with those rules on, as params.yaml sets them, are tested on the stage at the
end of the stage section (the calibration rule itself: test_calibration.py; the realism scores:
test_realism_scores_*).
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from seglab.config import Config, ShardConfig
from seglab.data.sample import generate_sample
from seglab.data.shard_stage import build_shards
from seglab.data.shards import SHARD_SCHEMA, decode_label, decode_rgb, read_classes, read_split
from seglab.data.manifest import write_manifest
from seglab.data.synthetic import NONE_ACCEPTED, VALIDATION_FILE, accepted_synthetic_shards
from seglab.gan.checks import SyntheticChecks, checks_from_config
from seglab.gan.figures import (
    kernel_inception_distance,
    knn_radii,
    mean_pairwise_distance,
    polynomial_mmd2_unbiased,
    real_reference,
    realism_scores,
    square_resize,
)
from seglab.gan.profile import synthetic_profile
from seglab.gan.suites import validate_samples
from seglab.gan.validate import GENERATOR_FIELDS, run_validate_synthetic
from seglab.warehouse.synthetic import SummaryFileError, ingest_synthetic_validation

SIZE = 64
CHECKS = SyntheticChecks(image_size=(SIZE, SIZE), kid_max=0.15, mean_tol=30.0, std_tol=20.0, realism_k=None,
                         distinct_real_fraction=None)
NUM_CLASSES = 21  # voc20 + background


@pytest.fixture(scope="module")
def real_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sample")
    generate_sample(root / "coco", train_images=48, val_images=24, min_side=96, max_side=160, seed=0)
    build_shards(root / "coco", root / "shards", splits={"train": "train2017", "val": "val2017"},
                 settings=ShardConfig(workers=1))
    return root / "shards"


def _square_label(label: np.ndarray, size: int) -> np.ndarray:
    h, w = label.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return np.asarray(Image.fromarray(label[top:top + side, left:left + side]).resize((size, size), Image.NEAREST))


@pytest.fixture(scope="module")
def data(real_shards):
    train = read_split(real_shards, "train")
    val = read_split(real_shards, "val")
    train_images = [decode_rgb(b) for b in train.column("image").to_pylist()]
    val_images = [np.clip(square_resize(decode_rgb(b), SIZE), 0, 255).round().astype(np.uint8)
                  for b in val.column("image").to_pylist()]
    val_labels = [_square_label(decode_label(b), SIZE) for b in val.column("label").to_pylist()]
    assert all(((lb > 0) & (lb < NUM_CLASSES)).mean() >= CHECKS.min_labelled_share for lb in val_labels)
    return {"train": train_images, "images": val_images, "labels": val_labels}


@pytest.fixture(scope="module")
def reference(data):
    return real_reference(data["train"], resolution=SIZE, feature_size=CHECKS.feature_size)


def perturbed(images: list[np.ndarray], seed: int = 0) -> list[np.ndarray]:
    """Lightly perturbed copies: a small brightness change and faint pixel noise (sigma 1; at 64 px
    sigma 4 already moves KID to ~0.13, sigma 8 to ~0.21, see SyntheticChecks)."""
    rng = np.random.default_rng(seed)
    return [np.clip(np.round(im * 1.05 + rng.normal(0, 1, im.shape)), 0, 255).astype(np.uint8) for im in images]


def validate(images, labels, reference, tmp_path, name="report", checks=CHECKS):
    return validate_samples(images, labels, reference=reference, num_classes=NUM_CLASSES,
                            report_dir=tmp_path / name, checks=checks)


# ---- the suites on arrays ----------------------------------------------------------------------

def test_reasonable_batch_passes_with_report(data, reference, tmp_path):
    outcome = validate(perturbed(data["images"]), data["labels"], reference, tmp_path)
    s = outcome.summary
    assert outcome.accepted.all() and s["success"] and s["batch_success"]
    assert (s["images"], s["accepted"], s["rejected"], s["rejected_by_rule"]) == (24, 24, 0, {})
    assert s["batch"]["kid_mean"] < CHECKS.kid_max
    assert s["batch"]["diversity"] > CHECKS.diversity_min
    report = tmp_path / "report"
    assert (report / "index.html").is_file()
    assert json.loads((report / "summary.json").read_text())["accepted"] == 24
    # Data Docs hold one validation result per suite.
    pages = " ".join(p.read_text() for p in report.rglob("*.html"))
    assert "seglab_synthetic_images" in pages and "seglab_synthetic_batch" in pages
    assert not list(tmp_path.glob(".report.*"))  # no temporary folder left behind


def _black(data):
    return [np.zeros_like(im) for im in data["images"]], data["labels"]


def _noise(data):
    rng = np.random.default_rng(1)
    return [rng.integers(0, 256, im.shape, dtype=np.uint8) for im in data["images"]], data["labels"]


def _wrong_size(data):
    return ([np.asarray(Image.fromarray(im).resize((48, 48))) for im in data["images"]],
            [np.asarray(Image.fromarray(lb).resize((48, 48), Image.NEAREST)) for lb in data["labels"]])


def _labels_out_of_range(data):
    return data["images"], [np.where(lb > 0, lb + 30, lb).astype(np.uint8) for lb in data["labels"]]


def _collapsed(data):
    n = len(data["images"])
    return [data["images"][3]] * n, [data["labels"][3]] * n


@pytest.mark.parametrize("make, broken_rule", [
    (_black, "not_constant"),
    (_noise, "batch:kid"),
    (_wrong_size, "image_height"),
    (_labels_out_of_range, "labels_in_class_set"),
    (_collapsed, "batch:diversity"),
], ids=["all_black", "pure_noise", "wrong_size", "labels_out_of_range", "collapsed"])
def test_broken_batches_are_rejected(data, reference, tmp_path, make, broken_rule):
    images, labels = make(data)
    outcome = validate(images, labels, reference, tmp_path)
    s = outcome.summary
    assert not outcome.accepted.any() and not s["success"]
    assert s["rejected"] == s["images"] == 24
    assert s["rejected_by_rule"][broken_rule] == 24, s["rejected_by_rule"]
    assert "training on real data only" in s["decision"]
    if broken_rule.startswith("batch:"):
        # Every sample passed the per-image rules; the batch as a whole was refused.
        assert s["rejected_per_image"] == 0 and s["rejected_by_batch"] == 24 and not s["batch_success"]
    if make is _noise:
        assert s["batch"]["kid_mean"] > 3 * CHECKS.kid_max
        assert s["batch"]["diversity"] > CHECKS.diversity_min  # noise is diverse: only KID catches it
    if make is _collapsed:
        # The Gram-matrix form of the distance leaves rounding of ~1e-8 for identical images.
        assert s["batch"]["diversity"] == pytest.approx(0.0, abs=1e-6)
        assert "kid" in {e["rule"] for e in s["expectations"]["batch"] if not e["success"]}


def test_per_image_rejects_are_excluded_and_counted(data, reference, tmp_path):
    images = [im.astype(np.float32) for im in perturbed(data["images"], seed=2)]
    labels = [lb.copy() for lb in data["labels"]]
    images[0] = np.zeros_like(images[0])                   # constant
    images[1][5, 5, 0] = np.nan                            # a NaN pixel (raw float output)
    labels[2][:4, :4] = 99                                 # not a class of 21
    labels[3][:] = 0                                       # nothing labelled
    images[4] = images[4] + 300.0                          # beyond 255
    images[5] = images[5][..., 0]                          # greyscale
    labels[6] = labels[6][:32, :32]                        # label map smaller than its image
    outcome = validate(images, labels, reference, tmp_path)
    s = outcome.summary
    assert s["rejected_by_rule"] == {"not_constant": 1, "finite": 1, "labels_in_class_set": 1, "labelled_area": 1,
                                     "value_max": 1, "rgb": 1, "label_height": 1, "label_width": 1}
    assert outcome.accepted.tolist() == [False] * 7 + [True] * 17
    assert (s["accepted"], s["rejected"], s["rejected_per_image"], s["rejected_by_batch"]) == (17, 7, 7, 0)
    assert [r["rules"] for r in s["rejected_samples"]] == [
        ["not_constant"], ["finite"], ["labels_in_class_set"], ["labelled_area"], ["value_max"], ["rgb"],
        ["label_height", "label_width"]]
    assert s["batch"]["images"] == 17  # batch figures over the survivors only


def test_profile_columns_describe_each_sample():
    image = np.full((8, 10, 3), 7.0)
    image[0, 0, 0] = np.inf
    label = np.array([[0, 1, 255, 21, 40]] * 8, np.uint8)
    profile = synthetic_profile([image, None], [label, label], num_classes=21)
    first = profile.iloc[0]
    assert (first.image_height, first.image_width, first.image_channels) == (8, 10, 3)
    assert (first.non_finite_pixels, first.pixel_min, first.pixel_max, first.pixel_std) == (1, 7.0, 7.0, 0.0)
    assert first.invalid_label_pixels == 16 and first.labelled_share == pytest.approx(1 / 5)
    assert profile["decode_error"].isna().tolist() == [True, False]
    assert profile.iloc[1].decode_error == "image missing" and profile.iloc[1].label_height == 8
    with pytest.raises(ValueError, match="2 images but 1 labels"):
        synthetic_profile([image, image], [label], num_classes=21)


def test_reference_at_another_resolution_is_refused(data, reference, tmp_path):
    with pytest.raises(ValueError, match="resolution 64.*compared at 48"):
        validate(*_wrong_size(data), reference, tmp_path, checks=SyntheticChecks())


def test_checks_come_from_params():
    cfg = Config.model_validate({"seed": 5, "validate_synthetic": {"image_size": 32, "kid_max": 0.2}})
    assert checks_from_config(cfg) == SyntheticChecks(image_size=(32, 32), kid_max=0.2, seed=5)
    assert checks_from_config(Config(seed=1)) == SyntheticChecks(seed=1)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match=r"(?s)min_labelled_share\s+Input should be less than or equal to 1.*"
                                         r"min_images\s+Input should be greater than or equal to 2"):
        SyntheticChecks(min_labelled_share=2, min_images=1)


# ---- KID and diversity -------------------------------------------------------------------------

def _mmd2_by_definition(x, y):
    def k(a, b):
        return (a @ b / len(a) + 1.0) ** 3
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_matches_the_unbiased_polynomial_mmd_formula():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, 8)), rng.normal(0.5, 1.2, size=(15, 8))
    assert polynomial_mmd2_unbiased(x, y) == pytest.approx(_mmd2_by_definition(x, y), rel=1e-10)
    # Subsets as large as the sets: every subset is the whole set, so the mean is that value, std 0.
    mean, std = kernel_inception_distance(x, y[:12], subsets=5, subset_size=100)
    assert mean == pytest.approx(_mmd2_by_definition(x, y[:12]), rel=1e-10) and std == pytest.approx(0, abs=1e-12)
    # Smaller subsets: the mean of the formula over the same seeded draws.
    rng = np.random.default_rng(3)
    draws = [(rng.choice(12, 5, replace=False), rng.choice(15, 5, replace=False)) for _ in range(4)]
    expected = [_mmd2_by_definition(x[i], y[j]) for i, j in draws]
    mean, std = kernel_inception_distance(x, y, subsets=4, subset_size=5, seed=3)
    assert (mean, std) == (pytest.approx(np.mean(expected), rel=1e-10), pytest.approx(np.std(expected), rel=1e-9))


def test_kid_near_zero_for_one_distribution_large_for_two():
    rng = np.random.default_rng(1)
    a, b = rng.random((300, 64)), rng.random((300, 64))
    shifted = rng.random((300, 64)) + 0.5
    same, same_std = kernel_inception_distance(a, b, subsets=20, subset_size=100, seed=0)
    different, _ = kernel_inception_distance(a, shifted, subsets=20, subset_size=100, seed=0)
    assert abs(same) < 3 * same_std + 1e-3
    assert different > 100 * max(abs(same), same_std)
    with pytest.raises(ValueError, match=">= 2 samples"):
        kernel_inception_distance(a[:1], b)


def test_mean_pairwise_distance_is_rms_in_unit_range():
    black, white = np.zeros((16, 16, 3)), np.full((16, 16, 3), 255.0)
    grey = np.full((16, 16, 3), 51.0)
    assert mean_pairwise_distance(np.stack([black] * 4), size=16) == 0.0
    assert mean_pairwise_distance(np.stack([black, white]), size=16) == pytest.approx(1.0)
    # pairs: (black, white) 1.0, (black, grey) 0.2, (white, grey) 0.8
    assert mean_pairwise_distance(np.stack([black, white, grey]), size=16) == pytest.approx(2.0 / 3)


# ---- shards in, shards out (the stage) ---------------------------------------------------------

def _jpeg(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _png(label: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(label).save(buf, format="PNG")
    return buf.getvalue()


def write_synthetic(root: Path, gan: str, images, labels, real_shards: Path, *, classes=None, seed=7,
                    rows_per_file=10, drop_generator=False, truncate_rows=()) -> Path:
    """Synthetic shards as `synthesize` writes them: SHARD_SCHEMA + generator columns, real class list."""
    fields = list(SHARD_SCHEMA) + ([] if drop_generator else list(GENERATOR_FIELDS))
    metadata = dict(pq.read_schema(sorted((real_shards / "train").glob("*.parquet"))[0]).metadata)
    if classes is not None:
        metadata[b"seglab.classes"] = json.dumps(classes).encode()
    metadata[b"seglab.generator"] = gan.encode()
    schema = pa.schema(fields).with_metadata(metadata)
    rows = []
    for i, (image, label) in enumerate(zip(images, labels)):
        counts = np.bincount(label.ravel(), minlength=256)
        rows.append({"image_id": i, "file_name": f"{gan}-{i:05d}.jpg", "split": "train", "source": f"synthetic:{gan}",
                     "height": label.shape[0], "width": label.shape[1], "orig_height": label.shape[0],
                     "orig_width": label.shape[1], "image": _jpeg(image), "label": _png(label),
                     "class_pixels": [int(c) for c in counts[:NUM_CLASSES]], "ignore_pixels": int(counts[255]),
                     "generator": gan, "generator_seed": seed})
        if i in truncate_rows:
            rows[-1]["image"] = rows[-1]["image"][:200]  # a JPEG cut short
    out = root / gan / "train"
    out.mkdir(parents=True)
    for start in range(0, len(rows), rows_per_file):
        pq.write_table(pa.Table.from_pylist(rows[start:start + rows_per_file], schema=schema),
                       out / f"part-{start // rows_per_file:05d}.parquet")
    write_manifest(out)  # written by hand, some with a schema ShardWriter refuses: vouch for them as they are
    return root / gan


def run_stage(tmp_path, real_shards, gan, checks=CHECKS):
    cfg = Config.model_validate({"shard": {"out": str(real_shards)}, "gan": {"synthetic_out": tmp_path / "synthetic"},
                                 "validate_synthetic": {"out": tmp_path / "synthetic_valid",
                                                        "report": tmp_path / "reports"}})
    return run_validate_synthetic(cfg, gan, checks=checks)


@pytest.fixture(scope="module")
def stage_run(data, real_shards, tmp_path_factory):
    """The stage on shards whose rows 0 (black), 13 (label out of range) and 21 (truncated JPEG) are
    broken, 10 rows a file."""
    tmp_path = tmp_path_factory.mktemp("stage")
    images, labels = perturbed(data["images"], seed=3), [lb.copy() for lb in data["labels"]]
    images[0] = np.zeros_like(images[0])
    labels[13][labels[13] == 0] = 77
    write_synthetic(tmp_path / "synthetic", "mygan", images, labels, real_shards, truncate_rows=(21,))
    return tmp_path, run_stage(tmp_path, real_shards, "mygan")


def test_stage_writes_accepted_shards_with_the_same_schema(stage_run, real_shards):
    tmp_path, summary = stage_run
    assert (summary["accepted"], summary["rejected"]) == (21, 3)
    assert summary["rejected_by_rule"] == {"not_constant": 1, "labels_in_class_set": 1, "decodable": 1}
    assert {(r["shard_file"], r["shard_row"]) for r in summary["rejected_samples"]} == {
        ("train/part-00000.parquet", 0), ("train/part-00001.parquet", 3), ("train/part-00002.parquet", 1)}
    assert (summary["generator"], summary["generator_seed"]) == (["mygan"], [7])
    valid = accepted_synthetic_shards(tmp_path / "synthetic_valid" / "mygan")
    assert valid == tmp_path / "synthetic_valid" / "mygan"
    files = sorted((valid / "train").glob("part-*.parquet"))
    source = pq.read_schema(tmp_path / "synthetic" / "mygan" / "train" / "part-00000.parquet")
    assert [pq.read_metadata(f).num_rows for f in files] == [9, 9, 3]  # input files kept, minus rejects
    for f in files:
        schema = pq.read_schema(f)
        assert schema.remove_metadata().equals(source.remove_metadata())
        assert schema.metadata[b"seglab.generator"] == b"mygan"
        verdict = json.loads(schema.metadata[b"seglab.synthetic_validation"])
        assert verdict["accepted"] == 21 and verdict["params_hash"] == summary["params_hash"]
    assert read_classes(files[0]) == read_classes(sorted((real_shards / "train").glob("*.parquet"))[0])
    kept = read_split(valid, "train", columns=["image_id", "source"])
    assert sorted(kept.column("image_id").to_pylist()) == [i for i in range(24) if i not in (0, 13, 21)]
    report = tmp_path / "reports" / "mygan"
    assert (report / "index.html").is_file() and (report / "summary.json").is_file()
    assert not (valid / NONE_ACCEPTED).exists()


def test_stage_output_feeds_the_training_pipeline(stage_run, real_shards):
    from seglab.data.pipeline import make_dataset

    tmp_path, _ = stage_run
    dataset = make_dataset([real_shards, tmp_path / "synthetic_valid" / "mygan"], "train", image_size=(32, 32),
                           batch_size=80, training=False)
    images, labels = next(iter(dataset))
    assert images.shape == (69, 32, 32, 3)  # 48 real + 21 accepted synthetic


def test_everything_rejected_means_real_data_only(data, real_shards, tmp_path, caplog):
    synthetic = write_synthetic(tmp_path / "synthetic", "deadgan", *_black(data), real_shards)
    # As synthesize writes it: pairs enlarged from the generator's 32 px to 64 px.
    (synthetic / "synthesize.json").write_text(json.dumps({"image_size": 64, "gan_image_size": 32}))
    summary = run_stage(tmp_path, real_shards, "deadgan", checks=SyntheticChecks())
    assert (summary["settings"]["image_size"], summary["settings"]["resolution"]) == ([64, 64], 32)
    assert summary["sizes_from"] == str(synthetic / "synthesize.json")
    valid = tmp_path / "synthetic_valid" / "deadgan"
    assert summary["accepted"] == 0 and not summary["success"]
    assert "training on real data only" in (valid / NONE_ACCEPTED).read_text()
    assert json.loads((valid / VALIDATION_FILE).read_text())["accepted"] == 0
    assert not list(valid.rglob("*.parquet"))
    with caplog.at_level(logging.WARNING, logger="seglab.gan.validate"):
        assert accepted_synthetic_shards(valid) is None
    assert "training on real data only" in caplog.text


@pytest.fixture(scope="module")
def unseen_real(tmp_path_factory):
    """Real images the reference and the calibration never saw: another draw of the same sample
    generator, as a 64 px generator would emit them."""
    root = tmp_path_factory.mktemp("unseen")
    generate_sample(root / "coco", train_images=24, val_images=2, min_side=96, max_side=160, seed=1)
    build_shards(root / "coco", root / "shards", splits={"train": "train2017", "val": "val2017"},
                 settings=ShardConfig(workers=1))
    table = read_split(root / "shards", "train")
    images = [np.clip(square_resize(decode_rgb(b), SIZE), 0, 255).round().astype(np.uint8)
              for b in table.column("image").to_pylist()]
    return images, [_square_label(decode_label(b), SIZE) for b in table.column("label").to_pylist()]


CALIBRATED = SyntheticChecks(image_size=(SIZE, SIZE), kid_max="auto", mean_tol="auto", std_tol="auto")


def test_calibrated_gate_keeps_realistic_images_and_drops_the_others_one_by_one(unseen_real, real_shards, tmp_path):
    """params.yaml's gate (realism rule on, k = 3; thresholds calibrated) on unseen real images with
    six noise images among them: the noise goes, image by image, most real images stay, and the
    batch of those that stayed passes. (k-NN precision is a statistical test: a real outlier's wide
    ball lets the odd noise image in, ~1 in 100 on the embedded sample; one may pass here.)"""
    assert (CALIBRATED.realism_k, CALIBRATED.distinct_real_fraction) == (3, 0.5)  # as params.yaml sets them
    images, labels = unseen_real
    rng = np.random.default_rng(4)
    noise = [rng.integers(0, 256, im.shape, dtype=np.uint8) for im in images[:6]]
    write_synthetic(tmp_path / "synthetic", "realgan", images + noise, labels + labels[:6], real_shards)
    summary = run_stage(tmp_path, real_shards, "realgan", checks=CALIBRATED)
    realism = summary["realism"]
    assert summary["batch_success"] and set(summary["rejected_by_rule"]) == {"realistic"}
    assert realism["synthetic_judged"] == 30 and realism["k"] == 3 and realism["reference_images"] == 48
    rejected = {r["image_id"] for r in summary["rejected_samples"]}
    noise_passed = 6 - len(rejected & set(range(24, 30)))
    real_share = 1 - len(rejected - set(range(24, 30))) / 24
    assert noise_passed <= 1 and real_share >= 0.6, summary["rejected_by_rule"]
    assert summary["accepted"] == realism["synthetic_passed"] == round(real_share * 24) + noise_passed
    assert summary["distinct"]["copies"] == 0 and summary["distinct"]["real_nearest_distance"] > 0
    # Held-out real images pass the same test about as often as the unseen ones; the batch thresholds are
    # calibrated on all of them, for a batch of the accepted size.
    calibration = summary["calibration"]
    assert calibration["calibrated"] == ["kid_max", "mean_tol", "std_tol"]
    assert realism["held_out_images"] == calibration["held_out_images"] == 24
    assert realism["held_out_pass_share"] == realism["held_out_passed"] / 24 >= 0.6
    assert calibration["batch_size"] == summary["accepted"]
    assert summary["settings"]["kid_max"] == calibration["thresholds"]["kid_max"] > 0
    # KID subsets of half the held-out images, whatever the batch; the batch is measured at that size too.
    assert summary["settings"]["kid_subset_size"] == calibration["real_vs_real"]["kid_subset_size"] == 12
    assert summary["batch"]["kid_mean"] <= summary["settings"]["kid_max"]


def test_calibrated_gate_rejects_noise_repeated_and_constant_batches(unseen_real, real_shards, tmp_path):
    images, labels = unseen_real
    rng = np.random.default_rng(4)
    noise = [rng.integers(0, 256, im.shape, dtype=np.uint8) for im in images]
    write_synthetic(tmp_path / "synthetic", "noisegan", noise, labels, real_shards)
    summary = run_stage(tmp_path, real_shards, "noisegan", checks=CALIBRATED)
    assert summary["accepted"] == 0 and summary["rejected_by_rule"]["realistic"] >= 22
    assert summary["realism"]["synthetic_passed"] == summary["batch"]["images"] < CALIBRATED.min_images
    # Without the per-image rule the batch rules still refuse it: KID far above the calibrated bound.
    summary = run_stage(tmp_path, real_shards, "noisegan", checks=CALIBRATED.model_copy(update={"realism_k": None}))
    assert summary["accepted"] == 0 and summary["rejected_by_rule"]["batch:kid"] == 24
    # (This fixture holds 24 held-out images: subsets of 12, a wider bound than the default run's 48 give.)
    assert summary["batch"]["kid_mean"] > 2 * summary["settings"]["kid_max"] and summary["realism"] is None

    # Three real images, each eight times: the copies go one by one, the three left are too few for a batch.
    repeated = [images[i % 3] for i in range(24)]
    write_synthetic(tmp_path / "synthetic", "threegan", repeated, [labels[i % 3] for i in range(24)], real_shards)
    summary = run_stage(tmp_path, real_shards, "threegan", checks=CALIBRATED)
    assert summary["accepted"] == 0 and not summary["batch_success"], summary["rejected_by_rule"]
    assert summary["rejected_by_rule"]["distinct"] == summary["distinct"]["copies"] == 21
    assert summary["batch"]["images"] <= 3 and "batch:enough_images" in summary["rejected_by_rule"]
    # The rule alone, without the realism rule and with room for every image: still the 21 copies.
    summary = run_stage(tmp_path, real_shards, "threegan",
                        checks=CALIBRATED.model_copy(update={"realism_k": None, "min_images": 2}))
    assert summary["rejected_by_rule"]["distinct"] == 21 and summary["batch"]["images"] == 3

    constant = [np.full_like(im, 128) for im in images]
    write_synthetic(tmp_path / "synthetic", "greygan", constant, labels, real_shards)
    summary = run_stage(tmp_path, real_shards, "greygan", checks=CALIBRATED)
    assert summary["accepted"] == 0 and summary["rejected_by_rule"]["not_constant"] == 24


def test_reference_records_how_near_the_two_closest_real_images_are(data, reference):
    from seglab.gan.figures import compare_form, pairwise_rms_distances

    squares = np.stack([compare_form(im, SIZE, CHECKS.feature_size) for im in data["train"]])
    distances = pairwise_rms_distances(squares, CHECKS.diversity_size)
    assert np.allclose(np.diag(distances), 0.0, atol=1e-6) and np.allclose(distances, distances.T)
    pairs = distances[np.triu_indices(len(distances), k=1)]
    assert reference.nearest_distance == pytest.approx(pairs.min()) and pairs.min() > 0.01
    assert reference.diversity == pytest.approx(pairs.mean())
    assert mean_pairwise_distance(squares) == pytest.approx(pairs.mean())


def test_realism_scores_are_the_knn_precision_criterion():
    real = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [10.0, 10.0]])
    # The other real features by distance: from (0, 0) 1, 2, 14.1; from (0, 2) 2, 2.24, 12.8; ...
    np.testing.assert_allclose(knn_radii(real, 1), [1.0, 1.0, 2.0, np.hypot(10, 8)])
    np.testing.assert_allclose(knn_radii(real, 2), [2.0, np.sqrt(5), np.sqrt(5), np.hypot(10, 9)])
    radii = knn_radii(real, 1)
    samples = np.array([[0.5, 0.0], [0.0, 1.0], [5.0, 5.0], [100.0, 100.0]])
    scores = realism_scores(samples, real, radii)
    # The best radius / distance ratio over the real features: >= 1 inside some ball.
    assert scores[0] == pytest.approx(1.0 / 0.5) and scores[1] == pytest.approx(2.0 / 1.0)
    assert scores[2] == pytest.approx(np.hypot(10, 8) / np.hypot(5, 5))  # > 1: inside the outlier's wide ball
    assert scores[3] < 1
    with pytest.raises(ValueError, match="more real images than k=4"):
        knn_radii(real, 4)


def test_contract_errors_name_the_file(data, real_shards, tmp_path):
    images, labels = data["images"][:4], data["labels"][:4]
    write_synthetic(tmp_path / "synthetic", "nocols", images, labels, real_shards, drop_generator=True)
    with pytest.raises(ValueError, match=r"nocols/train/part-00000.parquet: not a synthetic shard "
                                         r"\(missing column 'generator'; missing column 'generator_seed'\)"):
        run_stage(tmp_path, real_shards, "nocols")
    write_synthetic(tmp_path / "synthetic", "otherclasses", images, labels, real_shards,
                    classes=["background", "cat"])
    with pytest.raises(ValueError, match=r"otherclasses/train/part-00000.parquet: seglab.classes .* differ"):
        run_stage(tmp_path, real_shards, "otherclasses")
    with pytest.raises(FileNotFoundError, match="nothere/train: no shards"):
        run_stage(tmp_path, real_shards, "nothere")
    with pytest.raises(FileNotFoundError, match="no validation verdict"):
        accepted_synthetic_shards(tmp_path / "synthetic_valid" / "nothere")


# ---- warehouse ---------------------------------------------------------------------------------

def test_warehouse_ingestion_is_idempotent(stage_run, tmp_path):
    stage_dir, summary = stage_run
    summary_path = stage_dir / "reports" / "mygan" / "summary.json"
    db = tmp_path / "warehouse.duckdb"
    for _ in range(2):
        result = ingest_synthetic_validation(db, summary_path)
    assert result == {"gan": "mygan", "params_hash": summary["params_hash"], "accepted": 21, "rejected": 3,
                      "source_file": str(summary_path.resolve())}
    with duckdb.connect(str(db)) as con:
        rows = con.execute("SELECT gan, generator, generator_seed, images, accepted, rejected, success, kid_mean, "
                           "diversity, channel_mean_delta_r FROM synthetic_validation").fetchall()
        assert rows == [("mygan", "mygan", 7, 24, 21, 3, True, pytest.approx(summary["batch"]["kid_mean"]),
                         pytest.approx(summary["batch"]["diversity"]),
                         pytest.approx(summary["batch"]["channel_mean_delta_r"]))]
        by_rule = con.execute("SELECT key, value::INT FROM synthetic_validation, json_each(rejected_by_rule) "
                              "ORDER BY key").fetchall()
        assert by_rule == [("decodable", 1), ("labels_in_class_set", 1), ("not_constant", 1)]

    # Another validation (other params_hash) adds a row; a broken file changes nothing.
    changed = json.loads(summary_path.read_text()) | {"params_hash": "0123456789abcdef"}
    other = tmp_path / "other.json"
    other.write_text(json.dumps(changed))
    ingest_synthetic_validation(db, other)
    del changed["accepted"]
    other.write_text(json.dumps(changed))
    with pytest.raises(SummaryFileError, match=r"other.json: missing field 'accepted'"):
        ingest_synthetic_validation(db, other)
    with duckdb.connect(str(db)) as con:
        assert con.execute("SELECT count(*) FROM synthetic_validation").fetchone()[0] == 2
