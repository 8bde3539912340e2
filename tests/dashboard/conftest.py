"""A small real warehouse for the dashboard tests, built the way the pipeline builds it.

eval.json files following the evaluate stage's contract (scores computed from seeded confusion
matrices, so every number is consistent) are ingested with `seglab.warehouse.ingest`; PNG
artefacts and GAN samples are drawn beside them. No TensorFlow import: the fixture stays fast.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageDraw

from seglab.warehouse import ingest, schema
from seglab.warehouse.ingest import ingest_files, open_warehouse

REPO = Path(__file__).resolve().parents[2]
APP = REPO / "dashboards" / "app.py"

CLASSES = ["background", "person", "car", "dog", "cat", "chair", "bottle", "bus"]
DATASET = "embedded-sample"
CLASS_SET = "voc8-test"

# name -> (arch, backbone, weights, accuracy of the simulated model, augmenter)
MODELS = {
    "unet": ("unet", None, None, 0.55, None),
    "deeplabv3plus_mobilenetv2_imagenet": ("deeplabv3plus_mobilenetv2", "mobilenetv2", "imagenet-offline", 0.8, None),
    "deeplabv3plus_mobilenetv2_scratch": ("deeplabv3plus_mobilenetv2", "mobilenetv2", None, 0.6, None),
    "unet_dcgan": ("unet", None, None, 0.62, "dcgan"),
}


@dataclass
class FixtureWarehouse:
    root: Path
    warehouse: Path
    eval_dir: Path
    gan_dir: Path
    classes: list[str] = field(default_factory=lambda: list(CLASSES))
    runs: list[dict] = field(default_factory=list)  # {run_id, name, variant, miou}

    def env(self) -> dict[str, str]:
        return {"SEGLAB_WAREHOUSE": str(self.warehouse), "SEGLAB_EVAL_DIR": str(self.eval_dir),
                "SEGLAB_GAN_DIR": str(self.gan_dir)}

    def run(self, name: str, variant: str) -> dict:
        return next(r for r in self.runs if r["name"] == name and r["variant"] == variant)


def _confusion(rng: np.random.Generator, quality: float, absent: int | None) -> np.ndarray:
    """Truth pixels per class, `quality` of each row on the diagonal, the rest spread randomly."""
    size = len(CLASSES)
    support = rng.integers(2_000, 20_000, size=size)
    support[0] = 60_000
    if absent is not None:
        support[absent] = 0  # a class missing from the validation split: undefined scores
    matrix = np.zeros((size, size), dtype=np.int64)
    for t in range(size):
        if support[t] == 0:
            continue
        keep = rng.uniform(quality - 0.15, min(0.98, quality + 0.15))
        matrix[t, t] = int(support[t] * keep)
        others = [p for p in range(size) if p != t and p != absent]
        spread = rng.multinomial(support[t] - matrix[t, t], rng.dirichlet(np.ones(len(others))))
        matrix[t, others] = spread
    return matrix


def _scores(matrix: np.ndarray) -> dict:
    """Per-class and macro scores of a confusion matrix (rows truth); NaN where undefined."""
    tp = np.diag(matrix).astype(float)
    support, predicted = matrix.sum(axis=1), matrix.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (support + predicted - tp)
        dice = 2 * tp / (support + predicted)
        precision = tp / predicted
        recall = tp / support
    present = (support + predicted) > 0
    return {"iou": iou, "dice": dice, "precision": precision, "recall": recall,
            "support": support, "predicted": predicted,
            "miou": np.nanmean(iou[present]), "mdice": np.nanmean(dice[present]),
            "mprecision": np.nanmean(precision[present]), "mrecall": np.nanmean(recall[present]),
            "miou_fg": np.nanmean(iou[1:][present[1:]]), "accuracy": tp.sum() / matrix.sum()}


def _entry(name: str, variant: str, arch, backbone, weights, augmenter, matrix, *, epochs: int,
           rng: np.random.Generator, members=None) -> dict:
    scores = _scores(matrix)
    params_hash = hashlib.sha256(f"{name}-params".encode()).hexdigest()
    run_id = hashlib.sha256(f"{name}{variant}{params_hash}".encode()).hexdigest()[:16]
    nan_to_none = lambda v: None if v is None or not np.isfinite(v) else float(v)  # noqa: E731
    per_class = []
    pixels = int(matrix.sum())
    for i, cls in enumerate(CLASSES):
        tp = int(matrix[i, i])
        fp = int(scores["predicted"][i]) - tp
        fn = int(scores["support"][i]) - tp
        per_class.append({
            "class_index": i, "class_name": cls,
            "iou": nan_to_none(scores["iou"][i]), "dice": nan_to_none(scores["dice"][i]),
            "precision": nan_to_none(scores["precision"][i]), "recall": nan_to_none(scores["recall"][i]),
            "accuracy": (pixels - fp - fn) / pixels,
            "support": int(scores["support"][i]), "predicted": int(scores["predicted"][i]),
        })
    history = []
    if variant == "plain":
        for epoch in range(1, epochs + 1):
            progress = epoch / epochs
            history.append({
                "epoch": epoch, "loss": 1.6 - 1.1 * progress + rng.normal(0, 0.02),
                "miou": scores["miou"] * (0.4 + 0.65 * progress),
                "val_loss": 1.7 - 1.0 * progress + rng.normal(0, 0.03),
                "val_miou": scores["miou"] * (0.35 + 0.65 * progress),
                "lr": 1e-3 * 0.5 * (1 + np.cos(np.pi * progress)) + 1e-6,
            })
    run = {
        "run_id": run_id, "name": name, "variant": variant, "split": "val", "model": name,
        "arch": arch, "backbone": backbone, "weights": weights,
        "weights_loaded": "random" if weights is None else "sha256:b0353104",
        "width": 1.0 if backbone else 0.25, "image_size": 128, "batch_size": 8,
        "epochs_planned": epochs, "epochs_run": epochs, "best_epoch": epochs,
        "best_val_miou": float(scores["miou"]), "seconds_per_epoch": 3.0 + len(name) / 10,
        "train_seconds": epochs * (3.0 + len(name) / 10), "train_images_per_second": 40.0,
        "param_count": 1_900_000 if backbone else 480_000, "trainable_param_count": 1_800_000,
        "classes": CLASSES, "class_set": CLASS_SET, "dataset": DATASET,
        "train_images": 120, "val_images": 40, "seed": 0, "params_hash": params_hash,
        "mixed_precision": "off", "strategy": "default", "replicas": 1, "git_rev": None,
        "created_at": "2025-01-01T00:00:00+00:00", "evaluated_at": "2025-01-01T00:10:00+00:00",
        "images_per_second": 120.0 if variant == "plain" else 24.0,
        "latency_ms_p50": 8.0, "latency_ms_p90": 9.5,
    }
    if augmenter:
        run["augmenter"] = augmenter
    if variant == "tta":
        run["tta"] = ["identity", "hflip", "vflip", "rot90", "rot270"]
    if members:
        run.update(members=members, weights=[0.5, 0.5], arch=None, backbone=None)
    metrics = {k: nan_to_none(scores[k]) for k in ("miou", "mdice", "mprecision", "mrecall", "accuracy", "miou_fg")}
    return {"run": run, "metrics": metrics, "per_class": per_class, "confusion": matrix.tolist(),
            "history": history}


def _png(path: Path, size: tuple[int, int], seed: int, text: str) -> None:
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", size, (40, 40, 40))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y = int(rng.integers(0, size[0] - 20)), int(rng.integers(0, size[1] - 20))
        draw.rectangle([x, y, x + int(rng.integers(10, 60)), y + int(rng.integers(10, 60))],
                       fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    draw.text((6, 6), text, fill=(255, 255, 255))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def build_fixture_warehouse(root: Path) -> FixtureWarehouse:
    rng = np.random.default_rng(0)
    data = root / "data"
    fixture = FixtureWarehouse(root=root, warehouse=data / "warehouse.duckdb",
                               eval_dir=data / "eval", gan_dir=data / "gan")
    paths = []
    for name, (arch, backbone, weights, quality, augmenter) in MODELS.items():
        entries = [
            _entry(name, variant, arch, backbone, weights, augmenter,
                   _confusion(rng, quality + (0.03 if variant == "tta" else 0.0), absent=7 if name == "unet" else None),
                   epochs=5, rng=rng)
            for variant in ("plain", "tta")
        ]
        out = fixture.eval_dir / name
        out.mkdir(parents=True)
        (out / "eval.json").write_text(json.dumps({"runs": entries}))
        paths.append(out / "eval.json")
        if name == "unet":  # the others show the "no prediction grid" state
            _png(out / "predictions.png", (360, 240), 1, "image / truth / prediction")
            _png(out / "confusion.png", (240, 240), 2, "confusion")
    ensemble = _entry("ensemble", "ensemble", None, None, None, None, _confusion(rng, 0.84, None),
                      epochs=0, rng=rng, members=["unet", "deeplabv3plus_mobilenetv2_imagenet"])
    (fixture.eval_dir / "ensemble").mkdir()
    (fixture.eval_dir / "ensemble" / "eval.json").write_text(json.dumps({"runs": [ensemble]}))
    paths.append(fixture.eval_dir / "ensemble" / "eval.json")

    con = open_warehouse(fixture.warehouse)
    try:
        ingest_files(con, paths)
        # What the GAN stages will add: a table the dashboard shows without knowing its columns.
        con.execute("CREATE TABLE synthetic_validation (gan VARCHAR, images INTEGER, passed INTEGER, "
                    "expectation_failures INTEGER)")
        con.execute("INSERT INTO synthetic_validation VALUES ('dcgan', 64, 61, 3), ('sagan', 64, 64, 0)")
        fixture.runs = [dict(zip(("run_id", "name", "variant", "miou"), row)) for row in con.execute(
            "SELECT run_id, name, variant, miou FROM leaderboard ORDER BY miou DESC").fetchall()]
        con.execute("CHECKPOINT")
    finally:
        con.close()
    for epoch in (1, 2, 3):
        _png(fixture.gan_dir / "dcgan" / "samples" / f"epoch_{epoch:03d}.png", (256, 128), 10 + epoch,
             f"dcgan epoch {epoch}")
    return fixture


@pytest.fixture(scope="session")
def fixture_warehouse(tmp_path_factory) -> FixtureWarehouse:
    return build_fixture_warehouse(tmp_path_factory.mktemp("dashboard"))


@pytest.fixture(scope="session")
def empty_warehouse(tmp_path_factory) -> Path:
    """A warehouse with the schema and no runs (what `open_warehouse` creates)."""
    path = tmp_path_factory.mktemp("dashboard_empty") / "warehouse.duckdb"
    open_warehouse(path).close()
    return path


# A base model, a same-arch run that scores higher (not the base the variant is named after) and
# the `+pix2pix` variant, whose synthetic data the gate rejected (synthetic_images_used 0).
AUGMENTED_WAREHOUSE = {
    "unet_mobilenetv2_imagenet": (0.6, None),
    "unet_mobilenetv2_imagenet_longer": (0.9, None),
    "unet_mobilenetv2_imagenet+pix2pix": (0.7, "pix2pix"),
}


def build_augmented_warehouse(root: Path, schema_version: int = schema.SCHEMA_VERSION) -> Path:
    """`AUGMENTED_WAREHOUSE`'s runs (plain and tta) ingested into `<root>/warehouse.duckdb`; with
    schema_version 1 the way a warehouse looked before runs had the augmenter columns."""
    rng = np.random.default_rng(3)
    paths = []
    for name, (quality, augmenter) in AUGMENTED_WAREHOUSE.items():
        entries = [_entry(name, variant, "unet_mobilenetv2", "mobilenetv2", "imagenet-offline", augmenter,
                          _confusion(rng, quality, None), epochs=2, rng=rng) for variant in ("plain", "tta")]
        if augmenter:
            for entry in entries:
                entry["run"].update(synthetic_images_used=0, synthetic_accepted=False)
        path = root / name / "eval.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"runs": entries}))
        paths.append(path)
    with pytest.MonkeyPatch.context() as patch:
        if schema_version == 1:  # as ingested before runs had the augmenter columns (run_json only)
            patch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:1])
            patch.setattr(schema, "SCHEMA_VERSION", 1)
            patch.setitem(ingest._TABLE_SCHEMAS, "runs", pa.schema(
                [f for f in ingest._RUNS_SCHEMA if f.name not in ("augmenter", "synthetic_images_used")]))
        con = ingest.open_warehouse(root / "warehouse.duckdb")
        try:
            ingest.ingest_files(con, paths)
        finally:
            con.close()
    return root / "warehouse.duckdb"
