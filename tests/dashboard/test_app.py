"""Every dashboard page through Streamlit's AppTest, on a real (small) warehouse."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from seglab.warehouse.ingest import ingest_files, open_warehouse

from .support_module import load_dashboard_support

APP = Path(__file__).resolve().parents[2] / "dashboards" / "app.py"

PAGES = ["views/leaderboard.py", "views/per_class.py", "views/runs.py", "views/gan.py", "views/sql.py"]
TIMEOUT_S = 60


def start(monkeypatch, warehouse: Path, gan_dir: Path, page: str | None = None) -> AppTest:
    monkeypatch.setenv("SEGLAB_WAREHOUSE", str(warehouse))
    monkeypatch.setenv("SEGLAB_GAN_DIR", str(gan_dir))
    # Never the project's own data/eval or data/models: after `make repro` they hold real artefacts for these names.
    monkeypatch.setenv("SEGLAB_EVAL_DIR", str(warehouse.parent / "eval"))
    monkeypatch.setenv("SEGLAB_MODELS_DIR", str(warehouse.parent / "models"))
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT_S).run()
    if page is not None and page != PAGES[0]:
        at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


@pytest.fixture
def app(monkeypatch, fixture_warehouse):
    def open_page(page: str | None = None) -> AppTest:
        return start(monkeypatch, fixture_warehouse.warehouse, fixture_warehouse.gan_dir, page)
    return open_page


def texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


def chart_specs(at: AppTest) -> list[dict]:
    return [json.loads(e.proto.spec) for e in at.get("vega_lite_chart")]


def button(at: AppTest, label: str):
    return next(b for b in at.button if b.label == label)


def warehouse_frame(path: Path, sql: str, params=None):
    with duckdb.connect(str(path), read_only=True) as con:
        return con.execute(sql, params).df()


# ---- leaderboard ---------------------------------------------------------------------------------


def test_leaderboard_lists_every_run_with_its_scores(app, fixture_warehouse):
    at = app()
    assert [t.value for t in at.title] == ["Leaderboard"]
    table = at.dataframe[0].value
    expected = fixture_warehouse.runs  # best mIoU first
    assert list(zip(table["name"], table["variant"])) == [(r["name"], r["variant"]) for r in expected]
    np.testing.assert_allclose(table["miou"], [r["miou"] for r in expected])
    for column in ("mdice", "accuracy", "param_count", "seconds_per_epoch", "images_per_second"):
        assert table[column].notna().all(), column
    best = expected[0]
    assert any(m.label == "Best mIoU" and m.value == f"{best['miou']:.3f}" for m in at.metric)
    ranking = texts(at.caption)
    for run in expected:
        assert f"{run['name']} ({run['variant']}) mIoU {run['miou']:.3f}" in ranking


def test_leaderboard_filters_and_sorts(app, fixture_warehouse):
    at = app()
    at.multiselect(key="lb_variant").set_value(["plain"]).run()
    table = at.dataframe[0].value
    assert set(table["variant"]) == {"plain"}
    assert sorted(table["name"]) == ["deeplabv3plus_mobilenetv2_imagenet",
                                     "deeplabv3plus_mobilenetv2_scratch", "unet", "unet_dcgan"]

    at.selectbox(key="lb_sort").set_value("parameters").run()
    table = at.dataframe[0].value
    assert list(table["param_count"]) == sorted(table["param_count"])  # fewest first by default

    at.multiselect(key="lb_runs").set_value(["unet"]).run()
    assert list(at.dataframe[0].value["name"]) == ["unet"]
    at.multiselect(key="lb_dataset").set_value(["embedded-sample"]).run()
    assert len(at.dataframe[0].value) == 1


def test_leaderboard_filters_by_split_and_protocol(monkeypatch, fixture_warehouse, tmp_path):
    from seglab.warehouse.ingest import ingest_eval
    from tests.factories import eval_entry, eval_run, write_eval

    from .conftest import CLASS_SET, CLASSES, DATASET

    warehouse = tmp_path / "data" / "warehouse.duckdb"
    warehouse.parent.mkdir(parents=True)
    shutil.copyfile(fixture_warehouse.warehouse, warehouse)
    # `seglab evaluate unet --split test` on the same dataset, at full resolution.
    run = eval_run("unet", classes=CLASSES, class_set=CLASS_SET, dataset=DATASET, split="test",
                   train_dataset=DATASET, eval_protocol="full", run_id="unet-test-full")
    entry = eval_entry(run, np.diag([500, 90, 80, 70, 60, 50, 40, 30]) + 3)
    ingest_eval(warehouse, write_eval(tmp_path / "data" / "eval" / f"unet@{DATASET}.test" / "eval.json", [entry]))

    at = start(monkeypatch, warehouse, fixture_warehouse.gan_dir)
    board = at.dataframe[0].value
    assert len(board) == len(fixture_warehouse.runs) + 1
    assert "These runs were scored on" in texts(at.caption)  # val and test are not to be compared
    at.multiselect(key="lb_split").set_value(["test"]).run()
    table = at.dataframe[0].value
    assert list(table["run_id"]) == ["unet-test-full"] and list(table["eval_protocol"]) == ["full"]
    # The floor under it: class 0 holds 500 + 8 x 3 of the 1,112 truth pixels, 8 classes present.
    assert f"{DATASET} / test / full: “{CLASSES[0]}” everywhere, mIoU {524 / 1112 / 8:.3f}" in texts(at.caption)
    at.multiselect(key="lb_split").set_value([])
    at.multiselect(key="lb_protocol").set_value(["letterbox"]).run()
    table = at.dataframe[0].value
    assert len(table) == len(fixture_warehouse.runs) and set(table["split"]) == {"val"}


# ---- per class -----------------------------------------------------------------------------------


def test_per_class_heatmap_covers_every_run_and_class(app, fixture_warehouse):
    at = app("views/per_class.py")
    heatmap = chart_specs(at)[0]
    layer = heatmap["layer"][0]
    assert layer["encoding"]["x"]["sort"] == fixture_warehouse.classes
    labels = [f"{r['name']} · {r['variant']}" for r in fixture_warehouse.runs]
    assert layer["encoding"]["y"]["sort"] == labels
    assert ", ".join(fixture_warehouse.classes) in texts(at.caption)
    table = at.dataframe[0].value  # the "As a table" twin
    assert list(table.columns) == fixture_warehouse.classes and list(table.index) == labels
    unet = fixture_warehouse.run("unet", "plain")
    expected = warehouse_frame(fixture_warehouse.warehouse,
                               "SELECT iou FROM per_class WHERE run_id = ? ORDER BY class_index",
                               [unet["run_id"]])["iou"]
    np.testing.assert_allclose(table.loc["unet · plain"].to_numpy(dtype=float), expected.to_numpy(dtype=float))
    assert np.isnan(table.loc["unet · plain", "bus"])  # absent class: undefined, not 0

    at.selectbox(key="pc_metric").set_value("dice").run()
    assert chart_specs(at)[0]["layer"][0]["encoding"]["color"]["title"] == "Dice"


def test_per_class_compares_two_chosen_runs(app, fixture_warehouse):
    at = app("views/per_class.py")
    a = fixture_warehouse.run("unet", "plain")
    b = fixture_warehouse.run("deeplabv3plus_mobilenetv2_imagenet", "plain")
    at.selectbox(key="pc_run_a").set_value(a["run_id"])
    at.selectbox(key="pc_run_b").set_value(b["run_id"]).run()
    comparison = at.dataframe[-1].value
    scores = warehouse_frame(fixture_warehouse.warehouse,
                             "SELECT run_id, class_index, iou FROM per_class ORDER BY class_index")
    iou_a = scores[scores["run_id"] == a["run_id"]]["iou"].to_numpy(dtype=float)
    iou_b = scores[scores["run_id"] == b["run_id"]]["iou"].to_numpy(dtype=float)
    assert list(comparison["class_name"]) == fixture_warehouse.classes
    np.testing.assert_allclose(comparison["iou_delta"].to_numpy(dtype=float), iou_b - iou_a)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["mIoU A"] == f"{a['miou']:.3f}" and metrics["mIoU B"] == f"{b['miou']:.3f}"
    delta = iou_b - iou_a
    assert metrics["Classes B wins"] == str(int(np.sum(delta > 0)))
    assert metrics["Classes A wins"] == str(int(np.sum(delta < 0)))

    at.selectbox(key="pc_run_b").set_value(a["run_id"]).run()
    assert "Pick two different runs" in texts(at.info)


# ---- runs ----------------------------------------------------------------------------------------


def test_runs_page_shows_curves_confusion_and_predictions(app, fixture_warehouse):
    at = app("views/runs.py")
    unet = fixture_warehouse.run("unet", "plain")
    at.selectbox(key="runs_run").set_value(unet["run_id"]).run()
    assert at.query_params["run"] == unet["run_id"]
    specs = chart_specs(at)
    titles = [s.get("title") for s in specs]
    assert sorted(titles[:3]) == ["learning rate", "loss", "mIoU"]
    assert "5 epochs logged: loss, lr, miou, val_loss, val_miou" in texts(at.caption)

    confusion = warehouse_frame(fixture_warehouse.warehouse,
                                "SELECT sum(count) AS pixels, sum(count) FILTER (WHERE true_index = pred_index) "
                                "AS diagonal FROM confusion WHERE run_id = ?", [unet["run_id"]])
    pixels, diagonal = int(confusion["pixels"][0]), int(confusion["diagonal"][0])
    assert f"{pixels:,} labelled pixels, {diagonal / pixels:.1%} on the diagonal" in texts(at.caption)
    heatmap = specs[-1]["layer"][0]
    assert heatmap["encoding"]["x"]["sort"] == fixture_warehouse.classes and heatmap["encoding"]["color"]["field"] == "share"
    at.toggle(key="runs_normalise").set_value(False).run()
    assert chart_specs(at)[-1]["encoding"]["color"]["field"] == "pixels"

    captions = [c for image in at.get("image") for c in image.captions]
    assert any("predictions.png" in c for c in captions)
    assert any("confusion.png" in c for c in captions)


def test_runs_page_explains_missing_history_and_predictions(app, fixture_warehouse):
    at = app("views/runs.py")
    at.selectbox(key="runs_run").set_value(fixture_warehouse.run("unet", "tta")["run_id"]).run()
    assert "No training history for this run (tta)" in texts(at.info)
    assert "stored with the plain run: unet · plain" in texts(at.info)
    # The TTA run's own heatmap, not the plain run's beside it.
    captions = [c for image in at.get("image") for c in image.captions]
    assert any(c.endswith("unet/confusion_tta.png") for c in captions), captions
    assert not any("confusion.png" in c for c in captions), captions

    name = "deeplabv3plus_mobilenetv2_imagenet"
    at.selectbox(key="runs_run").set_value(fixture_warehouse.run(name, "plain")["run_id"]).run()
    assert f"dvc repro evaluate@{name}" in texts(at.info)
    assert not at.get("image")


def test_runs_page_says_which_model_it_would_predict_with(app, fixture_warehouse):
    # Uploading an image is driven in the browser test (test_browser.py); here the states without one.
    at = app("views/runs.py")
    name = "deeplabv3plus_mobilenetv2_imagenet"
    at.selectbox(key="runs_run").set_value(fixture_warehouse.run(name, "plain")["run_id"]).run()
    models = fixture_warehouse.warehouse.parent / "models"
    assert f"No trained model for {name} at `{models / name}`" in texts(at.info)
    assert f"dvc repro train@{name}" in texts(at.info)
    ensemble = next(r for r in fixture_warehouse.runs if r["variant"] == "ensemble")
    at.selectbox(key="runs_run").set_value(ensemble["run_id"]).run()
    assert "An ensemble has no single trained model to predict with" in texts(at.info)
    assert not at.exception


# ---- GAN -----------------------------------------------------------------------------------------


def test_gan_page_shows_samples_validation_and_effects(app, fixture_warehouse):
    at = app("views/gan.py")
    captions = [c for image in at.get("image") for c in image.captions]
    assert captions[0] == "dcgan: epoch_003.png (latest of 3)"
    assert {"epoch_001", "epoch_002"} <= set(captions)
    assert "sagan, pix2pix" in texts(at.caption)  # the GANs still missing, with their stages

    validation = at.dataframe[0].value
    assert {"gan", "images", "accepted", "rejected", "decision"} <= set(validation.columns)
    assert list(validation["gan"]) == ["dcgan", "sagan"]

    summary = at.dataframe[1].value
    assert set(summary["augmenter"]) == {"dcgan"}
    assert set(summary["name"]) == {"unet_dcgan"} and set(summary["baseline_name"]) == {"unet"}
    effect = chart_specs(at)[0]["layer"][0]
    assert effect["encoding"]["x"]["sort"] == fixture_warehouse.classes


def test_gan_page_before_the_gan_stages_says_what_to_run(monkeypatch, tmp_path, fixture_warehouse):
    # A warehouse without GAN results and no samples: every section says what to run.
    plain = tmp_path / "warehouse.duckdb"
    con = open_warehouse(plain)
    try:
        ingest_files(con, [fixture_warehouse.eval_dir / "unet" / "eval.json"])
    finally:
        con.close()
    at = start(monkeypatch, plain, tmp_path / "no_gan", "views/gan.py")
    info = texts(at.info)
    assert "dvc repro train_gan@dcgan" in info
    assert "No synthetic-data validation in the warehouse yet" in info
    assert "No run in the warehouse was trained with a GAN augmenter" in info


def test_gan_page_flags_an_augmented_run_whose_synthetic_data_was_all_rejected(monkeypatch, tmp_path):
    from .conftest import build_augmented_warehouse

    at = start(monkeypatch, build_augmented_warehouse(tmp_path), tmp_path / "no_gan", "views/gan.py")
    summary = at.dataframe[-1].value
    assert set(summary["name"]) == {"unet_mobilenetv2_imagenet+pix2pix"}
    assert set(summary["baseline_name"]) == {"unet_mobilenetv2_imagenet"}
    assert "Trained on real data only" in texts(at.warning)
    assert "`unet_mobilenetv2_imagenet+pix2pix`" in texts(at.warning)


# ---- SQL -----------------------------------------------------------------------------------------


def run_sql(at: AppTest, sql: str, limit: int | None = None) -> AppTest:
    at.text_area(key="sql_text").input(sql)
    if limit is not None:
        at.number_input(key="sql_limit").set_value(limit)
    return button(at, "Run query").click().run()


def test_sql_page_runs_a_select(app, fixture_warehouse):
    at = app("views/sql.py")
    at = run_sql(at, "WITH best AS (SELECT name, variant, miou FROM leaderboard) "
                     "SELECT * FROM best ORDER BY miou DESC")
    assert not at.error, texts(at.error)
    result = at.dataframe[0].value
    assert list(result["name"]) == [r["name"] for r in fixture_warehouse.runs]
    assert texts(at.success).startswith(f"{len(fixture_warehouse.runs)} rows in")


def test_sql_page_applies_the_row_limit(app):
    at = run_sql(app("views/sql.py"), "SELECT * FROM per_class ORDER BY run_id, class_index", limit=5)
    assert len(at.dataframe[0].value) == 5
    assert "cut at the row limit of 5" in texts(at.success)


def test_sql_page_cuts_a_result_over_the_size_limit(app):
    at = run_sql(app("views/sql.py"), "SELECT range AS i, repeat('x', 10000) AS s FROM range(2000)", limit=2000)
    assert not at.error, texts(at.error)
    assert "cut at the result size limit of 16 MiB" in texts(at.success)
    assert 0 < len(at.dataframe[0].value) < 2000


def test_sql_page_example_queries_run(app):
    at = app("views/sql.py")
    for example in at.selectbox(key="sql_example").options:
        at.selectbox(key="sql_example").set_value(example).run()
        at = button(at, "Run query").click().run()
        assert not at.error, (example, texts(at.error))
        assert len(at.dataframe[0].value) > 0, example


@pytest.mark.parametrize(("sql", "reason"), [
    ("DELETE FROM runs", "this is a DELETE statement"),
    ("DROP TABLE per_class", "this is a DROP statement"),
    ("ATTACH '/tmp/other.duckdb' AS other", "this is a ATTACH statement"),
    ("UPDATE runs SET name = 'x'", "this is a UPDATE statement"),
    ("COPY runs TO '/tmp/runs.csv'", "this is a COPY statement"),
    ("SELECT 1; DELETE FROM runs", "one statement at a time: the query holds 2 (SELECT, DELETE)"),
    ("SELECT 1; SELECT 2", "one statement at a time"),
    ("SELEC name FROM runs", "does not parse"),
    ("   ", "the query is empty"),
])
def test_sql_page_refuses_anything_but_one_select(app, fixture_warehouse, sql, reason):
    at = run_sql(app("views/sql.py"), sql)
    message = texts(at.error)
    assert message.startswith("Refused:") and reason in message, message
    assert not at.dataframe or "table_name" in at.dataframe[0].value.columns  # only the schema
    runs = warehouse_frame(fixture_warehouse.warehouse, "SELECT count(*) AS n FROM runs")["n"][0]
    assert runs == len(fixture_warehouse.runs)


def test_sql_page_cannot_read_files(app):
    at = run_sql(app("views/sql.py"), f"SELECT * FROM read_text('{APP}')")
    message = texts(at.error)
    assert message.startswith("Query failed:") and "disabled by configuration" in message, message


# ---- settings ------------------------------------------------------------------------------------


def test_settings_come_from_arguments_then_environment_then_params(tmp_path):
    support = load_dashboard_support()
    repo = APP.parents[1]

    defaults = support.load_settings(argv=[], environ={})
    assert defaults.warehouse == repo / "data" / "warehouse.duckdb"
    assert defaults.eval_dir == repo / "data" / "eval" and defaults.gan_dir == repo / "data" / "gan"
    assert defaults.models_dir == repo / "data" / "models"

    env = {"SEGLAB_WAREHOUSE": str(tmp_path / "env.duckdb"), "SEGLAB_GAN_DIR": str(tmp_path / "g")}
    from_env = support.load_settings(argv=["-q", "tests/"], environ=env)  # foreign args ignored
    assert from_env.warehouse == tmp_path / "env.duckdb" and from_env.gan_dir == tmp_path / "g"

    from_args = support.load_settings(argv=["--warehouse", str(tmp_path / "arg.duckdb"),
                                            "--eval-dir", str(tmp_path / "e"), "--models-dir", str(tmp_path / "m")],
                                      environ={**env, "SEGLAB_MODELS_DIR": str(tmp_path / "env-m")})
    assert from_args.warehouse == tmp_path / "arg.duckdb" and from_args.eval_dir == tmp_path / "e"
    assert from_args.models_dir == tmp_path / "m"
    assert support.load_settings(argv=[], environ={"SEGLAB_MODELS_DIR": str(tmp_path / "env-m")}).models_dir == \
        tmp_path / "env-m"
    assert from_args.gan_dir == tmp_path / "g"
    # No prefix matching: an abbreviation is not taken for --warehouse.
    assert support.load_settings(argv=["--ware", "x"], environ={}).warehouse == defaults.warehouse


def test_a_runs_figures_are_looked_up_in_its_own_evaluation_folder(tmp_path):
    support = load_dashboard_support()
    eval_dir = tmp_path / "eval"
    for folder in ("unet", "unet@camvid.val"):
        (eval_dir / folder).mkdir(parents=True)
        (eval_dir / folder / "predictions.png").write_bytes(folder.encode())
    # The warehouse was built in another checkout: its eval.json paths do not exist here.
    elsewhere = tmp_path / "other-checkout" / "data" / "eval"
    own, looked = support.artifact_file({"name": "unet", "source_file": str(elsewhere / "unet" / "eval.json")},
                                        eval_dir, "predictions.png")
    assert own == eval_dir / "unet" / "predictions.png" and looked[0] == elsewhere / "unet" / "predictions.png"
    other_split = {"name": "unet", "source_file": str(elsewhere / "unet@camvid.val" / "eval.json")}
    found, looked = support.artifact_file(other_split, eval_dir, "predictions.png")
    assert found == eval_dir / "unet@camvid.val" / "predictions.png", looked  # never the val split's grid
    (eval_dir / "unet@camvid.val" / "predictions.png").unlink()
    found, looked = support.artifact_file(other_split, eval_dir, "predictions.png")
    assert found is None and eval_dir / "unet" / "predictions.png" not in looked


def test_the_command_offered_to_evaluate_a_run_again_is_the_one_that_wrote_it():
    command = load_dashboard_support().eval_command
    run = {"name": "unet", "variant": "tta", "dataset": "camvid", "split": "test"}
    assert command({**run, "source_file": "/x/data/eval/unet/eval.json"}) == "dvc repro evaluate@unet"
    assert command({**run, "source_file": "/x/data/eval/unet@camvid.test/eval.json"}) == \
        "seglab evaluate unet --data <the shards of camvid> --split test"
    assert command({**run, "name": "ensemble", "variant": "ensemble",
                    "source_file": "/x/data/eval/ensemble/eval.json"}) == "dvc repro ensemble"


# ---- empty states and freshness ------------------------------------------------------------------


@pytest.mark.parametrize("page", PAGES)
def test_missing_warehouse_says_what_to_run(monkeypatch, tmp_path, page):
    at = start(monkeypatch, tmp_path / "absent.duckdb", tmp_path / "gan", page)
    info = texts(at.info)
    assert f"No warehouse at `{tmp_path / 'absent.duckdb'}` yet" in info and "dvc repro" in info


@pytest.mark.parametrize("page", ["views/leaderboard.py", "views/runs.py", "views/sql.py"])
def test_empty_warehouse_says_what_to_run(monkeypatch, tmp_path, empty_warehouse, page):
    at = start(monkeypatch, empty_warehouse, tmp_path / "gan", page)
    assert "holds no runs yet" in texts(at.info) and "dvc repro" in texts(at.info)


def test_not_a_warehouse_is_a_clear_error(monkeypatch, tmp_path):
    stray = tmp_path / "stray.duckdb"
    with duckdb.connect(str(stray)) as con:
        con.execute("CREATE TABLE t (x INTEGER)")
    at = start(monkeypatch, stray, tmp_path / "gan")
    assert "not a seglab warehouse" in texts(at.error)


def test_a_reingest_shows_up_without_restarting(monkeypatch, tmp_path, fixture_warehouse):
    # The dashboard must not hold the file open (ingest could not write it) and must not serve
    # stale cached results once it changed.
    warehouse = tmp_path / "warehouse.duckdb"
    shutil.copy(fixture_warehouse.warehouse, warehouse)
    at = start(monkeypatch, warehouse, tmp_path / "gan")
    assert "ensemble" in set(at.dataframe[0].value["name"])

    con = open_warehouse(warehouse)  # read-write, while the app is "running"
    try:
        ensemble_run = fixture_warehouse.run("ensemble", "ensemble")["run_id"]
        con.execute("DELETE FROM per_class WHERE run_id = ?", [ensemble_run])
        con.execute("DELETE FROM confusion WHERE run_id = ?", [ensemble_run])
        con.execute("DELETE FROM metrics WHERE run_id = ?", [ensemble_run])
        con.execute("DELETE FROM runs WHERE run_id = ?", [ensemble_run])
        con.execute("CHECKPOINT")
    finally:
        con.close()
    at.run()
    assert "ensemble" not in set(at.dataframe[0].value["name"])
    assert len(at.dataframe[0].value) == len(fixture_warehouse.runs) - 1
