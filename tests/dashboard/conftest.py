"""A small real warehouse for the dashboard tests, built the way the pipeline builds it.

eval.json files following the evaluate stage's contract (scores computed from seeded confusion
matrices, so every number is consistent) are ingested with `seglab.warehouse.ingest`; PNG
artefacts and GAN samples are drawn beside them. No TensorFlow import: the fixture stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageDraw

from seglab.warehouse import ingest, schema
from seglab.warehouse.ingest import ingest_files, open_warehouse
from tests.factories import eval_entry, eval_run, scores_of, write_eval

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


def _entry(name: str, variant: str, arch, backbone, weights, augmenter, matrix, *, epochs: int,
           rng: np.random.Generator, members=None) -> dict:
    """One eval.json entry (`tests.factories`): scores from `matrix`, a training curve for plain runs."""
    miou = scores_of(matrix)["means"]["miou"]
    history = []
    if variant == "plain":
        for epoch in range(1, epochs + 1):
            progress = epoch / epochs
            history.append({
                "epoch": epoch, "loss": 1.6 - 1.1 * progress + rng.normal(0, 0.02),
                "miou": miou * (0.4 + 0.65 * progress),
                "val_loss": 1.7 - 1.0 * progress + rng.normal(0, 0.03),
                "val_miou": miou * (0.35 + 0.65 * progress),
                "lr": 1e-3 * 0.5 * (1 + np.cos(np.pi * progress)) + 1e-6,
            })
    run = eval_run(
        name, variant, arch=arch or "ensemble", backbone=backbone, weights=weights,
        weights_loaded="random" if weights is None else "sha256:b0353104",
        width=1.0 if backbone else 0.25, epochs_planned=epochs, epochs_run=epochs, best_epoch=epochs,
        best_val_miou=miou, seconds_per_epoch=3.0 + len(name) / 10, train_seconds=epochs * (3.0 + len(name) / 10),
        train_images_per_second=40.0, param_count=1_900_000 if backbone else 480_000,
        trainable_param_count=1_800_000, classes=CLASSES, class_set=CLASS_SET, dataset=DATASET,
        augmenter=augmenter, created_at="2025-01-01T00:00:00+00:00", evaluated_at="2025-01-01T00:10:00+00:00",
        images_per_second=120.0 if variant == "plain" else 24.0, latency_ms_p50=8.0, latency_ms_p90=9.5,
    )
    if members:
        run.update(members=members, weights=[0.5, 0.5], arch=None, backbone=None)
    return eval_entry(run, matrix, history=history)


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
        paths.append(write_eval(out / "eval.json", entries))
        if name == "unet":  # the others show the "no prediction grid" state
            _png(out / "predictions.png", (360, 240), 1, "image / truth / prediction")
            _png(out / "confusion.png", (240, 240), 2, "confusion")
            _png(out / "confusion_tta.png", (240, 240), 3, "confusion (tta)")
    ensemble = _entry("ensemble", "ensemble", None, None, None, None, _confusion(rng, 0.84, None),
                      epochs=0, rng=rng, members=["unet", "deeplabv3plus_mobilenetv2_imagenet"])
    paths.append(write_eval(fixture.eval_dir / "ensemble" / "eval.json", [ensemble]))

    con = open_warehouse(fixture.warehouse)
    try:
        ingest_files(con, paths)
        # Two validation reports of the GAN gate, as `seglab.warehouse.synthetic` ingests them.
        for gan, rejected in (("dcgan", 3), ("sagan", 0)):
            con.execute(
                "INSERT INTO synthetic_validation (gan, params_hash, validated_at, images, accepted, rejected, "
                "rejected_per_image, rejected_by_batch, rejected_by_rule, success, batch_success, decision, "
                "source_file, ingested_at, summary) VALUES (?, 'p0', '2025-01-01T00:20:00Z', 64, ?, ?, ?, 0, "
                "'{}', true, true, 'accepted', 'summary.json', '2025-01-01T00:30:00Z', '{}')",
                [gan, 64 - rejected, rejected, rejected])
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
        paths.append(write_eval(root / name / "eval.json", entries))
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
