"""The dashboard with more runs than a chart can show (issue 13, item 8; benchmarks/load.py times
the pages with 3,000 runs): each chart draws a bounded number of runs, chosen in DuckDB, and says
so; the tables keep every run."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pytest
from streamlit.testing.v1 import AppTest

from seglab.warehouse.ingest import ingest_files, open_warehouse
from tests.factories import eval_entry, eval_run, write_eval

from .test_app import APP, TIMEOUT_S

CLASSES = ["background", "person", "car", "dog", "cat"]
SEEDS = 20  # x {real only, +dcgan} x {plain, tta} = 80 runs, 40 augmenter pairs
CHART_RUNS = 30  # dashboard_support.CHART_RUNS
PICKER_RUNS = 50  # dashboard_support.PICKER_RUNS


@pytest.fixture(scope="module")
def big_warehouse(tmp_path_factory):
    root = tmp_path_factory.mktemp("big_warehouse")
    rng = np.random.default_rng(0)
    paths = []
    for seed in range(SEEDS):
        for augmenter in (None, "dcgan"):
            name = f"unet_s{seed}" + (f"+{augmenter}" if augmenter else "")
            entries = [eval_entry(eval_run(name, variant, classes=CLASSES, class_set="voc5", dataset="sample",
                                           seed=seed, augmenter=augmenter,
                                           synthetic_images_used=64 if augmenter else None),
                                  rng.integers(1, 100, size=(5, 5)) + np.diag(rng.integers(100, 900, size=5)))
                       for variant in ("plain", "tta")]
            paths.append(write_eval(root / "eval" / name / "eval.json", entries))
    con = open_warehouse(root / "warehouse.duckdb")
    try:
        ingest_files(con, paths)
        con.execute("CHECKPOINT")
    finally:
        con.close()
    return root


def _page(monkeypatch, root, page: str | None = None) -> AppTest:
    monkeypatch.setenv("SEGLAB_WAREHOUSE", str(root / "warehouse.duckdb"))
    monkeypatch.setenv("SEGLAB_GAN_DIR", str(root / "no_gan"))
    monkeypatch.setenv("SEGLAB_EVAL_DIR", str(root / "eval"))
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT_S).run()
    if page is not None:
        at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def chart_rows(at: AppTest) -> list[int]:
    """Rows of data each chart sends to the browser."""
    rows = []
    for chart in at.get("vega_lite_chart"):
        datasets = list(chart.proto.datasets) + ([chart.proto.data] if chart.proto.HasField("data") else [])
        rows.append(sum(pa.ipc.open_stream(io.BytesIO(d.data.data)).read_all().num_rows for d in datasets))
    return rows


def captions(at: AppTest) -> str:
    return "\n".join(str(c.value) for c in at.caption)


def test_leaderboard_charts_the_best_runs_and_tables_them_all(monkeypatch, big_warehouse):
    at = _page(monkeypatch, big_warehouse)
    assert len(at.dataframe[0].value) == 4 * SEEDS
    bars, scatter = chart_rows(at)
    assert bars == CHART_RUNS and scatter == 4 * SEEDS
    assert f"The best {CHART_RUNS} of {4 * SEEDS} runs by mIoU." in captions(at)
    assert f"and {4 * SEEDS - CHART_RUNS} more in the table" in captions(at)
    assert json.loads(at.get("vega_lite_chart")[1].proto.spec)["height"] <= 22 * CHART_RUNS


def test_per_class_heatmap_reads_only_the_runs_it_shows(monkeypatch, big_warehouse):
    at = _page(monkeypatch, big_warehouse, "views/per_class.py")
    heatmap = json.loads(at.get("vega_lite_chart")[0].proto.spec)
    assert len(heatmap["layer"][0]["encoding"]["y"]["sort"]) == CHART_RUNS
    assert chart_rows(at)[0] == CHART_RUNS * len(CLASSES)
    assert f"{CHART_RUNS} runs (the best {CHART_RUNS} of {4 * SEEDS})" in captions(at)
    at.number_input(key="pc_top").set_value(5).run()
    assert chart_rows(at)[0] == 5 * len(CLASSES) and len(at.dataframe[0].value) == 5


def test_gan_heatmap_draws_the_first_pairs_and_tables_every_pair(monkeypatch, big_warehouse):
    at = _page(monkeypatch, big_warehouse, "views/gan.py")
    pairs = 2 * SEEDS
    assert chart_rows(at)[0] == CHART_RUNS * (len(CLASSES))
    summary = at.dataframe[-1].value
    assert len(summary) == pairs and set(summary["baseline_name"]) == {f"unet_s{s}" for s in range(SEEDS)}
    assert f"The first {CHART_RUNS} of {pairs} pairs" in captions(at)


def test_the_runs_picker_offers_the_best_runs_and_finds_the_others(monkeypatch, big_warehouse):
    # It listed every run (3,000 options in benchmarks/load.py); now the best PICKER_RUNS that
    # match a text filter, chosen in DuckDB.
    at = _page(monkeypatch, big_warehouse, "views/runs.py")
    picker = at.selectbox(key="runs_run")
    assert len(picker.options) == PICKER_RUNS
    assert f"The best {PICKER_RUNS} runs by mIoU; more match" in captions(at)
    best = warehouse_rows(big_warehouse, "SELECT run_id FROM leaderboard WHERE variant = 'plain' "
                                         "ORDER BY miou DESC NULLS LAST, name, variant, run_id LIMIT 1")
    assert at.query_params["run"] == best[0]  # the best plain run by default

    at.text_input(key="runs_filter").set_value("UNET_S7").run()  # any case
    wanted = {"unet_s7 · plain", "unet_s7 · tta", "unet_s7+dcgan · plain", "unet_s7+dcgan · tta"}
    picker = at.selectbox(key="runs_run")
    assert wanted <= set(picker.options) and len(picker.options) <= len(wanted) + 1  # + the run shown
    assert "4 runs matching “UNET_S7”, best mIoU first." in captions(at)
    chosen = warehouse_rows(big_warehouse, "SELECT run_id FROM runs WHERE name = 'unet_s7+dcgan' AND variant = 'tta'")[0]
    picker.set_value(chosen).run()
    assert at.query_params["run"] == chosen and "No training history for this run (tta)" in "\n".join(
        str(i.value) for i in at.info)

    # A linked run is offered (and shown) even outside the best and the filter.
    worst = warehouse_rows(big_warehouse, "SELECT run_id FROM leaderboard "
                                          "ORDER BY miou ASC NULLS FIRST, name, variant, run_id LIMIT 1")[0]
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT_S)
    at.query_params["run"] = worst
    at.run()
    at.switch_page("views/runs.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.query_params["run"] == worst and len(at.selectbox(key="runs_run").options) == PICKER_RUNS + 1

    at.text_input(key="runs_filter").set_value("no such run").run()
    picker = at.selectbox(key="runs_run")
    assert len(picker.options) == 1 and picker.value == worst  # only the run shown
    assert "0 runs matching “no such run”" in captions(at)


def test_the_per_class_comparison_pickers_offer_the_best_runs_and_find_the_others(monkeypatch, big_warehouse):
    # They listed every run of the selection; now the best PICKER_RUNS that match a filter.
    at = _page(monkeypatch, big_warehouse, "views/per_class.py")
    best = warehouse_rows(big_warehouse, "SELECT run_id FROM leaderboard "
                                         "ORDER BY miou DESC NULLS LAST, name, variant, run_id LIMIT 2")
    for key in ("pc_run_a", "pc_run_b"):
        assert len(at.selectbox(key=key).options) == PICKER_RUNS
    assert (at.selectbox(key="pc_run_b").value, at.selectbox(key="pc_run_a").value) == tuple(best)
    assert f"The best {PICKER_RUNS} runs of this selection by mIoU; more match" in captions(at)

    at.text_input(key="pc_filter").set_value("Unet_S7+").run()
    wanted = {"unet_s7+dcgan · plain", "unet_s7+dcgan · tta"}  # the pickers' labels
    assert set(at.selectbox(key="pc_run_a").options) == wanted == set(at.selectbox(key="pc_run_b").options)
    assert "2 runs matching “Unet_S7+” of this selection, best mIoU first." in captions(at)
    assert not at.exception, [e.value for e in at.exception]

    at.text_input(key="pc_filter").set_value("unet_s7+dcgan · tta").run()  # a label, not a name: no match
    assert "Comparing needs two runs; 0 of this selection matching" in "\n".join(str(i.value) for i in at.info)


def warehouse_rows(root, sql: str) -> list:
    import duckdb

    with duckdb.connect(str(root / "warehouse.duckdb"), read_only=True) as con:
        return [row[0] for row in con.execute(sql).fetchall()]
