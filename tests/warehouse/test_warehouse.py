"""DuckDB warehouse: ingestion of eval.json files (contract of issue 4), idempotence, atomicity
under errors and kills, and the read-side queries checked against independently computed answers."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

from seglab.config import Config
from seglab.warehouse import (
    EvalFileError,
    SchemaError,
    WarehouseError,
    compare_runs,
    confusion,
    connect_read_only,
    deeplab_beats_unet,
    ensure_schema,
    history,
    ingest_eval,
    leaderboard,
    open_warehouse,
    per_class_matrix,
    run_ingest,
    worst_classes,
)
from seglab.warehouse.schema import SCHEMA_VERSION, SYNTHETIC_VALIDATION_TABLE, TABLES
from tests.factories import eval_entry, eval_run, scores_of, write_eval

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["background", "person", "car", "dog", "cat", "bird"]
ABSENT = 5  # "bird": in no truth and no prediction, so every score of it is undefined
HISTORY_METRICS = ("loss", "miou", "val_loss", "val_miou", "lr")

# (name, arch, variants, dataset, quality): quality scales the diagonal, so runs differ.
MODELS = [
    ("unet", "unet", ("plain", "tta"), "sample", 3.0),
    ("attention_unet", "attention_unet", ("plain",), "sample", 4.0),
    ("deeplabv3plus_mobilenetv2_imagenet", "deeplabv3plus_mobilenetv2", ("plain", "tta"), "sample", 5.0),
    ("deeplabv3plus_resnet50", "deeplabv3plus_resnet50", ("plain",), "sample", 2.0),
    # Best of all but on other data: must never be compared with the sample's runs.
    ("deeplabv3plus_xception", "deeplabv3plus_xception", ("plain",), "coco-mini", 50.0),
]


# ---- fixture eval.json files, written per the contract ------------------------------------------

def make_run(name, arch, variant, dataset, quality, rng, *, params_hash="p0", epochs=4):
    """One eval.json entry (`tests.factories`) from a seeded confusion matrix; `quality` scales its diagonal."""
    cm = rng.integers(0, 40, size=(len(CLASSES), len(CLASSES)))
    cm[np.diag_indices(len(CLASSES))] = (rng.integers(50, 400, size=len(CLASSES)) * quality).astype(int)
    cm[ABSENT, :] = 0
    cm[:, ABSENT] = 0
    hist = []
    if variant == "plain":
        hist = [{"epoch": e, **{m: round(float(rng.random()), 6) for m in HISTORY_METRICS}}
                for e in range(epochs)]
    run = eval_run(
        name, variant, arch=arch, backbone=arch.split("_", 1)[1] if "_" in arch else None,
        weights="imagenet-offline" if name.endswith("imagenet") else None,
        weights_loaded="sha256:abc" if name.endswith("imagenet") else "random",
        epochs_planned=epochs, epochs_run=epochs, best_epoch=epochs - 1,
        best_val_miou=scores_of(cm)["means"]["miou"], param_count=int(1000 * quality),
        trainable_param_count=int(900 * quality), classes=CLASSES, dataset=dataset, params_hash=params_hash,
        mixed_precision="off", images_per_second=30.0 + quality, evaluated_at="2025-01-02T04:00:00Z",
    )
    # ABSENT is in no truth and no prediction: every score of it, accuracy too, is undefined here.
    return eval_entry(run, cm, history=hist, accuracy_of_absent=None)


def make_ensemble(rng):
    entry = make_run("ensemble", "ensemble", "ensemble", "sample", 6.0, rng)
    run = entry["run"]
    run["arch"] = run["backbone"] = run["model"] = None
    run["members"] = ["unet", "deeplabv3plus_mobilenetv2_imagenet"]
    run["weights"] = [0.4, 0.6]
    return entry


def write_raw_eval(path: Path, entries: list[dict]) -> Path:
    """An eval.json written without `seglab.records`' checks: what a foreign or broken writer leaves."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"runs": entries}, indent=1))
    return path


@pytest.fixture
def evals(tmp_path) -> dict[str, dict]:
    """data/eval/<name>/eval.json for every fixture model and the ensemble; returns the documents."""
    rng = np.random.default_rng(0)
    docs = {}
    for name, arch, variants, dataset, quality in MODELS:
        docs[name] = {"runs": [make_run(name, arch, v, dataset, quality, rng) for v in variants]}
    docs["ensemble"] = {"runs": [make_ensemble(rng)]}
    for name, doc in docs.items():
        write_eval(tmp_path / "eval" / name / "eval.json", doc["runs"])
    return docs


def cfg_for(tmp_path) -> Config:
    # Every input path in tmp_path: after `make repro` the defaults (data/...) hold real reports.
    return Config.model_validate({"evaluate": {"out": str(tmp_path / "eval")},
                                  "validate_synthetic": {"report": str(tmp_path / "synthetic_reports")},
                                  "warehouse": {"path": str(tmp_path / "wh" / "warehouse.duckdb")}})


@pytest.fixture
def warehouse(tmp_path, evals) -> Path:
    cfg = cfg_for(tmp_path)
    run_ingest(cfg)
    return cfg.warehouse.path


def all_runs(docs) -> list[dict]:
    return [entry for doc in docs.values() for entry in doc["runs"]]


def snapshot(db: Path) -> dict[str, list]:
    """Every table's content, sorted: what 'the database is unchanged' compares."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        return {t: sorted(con.execute(f"SELECT * EXCLUDE (ingested_at) FROM {t}" if t == "runs"
                                      else f"SELECT * FROM {t}").fetchall(), key=repr)
                for t in TABLES}
    finally:
        con.close()


def same(a, b) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and math.isclose(a, b, rel_tol=1e-12))


# ---- ingestion --------------------------------------------------------------------------------

def test_ingest_writes_every_table_with_the_right_rows_and_values(tmp_path, evals):
    cfg = cfg_for(tmp_path)
    summary = run_ingest(cfg)
    entries = all_runs(evals)
    n_runs = len(entries)
    assert summary["files"] == len(evals) and summary["runs"] == n_runs
    expected_rows = {
        "runs": n_runs,
        "metrics": sum(len(e["metrics"]) for e in entries),
        "per_class": n_runs * len(CLASSES),
        "confusion": sum(int(np.count_nonzero(e["confusion"])) for e in entries),
        "history": sum(len(e["history"]) * len(HISTORY_METRICS) for e in entries),
        SYNTHETIC_VALIDATION_TABLE: 0,  # no GAN validation reports here
    }
    assert summary["rows"] == expected_rows
    assert not list(cfg.warehouse.path.parent.glob("*.wal"))  # checkpointed into one file

    con = connect_read_only(cfg.warehouse.path)
    entry = evals["unet"]["runs"][0]
    run_id = entry["run"]["run_id"]
    row = con.execute("SELECT name, variant, arch, dataset, class_set, classes, num_classes, weights, "
                      "param_count, latency_ms_p90, evaluated_at, run_json->>'$.strategy' "
                      "FROM runs WHERE run_id = ?", [run_id]).fetchone()
    assert row[:10] == ("unet", "plain", "unet", "sample", "voc20", CLASSES, 6, None, 3000, 25.5)
    assert row[10].isoformat().startswith("2025-01-02") and row[11] == "OneDeviceStrategy"

    got = dict(con.execute("SELECT metric, value FROM metrics WHERE run_id = ? AND split = 'val'",
                           [run_id]).fetchall())
    assert got.keys() == entry["metrics"].keys()
    assert all(same(got[k], v) for k, v in entry["metrics"].items())

    per_class = con.execute("SELECT class_index, class_name, iou, dice, precision, recall, accuracy, "
                            "support, predicted FROM per_class WHERE run_id = ? ORDER BY class_index",
                            [run_id]).fetchall()
    for stored, fixture in zip(per_class, entry["per_class"], strict=True):
        assert stored[:2] == (fixture["class_index"], fixture["class_name"])
        assert all(same(a, fixture[k]) for a, k in zip(stored[2:7], ("iou", "dice", "precision", "recall", "accuracy")))
        assert stored[7:] == (fixture["support"], fixture["predicted"])
    # The absent class stays undefined (NULL), not 0 or 1.
    assert per_class[ABSENT][2:7] == (None,) * 5

    np.testing.assert_array_equal(confusion(con, run_id).to_numpy(), np.array(entry["confusion"]))
    hist = history(con, run_id)
    assert list(hist.columns) == ["epoch", *sorted(HISTORY_METRICS)]
    assert hist["epoch"].tolist() == list(range(len(entry["history"])))
    np.testing.assert_allclose(hist[list(HISTORY_METRICS)].to_numpy(),
                               [[h[m] for m in HISTORY_METRICS] for h in entry["history"]])
    assert history(con, evals["unet"]["runs"][1]["run"]["run_id"]).columns.tolist() == ["epoch"]  # tta

    ens = con.execute("SELECT members, member_weights, weights, arch FROM runs WHERE variant = 'ensemble'").fetchall()
    assert ens == [(["unet", "deeplabv3plus_mobilenetv2_imagenet"], [0.4, 0.6], None, None)]
    con.close()


def test_reingesting_is_idempotent(tmp_path, evals, warehouse):
    before = snapshot(warehouse)
    run_ingest(cfg_for(tmp_path))
    ingest_eval(warehouse, tmp_path / "eval" / "unet" / "eval.json")
    assert snapshot(warehouse) == before


def test_a_changed_eval_json_replaces_the_runs_old_values(tmp_path, evals, warehouse):
    path = tmp_path / "eval" / "unet" / "eval.json"
    doc = copy.deepcopy(evals["unet"])
    plain = doc["runs"][0]
    run_id = plain["run"]["run_id"]
    plain["metrics"]["miou"] = 0.123
    plain["per_class"][1]["iou"] = None
    plain["history"] = plain["history"][:2]
    write_eval(path, doc["runs"])
    summary = ingest_eval(warehouse, path)
    assert summary["runs"] == sorted(e["run"]["run_id"] for e in doc["runs"]) and summary["removed_runs"] == []

    con = connect_read_only(warehouse)
    assert con.execute("SELECT value FROM metrics WHERE run_id = ? AND metric = 'miou'", [run_id]).fetchall() == [(0.123,)]
    assert con.execute("SELECT iou FROM per_class WHERE run_id = ? AND class_index = 1", [run_id]).fetchall() == [(None,)]
    assert con.execute("SELECT count(DISTINCT epoch) FROM history WHERE run_id = ?", [run_id]).fetchone() == (2,)
    con.close()

    # New settings -> new run_ids: by default the earlier runs stay, as history, and the
    # leaderboard's `latest` picks the newer ones.
    old_ids = {e["run"]["run_id"] for e in doc["runs"]}
    new_doc = [make_run("unet", "unet", v, "sample", 3.0, np.random.default_rng(1), params_hash="p1")
               for v in ("plain", "tta")]
    for entry in new_doc:
        entry["run"]["evaluated_at"] = "2025-02-01T00:00:00+00:00"
    new_ids = {e["run"]["run_id"] for e in new_doc}
    write_eval(path, new_doc)
    assert ingest_eval(warehouse, path)["removed_runs"] == []
    con = connect_read_only(warehouse)
    assert set(leaderboard(con, latest_only=False).query("name == 'unet'")["run_id"]) == old_ids | new_ids
    assert set(leaderboard(con).query("name == 'unet'")["run_id"]) == new_ids
    assert set(per_class_matrix(con).index.get_level_values("run_id")) & old_ids == set()
    con.close()

    # replace_source: the file's earlier runs go, everywhere.
    summary = ingest_eval(warehouse, path, replace_source=True)
    assert set(summary["removed_runs"]) == old_ids
    con = connect_read_only(warehouse)
    for table in TABLES:
        leftover = con.execute(f"SELECT count(*) FROM {table} WHERE list_contains(?, run_id)", [sorted(old_ids)]).fetchone()
        assert leftover == (0,), table
    assert set(r[0] for r in con.execute("SELECT run_id FROM runs WHERE name = 'unet'").fetchall()) == new_ids
    con.close()


def test_mirror_drops_runs_whose_eval_json_is_gone_but_keeps_foreign_ones(tmp_path, evals, warehouse):
    foreign = write_eval(tmp_path / "elsewhere" / "eval.json",
                         [make_run("unet", "unet", "plain", "sample", 3.0, np.random.default_rng(2), params_hash="x")])
    ingest_eval(warehouse, foreign)
    (tmp_path / "eval" / "attention_unet" / "eval.json").unlink()

    def names():
        con = connect_read_only(warehouse)
        try:
            return sorted(r[0] for r in con.execute("SELECT name FROM runs").fetchall())
        finally:
            con.close()

    assert run_ingest(cfg_for(tmp_path))["removed_runs"] == 0
    assert "attention_unet" in names()  # kept by default
    assert run_ingest(cfg_for(tmp_path), mirror=True)["removed_runs"] == 1
    assert "attention_unet" not in names()
    assert names().count("unet") == 3  # plain, tta and the foreign run


def test_csv_text_in_history_and_nan_values_are_read(tmp_path, warehouse):
    entry = make_run("csvrun", "unet", "plain", "sample", 3.0, np.random.default_rng(3))
    entry["history"] = [{"epoch": "0", "loss": "0.5", "lr": ""}, {"epoch": 1, "loss": 0.25, "lr": 1e-3}]
    entry["metrics"]["mprecision"] = float("nan")  # json writes NaN; it must become NULL
    path = write_raw_eval(tmp_path / "other" / "eval.json", [entry])
    ingest_eval(warehouse, path)
    con = connect_read_only(warehouse)
    run_id = entry["run"]["run_id"]
    hist = history(con, run_id)
    assert hist["epoch"].tolist() == [0, 1] and hist["loss"].tolist() == [0.5, 0.25]
    assert math.isnan(hist["lr"].iloc[0]) and hist["lr"].iloc[1] == 1e-3  # "" is a missing value
    assert con.execute("SELECT value FROM metrics WHERE run_id = ? AND metric = 'mprecision'", [run_id]).fetchone() == (None,)
    assert json.loads(con.execute("SELECT run_json FROM runs WHERE run_id = ?", [run_id]).fetchone()[0])["name"] == "csvrun"
    con.close()


def _bad(mutate):
    def make(entry):
        entry = copy.deepcopy(entry)
        mutate(entry)
        return json.dumps({"runs": [entry]})
    return make


BAD_FILES = {
    "missing run field": (_bad(lambda e: e["run"].pop("dataset")), r"runs\[0\]\.run: field 'dataset' is missing"),
    "missing per-class field": (_bad(lambda e: e["per_class"][3].pop("dice")), r"runs\[0\]\.per_class\[3\]: field 'dice' is missing"),
    "wrong type": (_bad(lambda e: e["run"].update(param_count="many")), r"runs\[0\]\.run\.param_count: expected an integer"),
    "score out of range": (_bad(lambda e: e["per_class"][2].update(iou=1.5)), r"runs\[0\]\.per_class\[2\]\.iou: expected a value in \[0, 1\]"),
    "class name mismatch": (_bad(lambda e: e["per_class"][1].update(class_name="horse")), r"per_class\[1\]\.class_name: 'horse' but the run's class 1 is 'person'"),
    "missing class": (_bad(lambda e: e["per_class"].pop()), r"runs\[0\]\.per_class: no entry for class index\(es\) \[5\]"),
    "confusion not square": (_bad(lambda e: e["confusion"][0].pop()), r"runs\[0\]\.confusion\[0\]: expected 6 counts"),
    "confusion disagrees": (_bad(lambda e: e["confusion"][1].__setitem__(0, e["confusion"][1][0] + 1)), r"confusion\[1\]: row sums to \d+ pixels but per_class support"),
    "missing metrics miou": (_bad(lambda e: e["metrics"].pop("miou")), r"runs\[0\]\.metrics: field 'miou' is missing"),
    "infinite metric": (_bad(lambda e: e["metrics"].update(mdice=float("inf"))), r"runs\[0\]\.metrics\.mdice: expected a finite number"),
    "bad timestamp": (_bad(lambda e: e["run"].update(evaluated_at="yesterday")), r"runs\[0\]\.run\.evaluated_at: expected an ISO 8601"),
    "duplicate epoch": (_bad(lambda e: e["history"].append(dict(e["history"][0]))), r"runs\[0\]\.history\[4\]\.epoch: epoch 0 is listed twice"),
    "malformed JSON": (lambda entry: '{"runs": [', r"not valid JSON: .* line 1"),
    "no runs": (lambda entry: '{"runs": []}', r"runs: is empty"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_bad_eval_json_names_file_and_field_and_changes_nothing(tmp_path, evals, warehouse, case):
    make, message = BAD_FILES[case]
    before = snapshot(warehouse)
    # The bad file is one of several: run_ingest checks them all before writing any.
    bad = tmp_path / "eval" / "unet" / "eval.json"
    bad.write_text(make(evals["unet"]["runs"][0]))
    with pytest.raises(EvalFileError, match=re.escape(str(bad)) + ": " + ".*" + message):
        run_ingest(cfg_for(tmp_path))
    with pytest.raises(EvalFileError, match=message):
        ingest_eval(warehouse, bad)
    assert snapshot(warehouse) == before


def test_the_same_run_in_two_files_is_refused(tmp_path, evals, warehouse):
    before = snapshot(warehouse)
    write_eval(tmp_path / "eval" / "copy" / "eval.json", evals["unet"]["runs"][:1])
    with pytest.raises(EvalFileError, match=r"eval.json: run_id '\w+' is also in .*eval.json"):
        run_ingest(cfg_for(tmp_path))
    assert snapshot(warehouse) == before


def test_missing_eval_folder_and_missing_file_are_clear_errors(tmp_path, warehouse):
    with pytest.raises(EvalFileError, match=r"none: no \*/eval.json to ingest"):
        run_ingest(Config.model_validate({"evaluate": {"out": str(tmp_path / "none")},
                                          "warehouse": {"path": str(warehouse)}}))
    with pytest.raises(EvalFileError, match=r"missing\.json: not found"):
        ingest_eval(warehouse, tmp_path / "missing.json")


KILLED_INGEST = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from seglab.warehouse import ingest
    from seglab.warehouse.schema import TABLES

    insert = ingest._insert
    inserted = []

    def insert_then_stall(con, table, rows):
        insert(con, table, rows)
        inserted.append(table)
        if len(inserted) == len(TABLES):  # every delete and insert of the transaction is done
            seen = con.execute("SELECT value FROM metrics WHERE run_id = ? AND metric = 'miou'",
                               [sys.argv[3]]).fetchone()[0]
            Path(sys.argv[4]).write_text(json.dumps({"miou_inside_transaction": seen}))
            time.sleep(120)

    ingest._insert = insert_then_stall
    ingest.ingest_eval(sys.argv[1], sys.argv[2])
""")


def test_a_kill_mid_transaction_leaves_the_previous_state(tmp_path, evals, warehouse):
    before = snapshot(warehouse)
    doc = copy.deepcopy(evals["unet"])
    run_id = doc["runs"][0]["run"]["run_id"]
    doc["runs"][0]["metrics"]["miou"] = 0.999
    # A long history (> one DuckDB row group of 122880 rows) so that the transaction writes
    # data blocks to the database file before its commit.
    doc["runs"][0]["history"] = [{"epoch": e, "loss": 1.0 / (e + 1), "miou": 0.5, "val_loss": 0.1,
                                  "val_miou": 0.4, "lr": 1e-4} for e in range(30_000)]
    path = write_eval(tmp_path / "eval" / "unet" / "eval.json", doc["runs"])
    marker = tmp_path / "inside.json"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_INGEST, str(warehouse), str(path), run_id, str(marker)],
                            cwd=REPO, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(f"ingest subprocess ended early: {proc.stderr.read().decode()}")
            assert time.monotonic() < deadline, "ingest subprocess never reached its transaction"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # Inside the transaction the new value was already in place...
    assert json.loads(marker.read_text()) == {"miou_inside_transaction": 0.999}
    # ...yet the reopened database holds exactly the previous state.
    assert snapshot(warehouse) == before
    # And it is writable again: the same ingest now completes.
    ingest_eval(warehouse, path)
    con = connect_read_only(warehouse)
    assert con.execute("SELECT value FROM metrics WHERE run_id = ? AND metric = 'miou'", [run_id]).fetchone() == (0.999,)
    assert con.execute("SELECT count(*) FROM history WHERE run_id = ?", [run_id]).fetchone() == (30_000 * 5,)
    con.close()


# ---- schema and connections ---------------------------------------------------------------------

def test_schema_is_versioned_and_migrations_are_idempotent(tmp_path, warehouse):
    con = open_warehouse(warehouse)
    assert ensure_schema(con) == SCHEMA_VERSION
    assert con.execute("SELECT count(*) FROM schema_version").fetchone() == (SCHEMA_VERSION,)
    con.execute("INSERT INTO schema_version (version, description) VALUES (?, 'from the future')", [SCHEMA_VERSION + 1])
    with pytest.raises(SchemaError, match=f"schema version {SCHEMA_VERSION + 1}"):
        ensure_schema(con)
    con.close()
    with pytest.raises(SchemaError, match="newer than this seglab"):
        connect_read_only(warehouse)


def test_augmented_runs_carry_their_augmenter_into_runs_and_the_leaderboard(tmp_path, evals, warehouse):
    rng = np.random.default_rng(5)
    runs = [make_run("unet+pix2pix", "unet", v, "sample", 3.5, rng) for v in ("plain", "tta")]
    for entry in runs:
        entry["run"].update(augmenter="pix2pix", synthetic_images_used=0, synthetic_accepted=False)
    ingest_eval(warehouse, write_eval(tmp_path / "eval" / "unet+pix2pix" / "eval.json", runs))
    con = connect_read_only(warehouse)
    rows = con.execute("SELECT name, variant, augmenter, synthetic_images_used FROM runs "
                       "WHERE name LIKE 'unet%' ORDER BY name, variant").fetchall()
    assert rows == [("unet", "plain", None, None), ("unet", "tta", None, None),
                    ("unet+pix2pix", "plain", "pix2pix", 0), ("unet+pix2pix", "tta", "pix2pix", 0)]
    board = leaderboard(con, variant="plain")
    assert board.set_index("name").loc["unet+pix2pix", "augmenter"] == "pix2pix"
    assert pd.isna(board.set_index("name").loc["unet", "augmenter"])
    # Fields without a column stay in run_json.
    assert con.execute("SELECT DISTINCT run_json->>'$.synthetic_accepted' FROM runs WHERE name = 'unet+pix2pix'"
                       ).fetchall() == [("false",)]
    con.close()
    bad = copy.deepcopy(runs)
    bad[0]["run"]["augmenter"] = 7
    with pytest.raises(EvalFileError, match=r"runs\[0\]\.run\.augmenter: expected a non-empty string"):
        ingest_eval(warehouse, write_raw_eval(tmp_path / "bad" / "eval.json", bad))


def test_a_version_1_warehouse_gains_the_augmenter_columns_backfilled_from_run_json(tmp_path, monkeypatch):
    from seglab.warehouse import schema

    path = tmp_path / "v1.duckdb"
    monkeypatch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:1])
    monkeypatch.setattr(schema, "SCHEMA_VERSION", 1)
    con = open_warehouse(path)
    for run_id, run_json in (("a", {"augmenter": "dcgan", "synthetic_images_used": 40}), ("b", {})):
        con.execute("INSERT INTO runs (run_id, name, variant, split, dataset, class_set, classes, num_classes, "
                    "source_file, source_sha256, ingested_at, run_json) "
                    "VALUES (?, ?, 'plain', 'val', 'sample', 'voc20', ['background'], 1, 'f', 's', now(), ?)",
                    [run_id, f"run_{run_id}", json.dumps(run_json)])
    assert "augmenter" not in con.execute("SELECT * FROM runs").df().columns
    con.close()
    monkeypatch.undo()

    con = open_warehouse(path)
    assert schema.schema_version(con) == SCHEMA_VERSION >= 2
    assert con.execute("SELECT run_id, augmenter, synthetic_images_used FROM runs ORDER BY run_id").fetchall() == [
        ("a", "dcgan", 40), ("b", None, None)]
    assert "augmenter" in con.execute("SELECT * FROM leaderboard").df().columns
    assert ensure_schema(con) == SCHEMA_VERSION  # applied once
    con.close()


def test_a_version_3_warehouse_keeps_the_synthetic_validation_rows_made_outside_the_migrations(tmp_path, monkeypatch):
    from seglab.warehouse import schema

    path = tmp_path / "v3.duckdb"
    monkeypatch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:3])
    monkeypatch.setattr(schema, "SCHEMA_VERSION", 3)
    con = open_warehouse(path)
    # Before version 4 the GAN stage's ingest created the table itself, with the same DDL.
    con.execute(schema._V4_SYNTHETIC_VALIDATION)
    con.execute("INSERT INTO synthetic_validation (gan, params_hash, validated_at, images, accepted, rejected, "
                "rejected_per_image, rejected_by_batch, rejected_by_rule, success, batch_success, decision, "
                "source_file, ingested_at, summary) VALUES ('dcgan', 'p', now(), 4, 3, 1, 1, 0, '{}', true, true, "
                "'accepted', 'f', now(), '{}')")
    con.close()
    monkeypatch.undo()

    con = open_warehouse(path)
    assert schema.schema_version(con) == SCHEMA_VERSION >= 4
    assert con.execute("SELECT gan, accepted FROM synthetic_validation").fetchall() == [("dcgan", 3)]
    con.close()
    # A warehouse from before the table existed gains it empty.
    monkeypatch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:3])
    monkeypatch.setattr(schema, "SCHEMA_VERSION", 3)
    open_warehouse(tmp_path / "bare.duckdb").close()
    monkeypatch.undo()
    con = open_warehouse(tmp_path / "bare.duckdb")
    assert schema.table_exists(con, "synthetic_validation")
    assert con.execute("SELECT count(*) FROM synthetic_validation").fetchall() == [(0,)]
    con.close()


def test_a_version_4_warehouse_gains_the_evaluation_columns_and_keeps_every_row(tmp_path, evals, monkeypatch):
    from seglab.warehouse import schema

    path = tmp_path / "v4.duckdb"
    with monkeypatch.context() as patch:  # a warehouse built before schema version 5
        patch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:4])
        patch.setattr(schema, "SCHEMA_VERSION", 4)
        con = open_warehouse(path)
        from seglab.warehouse.ingest import ingest_files
        ingest_files(con, sorted((tmp_path / "eval").glob("*/eval.json")))
        assert "eval_protocol" not in con.execute("SELECT * FROM runs").df().columns
        before = {t: con.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0] for t in TABLES}
        con.close()
        # Read-only, it is not migrated: the protocol filter says how to upgrade, the rest still reads.
        con = connect_read_only(path)
        with pytest.raises(SchemaError, match=r"schema version 4.*protocols.*seglab ingest"):
            leaderboard(con, protocol="full")
        assert len(leaderboard(con, split="val")) == len(all_runs(evals))
        con.close()

    con = open_warehouse(path)
    assert schema.schema_version(con) == SCHEMA_VERSION >= 5
    assert {t: con.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0] for t in TABLES} == before
    # They evaluated their model's own val split, letterboxed: so says the backfill.
    assert con.execute("SELECT count(*) FROM runs WHERE train_dataset = dataset AND eval_protocol = 'letterbox'"
                       ).fetchall() == [(before["runs"],)]
    board = leaderboard(con, protocol="letterbox")
    assert len(board) == len(all_runs(evals)) and board["latest"].all()
    assert {"train_dataset", "eval_protocol"} <= set(board.columns)
    assert ensure_schema(con) == SCHEMA_VERSION  # applied once
    con.close()


def test_runs_on_other_splits_and_protocols_are_kept_apart(tmp_path, evals, warehouse):
    # The same model evaluated on its val split (letterbox, then full) and on a test split (full).
    rng = np.random.default_rng(7)
    entries = []
    for split, protocol, quality in (("val", "full", 9.0), ("test", "full", 1.0)):
        entry = make_run("unet", "unet", "plain", "sample", quality, rng)
        entry["run"] |= {"split": split, "eval_protocol": protocol, "train_dataset": "sample",
                         "run_id": f"unet-{split}-{protocol}"}
        entries.append(entry)
    ingest_eval(warehouse, write_eval(tmp_path / "eval" / "unet@sample.test" / "eval.json", entries))
    con = connect_read_only(warehouse)
    try:
        unet = leaderboard(con, dataset="sample", variant="plain").query("name == 'unet'")
        # One latest run per split and protocol: the letterbox run is not superseded by the full one.
        assert sorted(zip(unet["split"], unet["eval_protocol"], unet["run_id"])) == [
            ("test", "full", "unet-test-full"), ("val", "full", "unet-val-full"),
            ("val", "letterbox", evals["unet"]["runs"][0]["run"]["run_id"])]
        assert leaderboard(con, split="test")["run_id"].tolist() == ["unet-test-full"]
        assert leaderboard(con, split="val", protocol="full")["run_id"].tolist() == ["unet-val-full"]
        assert per_class_matrix(con, split="test").index.get_level_values("run_id").tolist() == ["unet-test-full"]
        assert set(worst_classes(con, 2, split="val", protocol="full")["run_id"]) == {"unet-val-full"}
    finally:
        con.close()


def test_read_only_connection_refuses_writes_and_missing_or_foreign_files_are_named(tmp_path, warehouse):
    con = connect_read_only(warehouse)
    with pytest.raises(duckdb.Error, match="read-only"):
        con.execute("DELETE FROM runs")
    con.close()
    with pytest.raises(WarehouseError, match=r"nope\.duckdb: no warehouse there"):
        connect_read_only(tmp_path / "nope.duckdb")
    other = tmp_path / "other.duckdb"
    duckdb.connect(str(other)).close()
    with pytest.raises(SchemaError, match="not a seglab warehouse"):
        connect_read_only(other)
    junk = tmp_path / "junk.duckdb"
    junk.write_bytes(b"not a database" * 500)
    with pytest.raises(WarehouseError, match=r"junk\.duckdb: cannot open"):
        connect_read_only(junk)


def test_a_warehouse_held_by_a_writer_is_a_clear_error_for_readers(tmp_path, warehouse):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); print('open', flush=True); "
                               "time.sleep(60)", str(warehouse)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"open"
        with pytest.raises(WarehouseError, match=r"warehouse\.duckdb: opened by another process \(writing\)"):
            connect_read_only(warehouse)
    finally:
        holder.kill()
        holder.wait()
    writer = open_warehouse(warehouse)  # the same process, another mode
    with pytest.raises(WarehouseError, match="already open in this process"):
        connect_read_only(warehouse)
    writer.close()


# ---- queries: checked against answers computed here from the fixture documents -------------------

def _sample_runs(evals, variant=None):
    return [e for e in all_runs(evals)
            if e["run"]["dataset"] == "sample" and (variant is None or e["run"]["variant"] == variant)]


def test_leaderboard_orders_by_miou_and_filters(evals, warehouse):
    con = connect_read_only(warehouse)
    board = leaderboard(con)
    assert len(board) == len(all_runs(evals))
    assert board["miou"].is_monotonic_decreasing
    assert board.iloc[0]["name"] == "deeplabv3plus_xception"
    sample = leaderboard(con, dataset="sample", variant="plain")
    expected = sorted(_sample_runs(evals, "plain"), key=lambda e: -e["metrics"]["miou"])
    assert sample["run_id"].tolist() == [e["run"]["run_id"] for e in expected]
    np.testing.assert_allclose(sample["accuracy"], [e["metrics"]["accuracy"] for e in expected])
    assert {"mdice", "param_count", "seconds_per_epoch", "images_per_second", "dataset", "class_set"} <= set(board.columns)
    assert leaderboard(con, class_set="all80").empty
    con.close()


def test_per_class_matrix_is_runs_by_classes(evals, warehouse):
    con = connect_read_only(warehouse)
    matrix = per_class_matrix(con, "dice", dataset="sample")
    runs = _sample_runs(evals)
    assert matrix.shape == (len(runs), len(CLASSES)) and list(matrix.columns) == CLASSES
    by_id = {e["run"]["run_id"]: e for e in runs}
    for (name, variant, run_id), row in matrix.iterrows():
        want = [np.nan if p["dice"] is None else p["dice"] for p in by_id[run_id]["per_class"]]
        np.testing.assert_allclose(row.to_numpy(), want)
        assert by_id[run_id]["run"]["name"] == name
    assert matrix["bird"].isna().all()
    # The best `top` runs (of the `variants` asked for), picked in DuckDB: the full matrix's first rows.
    plain = matrix[matrix.index.get_level_values("variant") == "plain"]
    pd.testing.assert_frame_equal(per_class_matrix(con, "dice", dataset="sample", variants=["plain"], top=2),
                                  plain.head(2))
    with pytest.raises(ValueError, match="metric must be one of"):
        per_class_matrix(con, "iou; DROP TABLE runs")
    with pytest.raises(ValueError, match="top must be a positive integer"):
        per_class_matrix(con, top=0)
    con.close()


def test_compare_runs_gives_per_class_deltas(evals, warehouse):
    con = connect_read_only(warehouse)
    a, b = evals["unet"]["runs"][0], evals["deeplabv3plus_resnet50"]["runs"][0]
    table = compare_runs(con, a["run"]["run_id"], b["run"]["run_id"])
    assert table["class_name"].tolist() == CLASSES
    for i, row in table.iterrows():
        if a["per_class"][i]["iou"] is None:
            assert math.isnan(row["iou_delta"])
        else:
            assert row["iou_delta"] == pytest.approx(b["per_class"][i]["iou"] - a["per_class"][i]["iou"])
    with pytest.raises(WarehouseError, match="no run 'nope'"):
        compare_runs(con, "nope", b["run"]["run_id"])
    con.close()


def test_compare_runs_refuses_different_class_lists(tmp_path, warehouse):
    entry = make_run("other", "unet", "plain", "sample", 3.0, np.random.default_rng(4))
    entry["run"]["classes"] = [*CLASSES[:-1], "horse"]
    entry["per_class"][-1]["class_name"] = "horse"
    ingest_eval(warehouse, write_eval(tmp_path / "x" / "eval.json", [entry]))
    con = connect_read_only(warehouse)
    other_id = con.execute("SELECT run_id FROM runs WHERE name = 'attention_unet'").fetchone()[0]
    with pytest.raises(WarehouseError, match="different class lists"):
        compare_runs(con, entry["run"]["run_id"], other_id)
    con.close()


def test_worst_classes_are_the_k_lowest_defined_ious_per_run(evals, warehouse):
    con = connect_read_only(warehouse)
    worst = worst_classes(con, k=3)
    for entry in all_runs(evals):
        defined = [(p["iou"], p["class_index"]) for p in entry["per_class"] if p["iou"] is not None]
        want = [c for _, c in sorted(defined)[:3]]
        got = worst[worst["run_id"] == entry["run"]["run_id"]]
        assert got["class_index"].tolist() == want and got["rank"].tolist() == [1, 2, 3]
    assert len(worst_classes(con)) == 5 * len(all_runs(evals))  # 5 defined classes each
    with pytest.raises(ValueError, match="positive integer"):
        worst_classes(con, k=0)
    con.close()


def test_deeplab_beats_unet_compares_the_best_of_each_family_on_the_same_data(evals, warehouse):
    con = connect_read_only(warehouse)
    plain = _sample_runs(evals, "plain")
    best = {fam: max((e for e in plain if e["run"]["arch"] and pred(e["run"]["arch"])), key=lambda e: e["metrics"]["miou"])
            for fam, pred in (("deeplab", lambda a: a.startswith("deeplabv3plus")),
                              ("unet", lambda a: a in ("unet", "attention_unet")))}
    want = sorted(((best["deeplab"]["per_class"][c]["iou"] - best["unet"]["per_class"][c]["iou"], c)
                   for c in range(len(CLASSES))
                   if best["deeplab"]["per_class"][c]["iou"] is not None
                   and best["deeplab"]["per_class"][c]["iou"] > best["unet"]["per_class"][c]["iou"]), reverse=True)
    assert want, "fixture should have classes where DeepLabV3+ wins"
    got = deeplab_beats_unet(con)
    assert got["class_index"].tolist() == [c for _, c in want]
    np.testing.assert_allclose(got["iou_margin"], [m for m, _ in want])
    assert set(got["challenger_run_id"]) == {best["deeplab"]["run"]["run_id"]}
    assert set(got["baseline_run_id"]) == {best["unet"]["run"]["run_id"]}
    assert set(got["dataset"]) == {"sample"}  # the coco-mini DeepLab has no U-Net to face
    con.close()


def test_the_sql_in_docs_runs_on_a_warehouse(warehouse):
    blocks = re.findall(r"```sql\n(.*?)```", (REPO / "docs" / "sql.md").read_text(), flags=re.S)
    # The replicate views' examples need seed replicates: tests/warehouse/test_replicates.py runs them.
    blocks = [b for b in blocks if not re.search(r"\b(seed_summary|augmenter_effect\w*|augmenter_pairs)\b", b)]
    assert len(blocks) >= 3
    con = connect_read_only(warehouse)
    for sql in blocks:
        assert con.execute(sql).fetchall(), sql
    con.close()


def test_the_leaderboard_finds_and_limits_runs_in_duckdb(warehouse):
    con = connect_read_only(warehouse)
    try:
        board = leaderboard(con)
        assert list(leaderboard(con, limit=3)["run_id"]) == list(board["run_id"][:3])  # the best, in order
        found = leaderboard(con, search="DeepLabV3plus_M")  # a substring, any case
        assert set(found["name"]) == {"deeplabv3plus_mobilenetv2_imagenet"} and len(found) == 2
        assert set(leaderboard(con, search="coco-mini")["name"]) == {"deeplabv3plus_xception"}  # the dataset
        run_id = board["run_id"].iloc[-1]
        assert list(leaderboard(con, search=run_id[3:10])["run_id"]) == [run_id]
        assert list(leaderboard(con, run_id=run_id)["run_id"]) == [run_id]
        assert list(leaderboard(con, name="unet", variant="plain")["name"]) == ["unet"]
        assert leaderboard(con, search="no such run").empty and leaderboard(con, limit=0).empty
        with pytest.raises(ValueError, match="limit must be a non-negative integer"):
            leaderboard(con, limit=-1)
    finally:
        con.close()
