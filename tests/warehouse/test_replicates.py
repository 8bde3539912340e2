"""Schema 3: the seed-replicate views (seed_summary, augmenter_effect, augmenter_effect_per_class),
their query functions and `seglab report`, checked against values computed by hand from the
fixture below (scores are given directly, not derived, so every expected number is visible)."""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

import pytest

from seglab.cli import main
from tests.factories import eval_entry, eval_run, write_eval
from seglab.warehouse import (
    SchemaError,
    augmenter_effect,
    augmenter_effect_per_class,
    connect_read_only,
    ingest_files,
    latest_runs,
    open_warehouse,
    schema,
    seed_summary,
)

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["background", "person", "car", "dog"]
BASE = "unet_mobilenetv2_imagenet"

# Per-class IoU of the real-only replicates and their `+pix2pix` counterparts, by seed (None:
# undefined, the class absent from truth and prediction). car is undefined everywhere; dog is
# undefined in base seed 1 and augmented seed 2, so only seed 0 pairs for it.
BASE_IOU = {0: [0.90, 0.50, None, 0.20], 1: [0.92, 0.40, None, None], 2: [0.94, 0.30, None, 0.40]}
PIX2PIX_IOU = {0: [0.91, 0.55, None, 0.30], 1: [0.90, 0.45, None, 0.50], 2: [0.97, 0.30, None, None]}

# name -> seed, augmenter, arch, miou, mdice, accuracy, per-class IoU, synthetic_images_used
RUNS = {
    BASE: (0, None, "unet_mobilenetv2", 0.40, 0.50, 0.80, BASE_IOU[0], None),
    f"{BASE}_s1": (1, None, "unet_mobilenetv2", 0.42, 0.60, 0.80, BASE_IOU[1], None),
    f"{BASE}_s2": (2, None, "unet_mobilenetv2", 0.44, 0.70, 0.83, BASE_IOU[2], None),
    f"{BASE}+pix2pix": (0, "pix2pix", "unet_mobilenetv2", 0.45, 0.55, 0.85, PIX2PIX_IOU[0], 40),
    f"{BASE}_s1+pix2pix": (1, "pix2pix", "unet_mobilenetv2", 0.43, 0.55, 0.85, PIX2PIX_IOU[1], 60),
    f"{BASE}_s2+pix2pix": (2, "pix2pix", "unet_mobilenetv2", 0.50, 0.55, 0.85, PIX2PIX_IOU[2], 20),
    # dcgan: seed 0 pairs with the base; seed 5 has no real-only replicate.
    f"{BASE}+dcgan": (0, "dcgan", "unet_mobilenetv2", 0.38, 0.50, 0.80, [0.85, 0.45, None, 0.25], 0),
    f"{BASE}_s5+dcgan": (5, "dcgan", "unet_mobilenetv2", 0.41, 0.50, 0.80, [0.88, 0.46, None, 0.20], 0),
    # A configuration without replicates: n = 1, so no standard deviation.
    "deeplabv3plus_mobilenetv2_imagenet": (0, None, "deeplabv3plus_mobilenetv2", 0.47, 0.61, 0.88,
                                           [0.9, 0.6, None, 0.5], None),
}


def entry(name: str, seed: int | None, augmenter: str | None, arch: str, miou: float, mdice: float,
          accuracy: float, ious: list, synthetic: int | None, *, variant: str = "plain",
          params_hash: str = "p0", evaluated_at: str = "2025-03-01T12:00:00Z",
          dataset: str = "sample", epochs: int = 4) -> dict:
    """One eval.json run entry (`tests.factories`); a class with undefined IoU has no pixels."""
    run = eval_run(name, variant, arch=arch, backbone="mobilenetv2", weights="imagenet",
                   weights_loaded="sha256:abc", width=0.5, batch_size=8, epochs_planned=epochs, epochs_run=epochs,
                   seed=seed, params_hash=params_hash, dataset=dataset, classes=CLASSES, param_count=123_456,
                   evaluated_at=evaluated_at, augmenter=augmenter, synthetic_images_used=synthetic)
    return eval_entry(run, ious=ious, metrics={"miou": miou, "mdice": mdice, "accuracy": accuracy})


def write(root: Path, name: str, entries: list[dict]) -> Path:
    return write_eval(root / "eval" / name / "eval.json", entries)


def fixture_files(root: Path) -> list[Path]:
    paths = [write(root, name, [entry(name, *spec)]) for name, spec in RUNS.items()]
    # An earlier evaluation of the base with other settings: not `latest`, so never counted.
    paths.append(write(root, "older", [entry(BASE, 0, None, "unet_mobilenetv2", 0.99, 0.99, 0.99,
                                             BASE_IOU[0], None, params_hash="old",
                                             evaluated_at="2024-01-01T00:00:00Z")]))
    # A TTA run: filtered out by variant='plain', its own configuration otherwise.
    paths.append(write(root, "tta", [entry(BASE, 0, None, "unet_mobilenetv2", 0.46, 0.5, 0.8,
                                           BASE_IOU[0], None, variant="tta")]))
    return paths


def build(root: Path) -> Path:
    db = root / "warehouse.duckdb"
    con = open_warehouse(db)
    try:
        ingest_files(con, fixture_files(root))
    finally:
        con.close()
    return db


@pytest.fixture
def warehouse(tmp_path) -> Path:
    return build(tmp_path)


@pytest.fixture
def con(warehouse):
    connection = connect_read_only(warehouse)
    yield connection
    connection.close()


def approx(value):
    return pytest.approx(value, abs=1e-12)


# ---- views and query functions ----------------------------------------------------------------

def test_seed_summary_is_mean_and_sample_std_over_the_replicates(con):
    summary = seed_summary(con, variant="plain")
    base = summary[(summary["arch"] == "unet_mobilenetv2") & summary["augmenter"].isna()].iloc[0]
    assert list(base["models"]) == [BASE, f"{BASE}_s1", f"{BASE}_s2"]
    assert list(base["seeds"]) == [0, 1, 2] and base["n"] == 3
    # mIoU 0.40, 0.42, 0.44 (the older 0.99 run is not the latest); mDice 0.5, 0.6, 0.7;
    # accuracy 0.80, 0.80, 0.83.
    assert base["miou_mean"] == approx(0.42) and base["miou_std"] == approx(0.02)
    assert base["mdice_mean"] == approx(0.6) and base["mdice_std"] == approx(0.1)
    assert base["accuracy_mean"] == approx(0.81) and base["accuracy_std"] == approx(math.sqrt(0.0003))
    assert (base["dataset"], base["class_set"], base["variant"], base["weights"], base["width"],
            base["image_size"], base["batch_size"], base["epochs_planned"]) == (
        "sample", "voc20", "plain", "imagenet", 0.5, 128, 8, 4)

    single = summary[summary["arch"] == "deeplabv3plus_mobilenetv2"].iloc[0]
    assert single["n"] == 1 and single["miou_mean"] == approx(0.47)
    assert all(single[f"{m}_std"] is None or math.isnan(single[f"{m}_std"]) for m in ("miou", "mdice", "accuracy"))
    assert con.execute("SELECT miou_std FROM seed_summary WHERE n = 1 AND arch LIKE 'deeplab%'").fetchall() == [(None,)]

    unet = summary[summary["arch"] == "unet_mobilenetv2"]
    by_augmenter = unet.set_index(unet["augmenter"].fillna("none"))
    assert list(by_augmenter.loc["dcgan", "seeds"]) == [0, 5]
    assert by_augmenter.loc["pix2pix", "miou_mean"] == approx(statistics.mean([0.45, 0.43, 0.50]))
    assert by_augmenter.loc["pix2pix", "miou_std"] == approx(statistics.stdev([0.45, 0.43, 0.50]))
    # Ordered by mean mIoU; the TTA run is its own configuration, and filters apply.
    assert summary["miou_mean"].is_monotonic_decreasing
    assert len(summary) == 4 and len(seed_summary(con)) == 5
    assert seed_summary(con, variant="tta")["n"].tolist() == [1]
    assert seed_summary(con, dataset="coco").empty and seed_summary(con, class_set="all80").empty


def test_augmenter_effect_pairs_runs_by_seed(con):
    effect = augmenter_effect(con, variant="plain").set_index("augmenter")
    assert sorted(effect.index) == ["dcgan", "pix2pix"]
    pix = effect.loc["pix2pix"]
    deltas = [0.45 - 0.40, 0.43 - 0.42, 0.50 - 0.44]  # seeds 0, 1, 2
    assert pix["n_pairs"] == 3 and list(pix["seeds"]) == [0, 1, 2]
    assert pix["delta_miou_mean"] == approx(0.04)
    assert pix["delta_miou_std"] == approx(math.sqrt(0.0007)) == approx(statistics.stdev(deltas))
    assert pix["base_miou_mean"] == approx(0.42) and pix["base_miou_std"] == approx(0.02)
    assert pix["augmented_miou_mean"] == approx(statistics.mean([0.45, 0.43, 0.50]))
    assert pix["synthetic_images_used"] == approx(40.0)  # mean of 40, 60, 20
    # dcgan: seed 5 has no real-only replicate, so one pair (seed 0) and no std.
    dcgan = effect.loc["dcgan"]
    assert dcgan["n_pairs"] == 1 and list(dcgan["seeds"]) == [0]
    assert dcgan["delta_miou_mean"] == approx(0.38 - 0.40) and math.isnan(dcgan["delta_miou_std"])
    assert dcgan["synthetic_images_used"] == 0
    pairs = con.execute("SELECT augmented_name, base_name FROM augmenter_pairs WHERE variant = 'plain' "
                        "ORDER BY augmented_name").fetchall()
    assert pairs == [(f"{BASE}+dcgan", BASE), (f"{BASE}+pix2pix", BASE),
                     (f"{BASE}_s1+pix2pix", f"{BASE}_s1"), (f"{BASE}_s2+pix2pix", f"{BASE}_s2")]
    assert augmenter_effect(con, variant="tta").empty  # the TTA base has no augmented TTA run


def test_pairing_goes_by_seed_not_name_and_prefers_the_named_base_among_duplicates(tmp_path):
    ious = [0.9, 0.5, 0.4, 0.3]
    specs = {
        "base_a": (0, None, 0.30), "base_b": (1, None, 0.50), "base_c": (2, None, 0.70),
        # Same configuration and seed as base_b: a duplicate; base_b+x is named after base_b.
        "aaa_duplicate": (1, None, 0.10),
        "base_b+x": (1, "x", 0.55), "z_other+x": (2, "x", 0.80), "y_other+x": (0, "x", 0.35),
        # Another epoch budget is another configuration: no pair for seed 3, and none across.
        "longer+x": (0, "x", 0.99),
    }
    paths = []
    for name, (seed, augmenter, miou) in specs.items():
        paths.append(write(tmp_path, name, [entry(name, seed, augmenter, "unet", miou, 0.5, 0.8, ious, 10,
                                                  epochs=8 if name == "longer+x" else 4)]))
    db = tmp_path / "w.duckdb"
    con = open_warehouse(db)
    ingest_files(con, paths)
    pairs = dict(con.execute("SELECT augmented_name, base_name FROM augmenter_pairs").fetchall())
    assert pairs == {"y_other+x": "base_a", "base_b+x": "base_b", "z_other+x": "base_c"}
    row = con.execute("SELECT n_pairs, delta_miou_mean FROM augmenter_effect WHERE epochs_planned = 4").fetchall()
    assert row == [(3, approx(statistics.mean([0.05, 0.05, 0.10])))]
    con.close()


def test_per_class_effect_skips_pairs_with_an_undefined_iou(con):
    table = augmenter_effect_per_class(con, variant="plain")
    pix = table[table["augmenter"] == "pix2pix"].set_index("class_name")
    assert list(pix.index) == CLASSES  # every class, in class order

    def deltas(c):
        return [PIX2PIX_IOU[s][c] - BASE_IOU[s][c] for s in (0, 1, 2)]

    assert pix.loc["background", "n_pairs"] == 3
    assert pix.loc["background", "delta_iou_mean"] == approx(statistics.mean(deltas(0)))
    assert pix.loc["background", "delta_iou_std"] == approx(statistics.stdev(deltas(0)))
    assert pix.loc["person", "delta_iou_mean"] == approx(statistics.mean(deltas(1)))
    assert pix.loc["person", "base_iou_mean"] == approx(0.40)
    # car: undefined in every pair.
    assert pix.loc["car", "n_pairs"] == 0 and math.isnan(pix.loc["car", "delta_iou_mean"])
    # dog: seed 1 lacks the base IoU, seed 2 the augmented one; only seed 0 (0.30 - 0.20) counts,
    # and the means of both sides are over that pair alone.
    dog = pix.loc["dog"]
    assert dog["n_pairs"] == 1 and dog["delta_iou_mean"] == approx(0.10) and math.isnan(dog["delta_iou_std"])
    assert dog["base_iou_mean"] == approx(0.20) and dog["augmented_iou_mean"] == approx(0.30)
    dcgan = table[table["augmenter"] == "dcgan"].set_index("class_name")
    assert dcgan["n_pairs"].tolist() == [1, 1, 0, 1]
    assert dcgan.loc["background", "delta_iou_mean"] == approx(0.85 - 0.90)


def test_latest_runs_carry_the_seed(con):
    runs = latest_runs(con, variant="plain")
    assert len(runs) == len(RUNS) and runs["miou"].is_monotonic_decreasing
    assert runs.set_index("name").loc[f"{BASE}_s2", "seed"] == 2
    assert runs.set_index("name").loc[BASE, "miou"] == approx(0.40)  # not the older 0.99


# ---- migration ----------------------------------------------------------------------------------

def test_a_version_2_warehouse_gains_the_views(tmp_path, monkeypatch):
    db = tmp_path / "v2.duckdb"
    with monkeypatch.context() as patch:
        patch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:2])
        patch.setattr(schema, "SCHEMA_VERSION", 2)
        con = open_warehouse(db)
        ingest_files(con, fixture_files(tmp_path))
        assert schema.schema_version(con) == 2
        con.close()
    # Read-only, a version-2 warehouse is not migrated: the report's queries say what to do.
    con = connect_read_only(db)
    with pytest.raises(SchemaError, match=r"no 'seed_summary' view.*seglab ingest"):
        seed_summary(con)
    con.close()
    assert main(["report", "--warehouse", str(db)]) == 1

    con = open_warehouse(db)
    assert schema.schema_version(con) == schema.SCHEMA_VERSION >= 3
    assert schema.ensure_schema(con) == schema.SCHEMA_VERSION  # each migration applied once
    assert con.execute("SELECT count(*) FROM schema_version").fetchone() == (schema.SCHEMA_VERSION,)
    row = con.execute("SELECT n, miou_mean, miou_std FROM seed_summary WHERE variant = 'plain' "
                      "AND augmenter IS NULL AND arch = 'unet_mobilenetv2'").fetchall()
    assert row == [(3, approx(0.42), approx(0.02))]
    con.close()


# ---- seglab report --------------------------------------------------------------------------------

def test_report_prints_the_seven_sections(warehouse, capsys):
    assert main(["report", "--warehouse", str(warehouse), "--variant", "plain"]) == 0
    out = capsys.readouterr().out
    sections = re.findall(r"^## (.+)$", out, flags=re.MULTILINE)
    assert sections == ["Latest runs", "Constant-prediction reference", "IoU per class", "Training curves",
                        "Seed replicates", "Augmenter effect on mIoU", "Augmenter effect per class (IoU)"]
    assert "No run with a training history for these filters." in out  # the fixture's runs have none
    # Each fixture class with an IoU has 100 pixels: the constant prediction (ties: the lowest
    # index, background) scores 100/300 / 3 with dog present and 100/200 / 2 without it.
    constant = out.split("## Constant-prediction reference")[1].split("##")[0]
    assert "| sample | voc20 | val | letterbox | 128 | background | 0.333 | 3 | 0.1111 |" in constant
    assert "| sample | voc20 | val | letterbox | 128 | background | 0.500 | 2 | 0.2500 |" in constant
    per_class_iou = out.split("## IoU per class")[1].split("## Seed")[0]
    assert "| name | variant | background | person | car | dog |" in per_class_iou
    assert f"| {BASE}_s1 | plain | 0.920 | 0.400 | — | — |" in per_class_iou
    assert "| deeplabv3plus_mobilenetv2_imagenet | plain | 0.900 | 0.600 | — | 0.500 |" in per_class_iou
    latest = out.split("## Latest runs")[1].split("##")[0]
    rows = [line for line in latest.splitlines() if line.startswith(f"| {BASE}")]
    # Best mIoU first: s2+pix2pix 0.50, +pix2pix 0.45, s2 0.44, s1+pix2pix 0.43, s1 0.42, ...
    assert [r.split("|")[1].strip() for r in rows][:5] == [
        f"{BASE}_s2+pix2pix", f"{BASE}+pix2pix", f"{BASE}_s2", f"{BASE}_s1+pix2pix", f"{BASE}_s1"]
    assert (f"| {BASE}_s1 | plain | unet_mobilenetv2 | imagenet | 0.5 | — | 1 | 0.420 | 0.600 | 0.800 "
            "| 123,456 | 12.5 | 30.0 |") in out
    assert "| 0.420 ± 0.020 (n=3) | 0.600 ± 0.100 (n=3) | 0.810 ± 0.017 (n=3) |" in out
    assert f"| {BASE}, {BASE}_s1, {BASE}_s2 | 0, 1, 2 |" in out
    assert "| 0.470 (n=1) |" in out  # the single DeepLab: no std
    assert "| pix2pix | 0, 1, 2 | 0.420 ± 0.020 (n=3) | 0.460 ± 0.036 (n=3) | +0.040 ± 0.026 (n=3) | 40 |" in out
    assert "| dcgan | 0 | 0.400 (n=1) | 0.380 (n=1) | -0.020 (n=1) | 0 |" in out
    assert "trained on real data only" in out
    per_class = out.split("## Augmenter effect per class (IoU)")[1]
    assert "### sample / voc20 (val, letterbox), plain: unet_mobilenetv2, weights imagenet, width 0.5, 128 px, " \
           "batch 8, 4 epochs" in per_class
    assert "| class | dcgan | pix2pix |" in per_class
    assert "| dog | +0.050 (n=1) | +0.100 (n=1) |" in per_class
    assert "| car | — (n=0) | — (n=0) |" in per_class
    assert "| background | -0.050 (n=1) | +0.007 ± 0.025 (n=3) |" in per_class
    assert "dataset" not in latest.splitlines()[2]  # one dataset: no dataset column


def test_report_lists_each_trained_runs_validation_curve(tmp_path, capsys):
    db = tmp_path / "curves.duckdb"
    con = open_warehouse(db)
    curve = [0.10, 0.25, 0.2]
    run = eval_run(BASE, "plain", arch="unet_mobilenetv2", classes=CLASSES, epochs_planned=3, epochs_run=3,
                   best_epoch=2)
    tta = eval_run(BASE, "tta", arch="unet_mobilenetv2", classes=CLASSES)
    history = [{"epoch": i + 1, "loss": 1.0 - i / 10, "val_miou": v} for i, v in enumerate(curve)]
    means = {"miou": 0.5, "mdice": 0.6, "accuracy": 0.8}
    ingest_files(con, [write(tmp_path, BASE, [
        eval_entry(run, ious=[0.9, 0.5, None, 0.2], metrics=means, history=history),
        eval_entry(tta, ious=[0.9, 0.5, None, 0.3], metrics=means)])])
    con.close()
    assert main(["report", "--warehouse", str(db)]) == 0
    curves = capsys.readouterr().out.split("## Training curves")[1].split("##")[0]
    assert "| name | best epoch | epochs | val mIoU after each epoch |" in curves
    assert f"| {BASE} | 2 | 3 | 0.100 0.250 0.200 |" in curves
    assert curves.count(f"| {BASE} |") == 1  # the TTA run shares the plain run's training


def test_report_reads_the_warehouse_path_from_params_and_writes_out_atomically(tmp_path, warehouse, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(f"warehouse:\n  path: {warehouse}\n")
    assert main(["--params", str(params), "report", "--variant", "tta"]) == 0
    printed = capsys.readouterr().out
    out = tmp_path / "reports" / "report.md"
    assert main(["--params", str(params), "report", "--variant", "tta", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary == {"report": str(out), "warehouse": str(warehouse), "runs": 1, "configurations": 1,
                       "augmenter_effects": 0}
    assert out.read_text() == printed
    assert sorted(p.name for p in out.parent.iterdir()) == ["report.md"]  # no temporary left
    assert "No augmented runs." in printed  # no TTA run is augmented: sections (c) and (d) say so
    assert printed.count("No augmented runs.") == 2


def test_report_on_an_empty_warehouse_and_unpaired_augmented_runs(tmp_path, capsys):
    empty = tmp_path / "empty.duckdb"
    open_warehouse(empty).close()
    assert main(["report", "--warehouse", str(empty)]) == 0
    out = capsys.readouterr().out
    assert "No runs in the warehouse for these filters." in out and "No model runs" in out
    lonely = tmp_path / "lonely.duckdb"
    con = open_warehouse(lonely)
    ingest_files(con, [write(tmp_path, "lonely", [entry(f"{BASE}+dcgan", 3, "dcgan", "unet", 0.4, 0.5, 0.8,
                                                        [0.9, 0.5, 0.4, 0.3], 10)])])
    con.close()
    assert main(["report", "--warehouse", str(lonely)]) == 0
    assert "No augmented run has a real-only run with the same configuration and seed" in capsys.readouterr().out


def test_a_missing_warehouse_is_a_clear_bad_input_error(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "warehouse.duckdb"
    assert main(["report", "--warehouse", str(missing)]) == 1
    err = capsys.readouterr().err
    assert str(missing) in err and "dvc repro" in err and "Traceback" not in err
    params = tmp_path / "params.yaml"
    params.write_text(f"warehouse:\n  path: {missing}\n")
    assert main(["--params", str(params), "report", "--out", str(tmp_path / "r.md")]) == 1
    assert str(missing) in capsys.readouterr().err and not (tmp_path / "r.md").exists()


# ---- docs -----------------------------------------------------------------------------------------

def test_the_replicate_sql_in_docs_runs_on_a_warehouse_with_replicates(con):
    blocks = [sql for sql in re.findall(r"```sql\n(.*?)```", (REPO / "docs" / "sql.md").read_text(), flags=re.DOTALL)
              if re.search(r"\b(seed_summary|augmenter_effect\w*|augmenter_pairs)\b", sql)]
    assert len(blocks) >= 3
    for sql in blocks:
        assert con.execute(sql).fetchall(), sql
