"""The dashboard's own queries and its SQL guard, without Streamlit."""

from __future__ import annotations

import numpy as np
import pytest

from seglab.warehouse import dashboard_queries as dq
from seglab.warehouse.queries import connect_read_only
from seglab.warehouse.schema import SchemaError, WarehouseError

from .conftest import AUGMENTED_WAREHOUSE, CLASSES, build_augmented_warehouse


@pytest.fixture
def con(fixture_warehouse):
    connection = dq.harden(connect_read_only(fixture_warehouse.warehouse))
    yield connection
    connection.close()


@pytest.mark.parametrize("sql", [
    "SELECT name FROM runs",
    "  select name from runs ;  ",
    "WITH r AS (SELECT name FROM runs) SELECT * FROM r",
    "FROM leaderboard",
    "SHOW TABLES",
    "DESCRIBE per_class",
    "SUMMARIZE metrics",
    "SELECT name FROM runs -- a trailing comment",
    "/* leading comment */ SELECT 1",
])
def test_single_selects_pass_the_guard_and_run(con, sql):
    statement = dq.check_read_only_sql(con, sql)
    assert not statement.endswith(";")
    result = dq.run_read_only_sql(con, sql, max_rows=50)
    assert len(result.frame) >= 1 and not result.truncated


@pytest.mark.parametrize(("sql", "reason"), [
    ("INSERT INTO runs SELECT * FROM runs", "INSERT statement"),
    ("DELETE FROM runs", "DELETE statement"),
    ("DROP VIEW leaderboard", "DROP statement"),
    ("CREATE TEMP TABLE t AS SELECT 1", "CREATE statement"),
    ("ATTACH ':memory:' AS scratch", "ATTACH statement"),
    ("DETACH scratch", "DETACH statement"),
    ("SET memory_limit = '1GB'", "SET statement"),
    ("PRAGMA table_info('runs')", "PRAGMA statement"),
    ("CALL pragma_version()", "CALL statement"),
    ("EXPORT DATABASE '/tmp/x'", "EXPORT statement"),
    ("INSTALL httpfs", "LOAD statement"),
    ("BEGIN TRANSACTION", "TRANSACTION statement"),
    ("EXPLAIN SELECT 1", "EXPLAIN statement"),
    ("SELECT 1; SELECT 2", "holds 2 (SELECT, SELECT)"),
    ("SELECT FROM WHERE", "does not parse"),
    ("-- only a comment", "no statement"),
    ("", "empty"),
])
def test_everything_else_is_refused_with_the_reason(con, sql, reason):
    with pytest.raises(dq.SqlRefused) as refused:
        dq.run_read_only_sql(con, sql)
    assert reason in str(refused.value)


def test_row_limit_marks_truncation(con, fixture_warehouse):
    total = len(fixture_warehouse.runs) * len(fixture_warehouse.classes)
    result = dq.run_read_only_sql(con, "SELECT * FROM per_class ORDER BY run_id, class_index", max_rows=10)
    assert len(result.frame) == 10 and result.truncated
    full = dq.run_read_only_sql(con, "SELECT * FROM per_class", max_rows=total)
    assert len(full.frame) == total and not full.truncated
    ordered = dq.run_read_only_sql(con, "SELECT class_index FROM per_class ORDER BY class_index DESC",
                                   max_rows=3)
    assert list(ordered.frame["class_index"]) == [len(fixture_warehouse.classes) - 1] * 3


def test_a_slow_query_is_interrupted(con):
    with pytest.raises(dq.SqlTimeout, match="longer than 0.2 s"):
        dq.run_read_only_sql(con, "SELECT sum(a.range * b.range) FROM range(1000000) AS a, "
                                  "range(1000000) AS b", timeout_s=0.2)
    assert dq.run_read_only_sql(con, "SELECT 1 AS one").frame["one"][0] == 1  # still usable


def test_hardened_connection_reads_no_files(con, fixture_warehouse):
    with pytest.raises(Exception, match="disabled by configuration"):
        dq.run_read_only_sql(con, f"SELECT * FROM read_text('{fixture_warehouse.eval_dir}/unet/eval.json')")


def test_bad_limits_are_errors(con):
    with pytest.raises(ValueError, match="max_rows"):
        dq.run_read_only_sql(con, "SELECT 1", max_rows=0)
    with pytest.raises(ValueError, match="timeout_s"):
        dq.run_read_only_sql(con, "SELECT 1", timeout_s=0)


def test_run_details_and_unknown_run(con, fixture_warehouse):
    unet = fixture_warehouse.run("unet", "plain")
    details = dq.run_details(con, unet["run_id"])
    assert details["name"] == "unet" and details["classes"] == fixture_warehouse.classes
    assert "run_json" not in details
    with pytest.raises(WarehouseError, match="no run 'nope'"):
        dq.run_details(con, "nope")


def test_optional_tables(con, empty_warehouse):
    assert dq.table_exists(con, "runs") and dq.table_exists(con, "leaderboard")
    frame = dq.synthetic_validation(con)
    assert list(frame["gan"]) == ["dcgan", "sagan"]
    empty = connect_read_only(empty_warehouse)
    try:
        assert dq.synthetic_validation(empty).empty  # schema version 4 has the table
        assert dq.count_runs(empty) == 0
        assert dq.augmenter_effects(empty).empty
    finally:
        empty.close()


def test_augmenter_effect_is_the_per_class_difference_to_the_matching_baseline(con, fixture_warehouse):
    effects = dq.augmenter_effects(con, "iou")
    assert set(effects["augmenter"]) == {"dcgan"}
    for variant in ("plain", "tta"):
        rows = effects[effects["variant"] == variant]
        augmented = fixture_warehouse.run("unet_dcgan", variant)["run_id"]
        baseline = fixture_warehouse.run("unet", variant)["run_id"]
        assert set(rows["run_id"]) == {augmented} and set(rows["baseline_run_id"]) == {baseline}
        iou = con.execute("SELECT run_id, class_index, iou FROM per_class ORDER BY class_index").df()
        expected = (iou[iou["run_id"] == augmented]["iou"].to_numpy(dtype=float)
                    - iou[iou["run_id"] == baseline]["iou"].to_numpy(dtype=float))
        np.testing.assert_allclose(rows["delta"].to_numpy(dtype=float), expected)
    with pytest.raises(ValueError, match="metric must be one of"):
        dq.augmenter_effects(con, "iou; DROP TABLE runs")


def test_the_per_pair_summary_aggregated_in_duckdb_matches_the_per_class_rows(con):
    effects = dq.augmenter_effects(con, "dice")
    expected = (effects.groupby(["augmenter", "name", "baseline_name", "variant"], sort=False)["delta"]
                .agg(mean_change="mean", classes_improved=lambda d: int((d > 0).sum()),
                     classes_worse=lambda d: int((d < 0).sum())).reset_index())
    summary = dq.augmenter_effect_summary(con, "dice")
    assert list(summary["name"] + summary["variant"]) == list(expected["name"] + expected["variant"])
    np.testing.assert_allclose(summary["mean_change"], expected["mean_change"])
    assert list(summary["classes_improved"]) == list(expected["classes_improved"])
    assert list(summary["classes_worse"]) == list(expected["classes_worse"])
    first = dq.augmenter_effects(con, "dice", pairs=1)
    assert set(first["run_id"]) == {effects["run_id"].iloc[0]} and len(first) == len(effects) // 2
    with pytest.raises(ValueError, match="pairs must be a positive integer"):
        dq.augmenter_effects(con, "dice", pairs=0)


def test_a_warehouse_older_than_the_pairing_view_is_refused_with_how_to_upgrade(tmp_path):
    con = dq.harden(connect_read_only(build_augmented_warehouse(tmp_path, 1)))
    try:
        with pytest.raises(SchemaError, match=r"no 'augmenter_pairs' view.*seglab ingest"):
            dq.augmenter_effects(con, "iou")
    finally:
        con.close()


def test_an_augmented_variant_is_compared_with_the_model_it_is_named_after(tmp_path):
    path = build_augmented_warehouse(tmp_path)
    con = dq.harden(connect_read_only(path))
    try:
        effects = dq.augmenter_effects(con, "iou")
        per_class = con.execute("SELECT r.name, r.variant, p.class_index, p.iou FROM per_class AS p "
                                "JOIN runs AS r USING (run_id)").df()
    finally:
        con.close()
    assert len(effects) == 2 * len(CLASSES)  # plain and tta, every class
    assert set(effects["augmenter"]) == {"pix2pix"} and set(effects["name"]) == {"unet_mobilenetv2_imagenet+pix2pix"}
    # The named base, though the `_longer` run has the same arch, weights and size and a better mIoU.
    assert set(effects["baseline_name"]) == {"unet_mobilenetv2_imagenet"}
    assert effects["synthetic_images_used"].eq(0).all()
    for variant in ("plain", "tta"):
        rows = effects[effects["variant"] == variant].sort_values("class_index")
        of_variant = per_class[per_class["variant"] == variant].sort_values("class_index")
        iou = {name: of_variant[of_variant["name"] == name]["iou"].to_numpy(dtype=float) for name in AUGMENTED_WAREHOUSE}
        np.testing.assert_allclose(rows["delta"].to_numpy(dtype=float),
                                   iou["unet_mobilenetv2_imagenet+pix2pix"] - iou["unet_mobilenetv2_imagenet"])


def test_schema_listing_names_every_table(con):
    columns = dq.warehouse_columns(con)
    assert {"runs", "metrics", "per_class", "confusion", "history", "leaderboard",
            "synthetic_validation"} <= set(columns["table_name"])


# Pairs where the dashboard's own pairing (by name, else best mIoU; seed, batch and epochs ignored)
# named another baseline than `seglab report`: both now read the `augmenter_pairs` view.
PAIRING = {  # name -> seed, epochs, augmenter, per-class IoU
    "m": (0, 4, None, [0.90, 0.50, 0.30, 0.20]),  # the base `m+pix2pix` is named after, but seed 0
    "m_s1": (1, 4, None, [0.92, 0.40, 0.35, 0.25]),
    "m_s1_long": (1, 8, None, [0.99, 0.90, 0.90, 0.90]),  # same seed, other epochs: not comparable
    "m+pix2pix": (1, 4, "pix2pix", [0.91, 0.55, 0.30, 0.30]),
    "m_s2": (2, 4, None, [0.94, 0.30, 0.20, 0.40]),
    "m_s2_long": (2, 8, None, [0.99, 0.95, 0.95, 0.95]),  # the best mIoU of seed 2
    "x+pix2pix": (2, 4, "pix2pix", [0.97, 0.30, 0.25, 0.35]),  # no run named `x`
}


def test_the_dashboard_and_the_report_pair_the_same_runs(tmp_path):
    from seglab.warehouse.ingest import ingest_files, open_warehouse
    from seglab.warehouse.queries import augmenter_effect_per_class
    from tests.factories import eval_entry, eval_run, write_eval

    classes = ["background", "person", "car", "dog"]
    paths = []
    for name, (seed, epochs, augmenter, ious) in PAIRING.items():
        run = eval_run(name, arch="unet_mobilenetv2", classes=classes, seed=seed, epochs_planned=epochs,
                       epochs_run=epochs, augmenter=augmenter, synthetic_images_used=10 if augmenter else None)
        entry = eval_entry(run, ious=ious, metrics={"miou": sum(ious) / len(ious)})
        paths.append(write_eval(tmp_path / "eval" / name / "eval.json", [entry]))
    con = open_warehouse(tmp_path / "warehouse.duckdb")
    try:
        ingest_files(con, paths)
        effects = dq.augmenter_effects(con, "iou")
        report = augmenter_effect_per_class(con)
        view = con.execute("SELECT augmented_name, base_name FROM augmenter_pairs").fetchall()
    finally:
        con.close()
    pairs = dict(effects[["name", "baseline_name"]].drop_duplicates().itertuples(index=False))
    assert pairs == {"m+pix2pix": "m_s1", "x+pix2pix": "m_s2"} == dict(view)
    # The report's per-class effect is the mean of the dashboard's per-class differences.
    assert len(report) == len(classes) and report["n_pairs"].eq(2).all()
    dashboard_mean = effects.groupby("class_index")["delta"].mean()
    np.testing.assert_allclose(report.sort_values("class_index")["delta_iou_mean"].to_numpy(float),
                               dashboard_mean.sort_index().to_numpy(float))
    expected = [np.mean([PAIRING["m+pix2pix"][3][c] - PAIRING["m_s1"][3][c],
                         PAIRING["x+pix2pix"][3][c] - PAIRING["m_s2"][3][c]]) for c in range(len(classes))]
    np.testing.assert_allclose(dashboard_mean.sort_index().to_numpy(float), expected)
