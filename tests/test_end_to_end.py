"""The whole default pipeline at toy scale, then the dashboard on what it produced.

The project's own dvc.yaml, params.yaml and src/ are copied into a scratch git+DVC repo, params.yaml
is shrunk to toy scale keeping every stage kind (sample, shard, validate_data, train_gan /
synthesize / validate_synthetic for every GAN, train / evaluate for a from-scratch model, an
ImageNet-pretrained one and its `+pix2pix` variant, ensemble, ingest), and one real `dvc repro`
runs it all. The tests then check what a fresh clone must give after `dvc repro`: trained models,
evaluations, a filled warehouse, DVC metrics and plots, a no-op second `dvc repro`; and the
README's dashboard command (`streamlit run dashboards/app.py -- --warehouse PATH ...`) serving
that warehouse, each page showing its real content in headless Chromium (screenshots in
``$SEGLAB_TEST_ARTIFACTS/dashboard/end_to_end``, default ``tests/artifacts/dashboard/end_to_end``).

The same run records what each stage loaded and read (SEGLAB_TRACE), and one test checks that
dvc.yaml declares exactly that as the stage's code and params deps.

The browser test skips, with test_browser.py's reason, without Debian's chromium/chromedriver;
the pipeline tests never skip. The run takes a few minutes (one real `dvc repro` of ~20 stages).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pytest
import yaml

from .conftest import make_scratch_repo, run_command
from .stage_deps import stage_dependency_problems
from .dashboard.browser_support import (
    ARTIFACTS,
    check_and_capture,
    chromium,
    loaded_images,
    requires_browser,
    serve_dashboard,
    vega_charts,
    wait_for,
    wait_until,
)

pytestmark = pytest.mark.slow

BASE = "unet_mobilenetv2_imagenet"
AUGMENTED = f"{BASE}+pix2pix"
MODELS = ["unet", BASE, AUGMENTED]
GANS = ["dcgan", "sagan", "pix2pix"]
EPOCHS = 2
GAN_EPOCHS = 2
SCREENSHOTS = ARTIFACTS / "end_to_end"


def _toy_scale(p: dict) -> None:
    """params.yaml at toy scale: every stage kind kept, each as small as the code allows."""
    p["seed"] = 0
    p["sample"].update(train_images=16, val_images=8, min_side=96, max_side=160)
    p["shard"]["max_side"] = 128
    p["profile"] = "cpu"
    p["profiles"]["cpu"].update(image_size=32, batch_size=4, epochs=EPOCHS)
    shards = p["shard"]["out"]  # plain strings: PyYAML does not write the `*real_shards` anchor back
    p["models"] = {
        "unet": {"arch": "unet", "weights": None, "width": 0.125, "train_data": shards},
        BASE: {"arch": "unet_mobilenetv2", "weights": "imagenet-offline", "width": 1.0, "train_data": shards},
        AUGMENTED: {"arch": "unet_mobilenetv2", "weights": "imagenet-offline", "width": 1.0,
                    "train_data": f"{p['validate_synthetic']['out']}/pix2pix"},
    }
    p["evaluate"].update(tta=["identity", "hflip"], latency_runs=2)
    p["more_models"] = {k: v for k, v in p.get("more_models", {}).items() if k not in p["models"]}
    p["ensemble"] = {"members": ["unet", BASE], "weights": [0.5, 0.5]}  # the two real-data-only models
    p["gan"].update(names=GANS, image_size=32, batch_size=4, sample_every=1, sample_count=4, synth_images=16)
    for gan in GANS:
        p["gan"][gan]["epochs"] = GAN_EPOCHS
    # The validation gate's minimums (seglab.gan.validate.SyntheticChecks): 32 px MobileNetV2 features.
    p["validate_synthetic"].update(min_images=4, diversity_size=32, kid_subsets=2, kid_subset_size=8,
                                   feature_size=32, reference_images=16)


@dataclass
class Pipeline:
    repo: Path
    output: str     # `dvc repro`'s stdout
    seconds: float
    traces: Path    # one JSON per stage run: the modules it loaded, the params it read

    @property
    def warehouse(self) -> Path:
        return self.repo / "data" / "warehouse.duckdb"

    def query(self, sql: str, params: list | None = None) -> list[tuple]:
        con = duckdb.connect(str(self.warehouse), read_only=True)
        try:
            return con.execute(sql, params or []).fetchall()
        finally:
            con.close()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Pipeline:
    """The toy-scale project after one real, complete `dvc repro`."""
    repo = make_scratch_repo(tmp_path_factory.mktemp("end_to_end") / "repo", _toy_scale)
    traces = repo.parent / "traces"
    started = time.monotonic()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SEGLAB_TRACE", str(traces))
        proc = run_command(["dvc", "repro"], repo, timeout=1800)  # shared CI machines can be slow
    return Pipeline(repo, proc.stdout, time.monotonic() - started, traces)


def _stages() -> set[str]:
    return {"sample", "shard", "validate_data", "ensemble", "ingest",
            *(f"{stage}@{gan}" for stage in ("train_gan", "synthesize", "validate_synthetic") for gan in GANS),
            *(f"{stage}@{model}" for stage in ("train", "evaluate") for model in MODELS)}


def test_dvc_repro_runs_every_stage(pipeline):
    print(f"dvc repro took {pipeline.seconds:.0f} s")
    expected = _stages()
    lock = yaml.safe_load((pipeline.repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == expected
    for stage in expected:
        assert f"Running stage '{stage}'" in pipeline.output, stage
    data = pipeline.repo / "data"
    for model in MODELS:
        assert (data / "models" / model / "model.keras").is_file()
        train = json.loads((data / "models" / model / "train.json").read_text())
        assert train["epochs_run"] == EPOCHS and train["image_size"] == 32
        for name in ("eval.json", "metrics.json", "predictions.png", "confusion.png"):
            assert (data / "eval" / model / name).is_file(), (model, name)
    for gan in GANS:
        assert sorted(p.name for p in (data / "gan" / gan / "samples").glob("*.png")) == [
            f"epoch_{e:03d}.png" for e in range(1, GAN_EPOCHS + 1)]
        assert (data / "reports" / "synthetic" / gan / "summary.json").is_file()
    assert (data / "eval" / "ensemble" / "eval.json").is_file()


def test_every_stage_depends_on_exactly_the_code_and_params_it_uses(pipeline):
    # Too few deps: a change that alters a stage's output reruns nothing. Too many: a change that
    # cannot alter it (a GPU-profile value, another GAN's epochs) reruns it anyway.
    problems = stage_dependency_problems(pipeline.repo, pipeline.traces, _stages())
    assert not problems, "dvc.yaml disagrees with what the stages used:\n" + "\n".join(
        f"  {stage}: {problem}" for stage, found in problems.items() for problem in found)


def test_warehouse_holds_every_model_and_the_ensemble(pipeline):
    runs = pipeline.query("SELECT name, variant, run_id FROM runs ORDER BY name, variant")
    assert {(name, variant) for name, variant, _ in runs} == {
        *((m, v) for m in MODELS for v in ("plain", "tta")), ("ensemble", "ensemble")}
    for name, variant, run_id in runs:
        counts = dict(pipeline.query(
            "SELECT 'metrics', count(*) FROM metrics WHERE run_id = $1 UNION ALL "
            "SELECT 'per_class', count(*) FROM per_class WHERE run_id = $1 UNION ALL "
            "SELECT 'confusion', count(*) FROM confusion WHERE run_id = $1 UNION ALL "
            "SELECT 'history', count(*) FROM history WHERE run_id = $1", [run_id]))
        assert counts["metrics"] >= 6 and counts["per_class"] == 21 and counts["confusion"] > 0, (name, variant)
        # Training curves belong to the plain run of a trained model.
        assert (counts["history"] > 0) == (variant == "plain"), (name, variant, counts)
    epochs = pipeline.query("SELECT r.name, count(DISTINCT h.epoch) FROM history h JOIN runs r USING (run_id) "
                            "GROUP BY r.name")
    assert dict(epochs) == dict.fromkeys(MODELS, EPOCHS)
    [(dataset, class_set, miou_defined)] = pipeline.query(
        "SELECT any_value(dataset), any_value(class_set), bool_and(miou IS NOT NULL) FROM leaderboard")
    assert class_set == "voc20" and miou_defined and dataset
    gans = pipeline.query("SELECT gan, images FROM synthetic_validation ORDER BY gan")
    assert gans == [(gan, 16) for gan in sorted(GANS)]


def test_augmented_run_records_its_augmenter_and_the_gate_decision(pipeline):
    verdict = json.loads((pipeline.repo / "data/synthetic_valid/pix2pix/validation.json").read_text())
    rows = pipeline.query(
        "SELECT name, variant, augmenter, synthetic_images_used, "
        "CAST(run_json->>'$.synthetic_accepted' AS BOOLEAN) FROM runs ORDER BY name, variant")
    for name, variant, augmenter, used, accepted in rows:
        if name == AUGMENTED:
            assert augmenter == "pix2pix", variant
            # Whether the gate let synthetic data through, and how much the model then trained on.
            assert accepted is (verdict["accepted"] > 0), (variant, verdict["decision"])
            assert used == verdict["accepted"], variant
        else:
            assert augmenter is None and accepted is None, (name, variant)
    summary = json.loads((pipeline.repo / f"data/metrics/{AUGMENTED}/train_metrics.json").read_text())
    assert summary["augmenter"] == "pix2pix" and summary["synthetic_images_used"] == verdict["accepted"]


def test_dvc_metrics_and_plots_show_every_model(pipeline):
    metrics = json.loads(run_command(["dvc", "metrics", "show", "--json"], pipeline.repo).stdout)
    files = {path: data["data"] for rev in metrics.values() for path, data in rev["data"].items()}
    for model in MODELS:
        assert files[f"data/metrics/{model}/train_metrics.json"]["epochs_run"] == EPOCHS
        assert 0 <= files[f"data/eval/{model}/metrics.json"]["miou"] <= 1
    assert "miou" in json.dumps(files["data/eval/ensemble/metrics.json"])
    # DVC 3: {"data": {plot id: [{"type": "vega", "content": <Vega-Lite spec with the data>} | image]}}
    shown = json.loads(run_command(["dvc", "plots", "show", "--json"], pipeline.repo).stdout)["data"]
    for model in MODELS:
        [curve] = shown[f"data/metrics/{model}/history.csv"]
        assert curve["type"] == "vega" and f"{model}: validation mIoU per epoch" in json.dumps(curve["content"])
        points = curve["content"]["data"]["values"]
        assert [int(p["epoch"]) for p in points] == list(range(1, EPOCHS + 1)) and all(p["val_miou"] for p in points)
    for gan in GANS:
        assert shown[f"data/gan/{gan}/history.csv"][0]["type"] == "vega"
        assert [shown[f"data/gan/{gan}/samples/epoch_{e:03d}.png"][0]["type"] for e in range(1, GAN_EPOCHS + 1)] == [
            "image"] * GAN_EPOCHS


def test_second_dvc_repro_does_nothing(pipeline):
    again = run_command(["dvc", "repro"], pipeline.repo)
    assert "Running stage" not in again.stdout and "Data and pipelines are up to date" in again.stdout, again.stdout


# ---- the dashboard on that warehouse --------------------------------------------------------------


@pytest.fixture(scope="module")
def served_app(pipeline, tmp_path_factory):
    data = pipeline.repo / "data"
    log = tmp_path_factory.mktemp("streamlit") / "streamlit.log"
    # The README's command with its documented options: the scratch repo's warehouse and artefacts.
    with serve_dashboard(log, ["--warehouse", str(pipeline.warehouse), "--eval-dir", str(data / "eval"),
                               "--gan-dir", str(data / "gan")]) as url:
        yield url


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    with chromium(tmp_path_factory.mktemp("chromium-profile")) as driver:
        yield driver


@requires_browser
def test_dashboard_shows_the_pipeline_results(pipeline, served_app, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    board = pipeline.query("SELECT run_id, name, variant, miou FROM leaderboard ORDER BY miou DESC")
    run_id = {(name, variant): rid for rid, name, variant, _ in board}
    present = [c for (c,) in pipeline.query(
        "SELECT p.class_name FROM per_class p JOIN runs r USING (run_id) WHERE r.name = 'unet' "
        "AND r.variant = 'plain' AND p.support > 0 AND p.class_index > 0 ORDER BY p.class_index")]
    assert present, "the toy validation split has no labelled class"
    shots = []

    # Leaderboard: every model, both variants, and the ensemble, with their mIoU.
    browser.get(served_app + "/")
    wait_for(browser, ["Leaderboard", "mIoU by run", "Accuracy against cost",
                       *(f"{name} ({variant}) mIoU {miou:.3f}" for _, name, variant, miou in board)], "leaderboard")
    wait_until(browser, lambda d: vega_charts(d) >= 2, "leaderboard charts drawn")
    shots.append(check_and_capture(browser, "leaderboard", SCREENSHOTS))

    # Per class: the voc20 classes the sample's validation split holds, in the heatmap and comparison.
    browser.get(served_app + "/per-class")
    wait_for(browser, ["Per-class scores", "IoU per class and run", "Compare two runs", "IoU difference per class",
                       "unet · plain", "ensemble · ensemble", *present], "per_class")
    wait_until(browser, lambda d: vega_charts(d) >= 2, "per-class charts drawn")
    shots.append(check_and_capture(browser, "per_class", SCREENSHOTS))

    # Runs: training curves, confusion matrix and the prediction grid the evaluate stage drew.
    browser.get(f"{served_app}/runs?run={run_id[(BASE, 'plain')]}")
    wait_for(browser, ["Training curves", "val_miou", "learning rate", f"{EPOCHS} epochs logged",
                       "Confusion matrix", "on the diagonal", "image / truth / prediction",
                       # the grid of this pipeline's run (runs.source_file is resolved)
                       str((pipeline.repo / "data" / "eval" / BASE / "predictions.png").resolve())], "runs")
    wait_until(browser, lambda d: loaded_images(d) >= 1 and vega_charts(d) >= 4, "curves, confusion and grid drawn")
    shots.append(check_and_capture(browser, "runs", SCREENSHOTS))

    # GAN: every augmenter's sample gallery (one tab each), the gate's results, the augmenter's effect.
    browser.get(served_app + "/gan")
    latest = f"epoch_{GAN_EPOCHS:03d}.png (latest of {GAN_EPOCHS})"
    wait_for(browser, [f"{GANS[0]}: {latest}", "Synthetic-data validation", f"{len(GANS)} rows; columns: gan",
                       "kid_mean", f"pix2pix: {AUGMENTED}"], "gan")
    for gan in GANS[1:]:
        browser.find_element(By.XPATH, f"//*[@role='tab'][normalize-space(.)='{gan}']").click()
        wait_for(browser, [f"{gan}: {latest}"], f"gan tab {gan}")
    wait_until(browser, lambda d: loaded_images(d) >= GAN_EPOCHS, "sample grids loaded")
    shots.append(check_and_capture(browser, "gan", SCREENSHOTS))

    # SQL: a SELECT over runs, typed in and run.
    browser.get(served_app + "/sql")
    wait_for(browser, ["Start from an example", "Row limit", "Run query"], "sql")
    query = browser.find_element(By.CSS_SELECTOR, "textarea")
    query.send_keys(Keys.CONTROL, "a")
    query.send_keys(Keys.DELETE)
    query.send_keys("SELECT name, variant FROM runs ORDER BY name, variant")
    browser.find_element(By.XPATH, "//button[.//p[text()='Run query']]").click()
    body = wait_for(browser, [f"{len(board)} rows in"], "sql result")
    assert "Refused" not in body and "Query failed" not in body
    shots.append(check_and_capture(browser, "sql", SCREENSHOTS))

    assert all(s.stat().st_size > 10_000 for s in shots)
