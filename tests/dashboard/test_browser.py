"""The dashboard served for real (`streamlit run`) and driven by a headless Chromium.

Each page must render its content in the browser (run names, class names, chart labels drawn by
Vega, images loaded) with no Streamlit exception box; a screenshot of every page is kept in
``$SEGLAB_TEST_ARTIFACTS/dashboard`` (default ``tests/artifacts/dashboard``).

Needs Debian's chromium and chromium-driver (`apt-get install -y chromium chromium-driver`) and
the selenium package; skipped with the reason when they are missing. No browser is downloaded.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from .browser_support import (
    ARTIFACTS,
    NO_SELENIUM_REASON,
    PAGE_TIMEOUT_S,
    REPO,
    check_and_capture,
    chromium,
    loaded_images,
    requires_browser,
    serve_dashboard,
    wait_for,
    wait_until,
)

pytestmark = requires_browser
pytest.importorskip("selenium.webdriver", reason=NO_SELENIUM_REASON)
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

UPLOADER = '[data-testid="stFileUploader"]'


@pytest.fixture(scope="module")
def models_dir(fixture_warehouse, tmp_path_factory):
    """A trained model for the fixture's `unet` runs (a 1x1 convolution over the same classes, as
    the evaluate tests save one), so the runs page can predict with it."""
    from tests.evaluate.test_evaluate import _pixel_model, _save_trained

    root = tmp_path_factory.mktemp("trained")
    model = _pixel_model(classes=len(fixture_warehouse.classes))
    _save_trained(root, "unet", model, classes=fixture_warehouse.classes)
    return root / "models"


@pytest.fixture(scope="module")
def served_app(fixture_warehouse, models_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("streamlit") / "streamlit.log"
    with serve_dashboard(log, ["--warehouse", str(fixture_warehouse.warehouse),
                               "--gan-dir", str(fixture_warehouse.gan_dir),
                               "--models-dir", str(models_dir)]) as url:
        yield url


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    with chromium(tmp_path_factory.mktemp("chromium-profile")) as driver:
        yield driver


def test_every_page_renders_its_content(served_app, browser, fixture_warehouse):
    runs = fixture_warehouse.runs
    unet = fixture_warehouse.run("unet", "plain")
    best = runs[0]
    pages = [
        # (screenshot name, path, texts that prove the content is there)
        ("leaderboard", "/", ["Leaderboard", f"{best['name']} ({best['variant']}) mIoU {best['miou']:.3f}",
                              "mIoU by run", "unet_dcgan · tta"]),  # the last is a Vega axis label
        ("per_class", "/per-class", ["Per-class scores", "IoU per class and run", "Compare two runs",
                                     *fixture_warehouse.classes, "unet · plain", "IoU difference per class"]),
        ("runs", f"/runs?run={unet['run_id']}", ["Training curves", "val_miou", "learning rate",
                                                 "labelled pixels", "on the diagonal", "Predictions"]),
        ("gan", "/gan", ["dcgan: epoch_003.png (latest of 3)", "rejected_by_batch",
                         "dcgan: unet_dcgan vs unet (plain)"]),
        ("sql", "/sql", ["Start from an example", "Row limit", "Run query"]),
    ]
    shots = []
    for name, path, expected in pages:
        browser.get(served_app + path)
        wait_for(browser, expected, name)
        if name == "runs":
            WebDriverWait(browser, PAGE_TIMEOUT_S).until(lambda d: loaded_images(d) >= 1)
        if name == "gan":
            WebDriverWait(browser, PAGE_TIMEOUT_S).until(lambda d: loaded_images(d) >= 3)
        if name == "sql":
            query = browser.execute_script("return document.querySelector('textarea').value")
            assert "FROM class_scores" in query  # the first example is loaded
            browser.find_element(By.XPATH, "//button[.//p[text()='Run query']]").click()
            body = wait_for(browser, ["rows in"], "sql result")
            assert "Refused" not in body and "Query failed" not in body
        shots.append(check_and_capture(browser, name, ARTIFACTS))
    assert all(s.stat().st_size > 10_000 for s in shots)


def _upload(browser, path) -> None:
    # Wait for the element, not its text: a rerun can redraw the page after the text is there.
    field = wait_until(browser, lambda d: (d.find_elements(By.CSS_SELECTOR, f"{UPLOADER} input[type='file']")
                                           or [False])[0], "the file uploader")
    field.send_keys(str(path))


def test_the_runs_page_predicts_an_uploaded_image_and_names_a_bad_one(served_app, browser, fixture_warehouse,
                                                                     models_dir, tmp_path):
    unet = fixture_warehouse.run("unet", "plain")
    photo = tmp_path / "street.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (90, 130, 3), dtype=np.uint8)).save(photo)
    browser.get(f"{served_app}/runs?run={unet['run_id']}")
    wait_for(browser, ["Predict on an image", "plain softmax, as this run"], "the upload section")
    before = loaded_images(browser)  # the evaluation's prediction grid and confusion figure
    _upload(browser, photo)
    body = wait_for(browser, ["Classes present", "street.png (130x90): unet plain, overlay and legend"],
                    "the uploaded image's overlay")
    WebDriverWait(browser, PAGE_TIMEOUT_S).until(lambda d: loaded_images(d) >= before + 1)
    # The legend: the classes `seglab predict`'s function finds in the image, with their share of the pixels.
    from seglab.config import load_config
    from seglab.evaluate.predict import legend_entries, load_segmenter, predict_images

    params = load_config(REPO / "params.yaml")
    segmenter = load_segmenter(params, "unet", tta=False, models_dir=models_dir)
    expected = predict_images(segmenter, [photo], tmp_path / "out", overlay_alpha=params.predict.overlay_alpha)
    entries = {" ".join(text.split()) for _, text in legend_entries(expected.written[0].classes, segmenter.classes)}
    lines = [" ".join(line.split()) for line in body[body.index("Classes present"):].splitlines()[1:]]
    assert {line for line in lines if "%" in line} == entries
    browser.execute_script(f"document.querySelector('{UPLOADER}').scrollIntoView()")  # into the screenshot
    check_and_capture(browser, "runs_predict", ARTIFACTS)

    notes = tmp_path / "notes.png"
    notes.write_text("a text file with an image's name")
    _upload(browser, notes)
    body = wait_for(browser, ["notes.png: not an image", "notes.png is not an image"], "the bad upload's error")
    assert "Classes present" not in body and "Traceback" not in body
    check_and_capture(browser, "runs_predict_bad_upload", ARTIFACTS)
