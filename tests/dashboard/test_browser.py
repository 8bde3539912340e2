"""The dashboard served for real (`streamlit run`) and driven by a headless Chromium.

Each page must render its content in the browser (run names, class names, chart labels drawn by
Vega, images loaded) with no Streamlit exception box; a screenshot of every page is kept in
``$SEGLAB_TEST_ARTIFACTS/dashboard`` (default ``tests/artifacts/dashboard``).

Needs Debian's chromium and chromium-driver (`apt-get install -y chromium chromium-driver`) and
the selenium package; skipped with the reason when they are missing. No browser is downloaded.
"""

from __future__ import annotations

import pytest

from .browser_support import (
    ARTIFACTS,
    NO_SELENIUM_REASON,
    PAGE_TIMEOUT_S,
    check_and_capture,
    chromium,
    loaded_images,
    requires_browser,
    serve_dashboard,
    wait_for,
)

pytestmark = requires_browser
pytest.importorskip("selenium.webdriver", reason=NO_SELENIUM_REASON)
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def served_app(fixture_warehouse, tmp_path_factory):
    log = tmp_path_factory.mktemp("streamlit") / "streamlit.log"
    with serve_dashboard(log, ["--warehouse", str(fixture_warehouse.warehouse),
                               "--gan-dir", str(fixture_warehouse.gan_dir)]) as url:
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
