"""`train@<model>+<gan>`: real shards plus the synthetic shards validate_synthetic@<gan> accepted.

Tiny data (16 real 40x48 train images, 8 val, 8 synthetic at 16x16), a U-Net at width 0.125 and
32 px, one epoch per run: the file stays at a few tens of seconds on two cores. Real and synthetic
samples are told apart by their labels: every real label map has background (0) on its left
half, which no crop or rotation removes, while a synthetic one is all `car` (3).
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from seglab.config import Config
from seglab.data.classes import ClassSet
from seglab.data.coco import LabelRules, encode_png
from seglab.data.shards import shard_files, shard_metadata, write_manifest, write_shards
from seglab.gan.synthesize import SYNTHETIC_SCHEMA, synthetic_image_id
from seglab.data.synthetic import NONE_ACCEPTED, VALIDATION_FILE
from seglab.train.plan import params_hash, plan_run, training_datasets
from seglab.train.run import run_train

CLASSES = ("background", "cat", "dog", "car")
PALETTE = np.array([[0, 0, 0], [230, 30, 30], [30, 220, 40], [40, 60, 230]], np.uint8)
REAL_TRAIN, REAL_VAL, SYNTHETIC, BATCH = 16, 8, 8, 4
SYNTHETIC_CLASS = 3


def _jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _row(index: int, split: str, label: np.ndarray, rng: np.random.Generator, source: str) -> dict:
    image = PALETTE[np.where(label == 255, 0, label)].astype(np.int16) + rng.integers(-15, 16, (*label.shape, 3))
    counts = np.bincount(label.ravel(), minlength=256)
    height, width = label.shape
    return {"image_id": index, "file_name": f"{index:06d}.jpg", "split": split, "source": source,
            "height": height, "width": width, "orig_height": height, "orig_width": width,
            "image": _jpeg(np.clip(image, 0, 255).astype(np.uint8)), "label": encode_png(label),
            "class_pixels": [int(c) for c in counts[:len(CLASSES)]], "ignore_pixels": int(counts[255])}


def _real_label(rng: np.random.Generator) -> np.ndarray:
    label = np.zeros((40, 48), np.uint8)  # left half background
    label[:, 24:] = rng.choice([1, 2], size=(5, 3)).repeat(8, 0).repeat(8, 1)
    return label


def _write_synthetic(valid_dir: Path, real_dir: Path, gan: str, rng: np.random.Generator) -> None:
    """What validate_synthetic@<gan> writes when it accepts: the real shards' metadata plus the generator's."""
    rows = []
    for n in range(SYNTHETIC):
        row = _row(synthetic_image_id(gan, n), "train", np.full((16, 16), SYNTHETIC_CLASS, np.uint8), rng,
                   f"synthetic:{gan}")
        rows.append({**row, "generator": gan, "generator_seed": 0})
    metadata = {**pq.read_schema(shard_files(real_dir, "train")[0]).metadata, b"seglab.generator": gan.encode()}
    (valid_dir / "train").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SYNTHETIC_SCHEMA.with_metadata(metadata)),
                   valid_dir / "train" / "part-00000.parquet", row_group_size=64)
    write_manifest(valid_dir / "train")
    (valid_dir / VALIDATION_FILE).write_text(json.dumps(
        {"gan": gan, "accepted": SYNTHETIC, "rejected": 0, "decision": f"accepted {SYNTHETIC} of {SYNTHETIC} synthetic samples"}))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """<root>/shards (real), <root>/accepted/pix2pix (validated synthetic), <root>/rejected/pix2pix (none passed)."""
    root = tmp_path_factory.mktemp("augmented")
    rng = np.random.default_rng(0)
    class_set = ClassSet("custom", CLASSES, tuple(range(len(CLASSES))))
    for split, count in (("train", REAL_TRAIN), ("val", REAL_VAL)):
        rows = [_row(i, split, _real_label(rng), rng, "tiny-test") for i in range(count)]
        write_shards(rows, root / "shards" / split, shard_metadata(class_set, split, LabelRules()), 16.0)
    _write_synthetic(root / "accepted" / "pix2pix", root / "shards", "pix2pix", rng)
    rejected = root / "rejected" / "pix2pix"
    rejected.mkdir(parents=True)
    decision = "rejected all 8 synthetic samples: batch rule kid broken"
    (rejected / VALIDATION_FILE).write_text(json.dumps({"gan": "pix2pix", "accepted": 0, "rejected": 8,
                                                        "decision": decision}))
    (rejected / NONE_ACCEPTED).write_text(decision + "\n")
    return root


def make_cfg(data: Path, out: Path, valid: str | Path = "accepted", *, gan: dict | None = None,
             train: dict | None = None) -> Config:
    """Models `tiny` (real data) and `tiny+pix2pix` (train_data `<valid>/pix2pix`; a str is under `data`)."""
    valid = valid if isinstance(valid, Path) else data / valid
    return Config.model_validate({
        "seed": 0,
        "shard": {"out": str(data / "shards")},
        "profile": "tiny",
        "profiles": {"tiny": {"image_size": 32, "batch_size": BATCH, "epochs": 1, "width": 0.125,
                              "learning_rate": 3e-3}},
        "models": {"tiny": {"arch": "unet", "weights": None, "train_data": str(data / "shards")},
                   "tiny+pix2pix": {"arch": "unet", "weights": None, "train_data": str(valid / "pix2pix")}},
        "validate_synthetic": {"out": str(valid)},
        "gan": gan or {},
        "train": {"out": str(out / "models"), "metrics": str(out / "metrics"), "state": str(out / "state"),
                  "mixed_precision": "off", "warmup_epochs": 0, **(train or {})},
    })


def _is_synthetic(labels: np.ndarray) -> np.ndarray:
    """Per element of a batch: a synthetic label map (no background, some `car`)."""
    flat = labels.reshape(len(labels), -1)
    return ~(flat == 0).any(1) & (flat == SYNTHETIC_CLASS).any(1)


def _first_epoch(cfg: Config, name: str) -> tuple[np.ndarray, np.ndarray]:
    plan = plan_run(cfg, name)
    train_data, _ = training_datasets(cfg, plan)
    batches = list(train_data.take(plan.settings.steps_per_epoch))
    return (np.concatenate([np.asarray(b[0]) for b in batches]), np.concatenate([np.asarray(b[1]) for b in batches]))


def test_plan_counts_real_and_accepted_synthetic_images(data, tmp_path):
    cfg = make_cfg(data, tmp_path)
    real, augmented = plan_run(cfg, "tiny"), plan_run(cfg, "tiny+pix2pix")
    assert real.synthetic.augmenter is None and real.synthetic.accepted is None and real.synthetic.rows == 0
    assert real.settings.steps_per_epoch == REAL_TRAIN // BATCH and real.train_dirs == [data / "shards"]
    assert augmented.synthetic.augmenter == "pix2pix" and augmented.synthetic.accepted is True
    assert augmented.synthetic.rows == SYNTHETIC and augmented.shards.rows["train"] == REAL_TRAIN
    assert augmented.settings.steps_per_epoch == (REAL_TRAIN + SYNTHETIC) // BATCH  # an epoch covers both
    assert augmented.train_dirs == [data / "shards", data / "accepted" / "pix2pix"]
    # A resume state is tied to the synthetic data as well.
    assert augmented.run_key["synthetic"] == augmented.synthetic.shards.fingerprint and "synthetic" not in real.run_key


def test_median_frequency_weights_count_the_accepted_synthetic_pixels_too(data, tmp_path):
    cfg = make_cfg(data, tmp_path, train={"class_weights": "median_frequency"})
    real, augmented = plan_run(cfg, "tiny").settings, plan_run(cfg, "tiny+pix2pix").settings
    # Real data: no `car` pixel, so no car weight. Background is half of every real image (freq 0.5),
    # car all of every synthetic one (freq 1): with them, car weighs half what background weighs.
    assert real.class_weights[SYNTHETIC_CLASS] == 0 and real.class_weights[0] > 0
    assert augmented.class_weights[0] / augmented.class_weights[SYNTHETIC_CLASS] == pytest.approx(2.0)
    assert augmented.loss_options["class_weights"] == list(augmented.class_weights)
    assert params_hash(cfg, "tiny") != params_hash(make_cfg(data, tmp_path), "tiny")


def test_an_epoch_mixes_every_real_and_synthetic_image_reproducibly(data, tmp_path):
    cfg = make_cfg(data, tmp_path)
    images, labels = _first_epoch(cfg, "tiny+pix2pix")
    # 24 images, 6 full batches: one pass over the combined rows, each image once.
    assert images.shape == (REAL_TRAIN + SYNTHETIC, 32, 32, 3) and labels.shape == (REAL_TRAIN + SYNTHETIC, 32, 32)
    synthetic = _is_synthetic(labels)
    assert synthetic.sum() == SYNTHETIC and (~synthetic).sum() == REAL_TRAIN
    # Shuffled together, not appended: synthetic images are not all at the end.
    assert not synthetic[:SYNTHETIC].all() and not synthetic[-SYNTHETIC:].all()
    again_images, again_labels = _first_epoch(make_cfg(data, tmp_path), "tiny+pix2pix")
    np.testing.assert_array_equal(images, again_images)
    np.testing.assert_array_equal(labels, again_labels)
    other = make_cfg(data, tmp_path).model_copy(update={"seed": 1})
    assert not np.array_equal(_first_epoch(other, "tiny+pix2pix")[1], labels)
    # The real-data-only model never sees a synthetic image.
    assert not _is_synthetic(_first_epoch(cfg, "tiny")[1]).any()


def test_params_hash_names_the_augmenter_and_only_its_own_gan_settings(data, tmp_path):
    cfg = make_cfg(data, tmp_path)
    real, augmented = params_hash(cfg, "tiny"), params_hash(cfg, "tiny+pix2pix")
    assert real != augmented
    # An explicit train_data equal to shard.out is the same run as an unset one.
    unset = cfg.model_copy(update={"models": {"tiny": cfg.model("tiny").model_copy(update={"train_data": None})}})
    assert params_hash(unset, "tiny") == real
    other_gan = make_cfg(data, tmp_path, gan={"dcgan": {"epochs": 99}})
    own_gan = make_cfg(data, tmp_path, gan={"pix2pix": {"epochs": 99}})
    assert params_hash(other_gan, "tiny+pix2pix") == augmented and params_hash(other_gan, "tiny") == real
    assert params_hash(own_gan, "tiny+pix2pix") != augmented and params_hash(own_gan, "tiny") == real
    # A seed replicate is another run; an entry seed equal to the top-level one is the same run.
    def with_seed(seed):
        return cfg.model_copy(update={"models": {**cfg.models, "tiny": cfg.model("tiny").model_copy(
            update={"seed": seed})}})
    assert params_hash(with_seed(cfg.seed + 1), "tiny") != real
    assert params_hash(with_seed(cfg.seed), "tiny") == real


def test_a_missing_verdict_names_the_stage_to_run(data, tmp_path):
    (tmp_path / "valid" / "pix2pix").mkdir(parents=True)  # the stage never ran: no verdict
    cfg = make_cfg(data, tmp_path, tmp_path / "valid")
    with pytest.raises(FileNotFoundError, match=r"validation.json: no validation verdict; run `dvc repro validate_synthetic"):
        plan_run(cfg, "tiny+pix2pix")


def test_when_every_synthetic_sample_was_rejected_training_uses_real_data_only_and_records_it(data, tmp_path, caplog):
    cfg = make_cfg(data, tmp_path, valid="rejected")
    with caplog.at_level(logging.WARNING, logger="seglab.train"):
        info = run_train(cfg, "tiny+pix2pix", verbose=0)
    assert "train@tiny+pix2pix" in caplog.text and "training on real data only" in caplog.text
    train_json = json.loads((tmp_path / "models" / "tiny+pix2pix" / "train.json").read_text())
    assert train_json == json.loads(json.dumps(info))
    assert train_json["augmenter"] == "pix2pix" and train_json["synthetic_accepted"] is False
    assert train_json["synthetic_images_used"] == 0 and train_json["train_images"] == REAL_TRAIN
    assert train_json["synthetic_decision"].startswith("rejected all 8")
    assert train_json["train_data"] == str(data / "rejected" / "pix2pix")
    metrics = json.loads((tmp_path / "metrics" / "tiny+pix2pix" / "train_metrics.json").read_text())
    assert (metrics["augmenter"], metrics["synthetic_accepted"], metrics["synthetic_images_used"]) == ("pix2pix", False, 0)
    # Real-only steps: 16 images / batch 4 -> 4 steps x 4 images per epoch.
    assert plan_run(cfg, "tiny+pix2pix").settings.steps_per_epoch == REAL_TRAIN // BATCH


def test_accepted_synthetic_images_are_counted_in_train_json(data, tmp_path, caplog):
    cfg = make_cfg(data, tmp_path, train={"class_weights": "median_frequency"})
    with caplog.at_level(logging.INFO, logger="seglab.train"):
        run_train(cfg, "tiny+pix2pix", verbose=0)
    assert f"{REAL_TRAIN} real + {SYNTHETIC} synthetic images" in caplog.text
    assert f"median-frequency class weights over {REAL_TRAIN + SYNTHETIC} training images" in caplog.text
    train_json = json.loads((tmp_path / "models" / "tiny+pix2pix" / "train.json").read_text())
    assert train_json["augmenter"] == "pix2pix" and train_json["synthetic_accepted"] is True
    assert train_json["synthetic_images_used"] == SYNTHETIC and train_json["train_images"] == REAL_TRAIN
    assert train_json["dataset"] == "tiny-test"  # the real data's name: what runs are compared on
    assert train_json["params_hash"] == params_hash(cfg, "tiny+pix2pix")
    # The weights the loss used, over real and synthetic pixels (car weighs half of background).
    assert train_json["class_weights"] == list(plan_run(cfg, "tiny+pix2pix").settings.class_weights)
    assert train_json["class_weights"][0] == pytest.approx(2 * train_json["class_weights"][SYNTHETIC_CLASS])
