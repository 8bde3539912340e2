"""The dashboard served for real (`streamlit run`) and driven by a headless Chromium.

Each page must render its content in the browser (run names, class names, chart labels drawn by
Vega, images loaded) with no Streamlit exception box; a screenshot of every page is kept in
``$SEGLAB_TEST_ARTIFACTS/dashboard`` (default ``tests/artifacts/dashboard``).

Needs Debian's chromium and chromium-driver (`apt-get install -y chromium chromium-driver`) and
the selenium package; skipped with the reason when they are missing. No browser is downloaded.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
APP = REPO / "dashboards" / "app.py"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ARTIFACTS = Path(os.environ.get("SEGLAB_TEST_ARTIFACTS", REPO / "tests" / "artifacts")) / "dashboard"
PAGE_TIMEOUT_S = 60

pytestmark = pytest.mark.skipif(
    not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()),
    reason=f"headless browser test needs Debian's chromium and chromedriver ({CHROMIUM}, {CHROMEDRIVER} "
           "not found): apt-get install -y chromium chromium-driver",
)
webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs `pip install selenium`")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,2000"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served_app(fixture_warehouse, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("streamlit") / "streamlit.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEGLAB_")}
    env["STREAMLIT_BROWSER_GATHER_USAGE_STATS"] = "false"
    with log.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(APP), "--server.headless", "true",
             "--server.address", "127.0.0.1", "--server.port", str(port),
             "--server.fileWatcherType", "none", "--browser.gatherUsageStats", "false",
             # The README's form: the app's own options after `--`.
             "--", "--warehouse", str(fixture_warehouse.warehouse),
             "--gan-dir", str(fixture_warehouse.gan_dir)],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as answer:
                    if answer.read() == b"ok":
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"streamlit did not come up on {url}:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(PAGE_TIMEOUT_S)
    yield driver
    driver.quit()


def _page_text(driver) -> str:
    return driver.execute_script("return document.body.innerText")


def _wait_for(driver, texts: list[str], what: str) -> str:
    """Wait until every text is on the page and Streamlit has finished running the script."""
    def ready(d):
        body = _page_text(d)
        running = d.find_elements(By.CSS_SELECTOR, '[data-testid="stStatusWidget"]')
        return body if all(t in body for t in texts) and not running else False
    try:
        return WebDriverWait(driver, PAGE_TIMEOUT_S, poll_frequency=0.3).until(ready)
    except Exception:
        body = _page_text(driver)
        missing = [t for t in texts if t not in body]
        pytest.fail(f"{what}: {missing} never appeared; the page reads:\n{body[:3000]}")


def _check_and_capture(driver, name: str) -> Path:
    errors = driver.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]')
    assert not errors, f"{name}: Streamlit shows an exception: {errors[0].text[:2000]}"
    # Let Vega finish its layout transitions before the picture is taken.
    time.sleep(0.5)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(shot))
    print(f"screenshot: {shot}")
    return shot


def _loaded_images(driver) -> int:
    return driver.execute_script(
        "return [...document.querySelectorAll('[data-testid=\"stImage\"] img, "
        "[data-testid=\"stFullScreenFrame\"] img')].filter(i => i.complete && i.naturalWidth > 0).length")


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
        ("gan", "/gan", ["dcgan: epoch_003.png (latest of 3)", "expectation_failures",
                         "dcgan: unet_dcgan vs unet (plain)"]),
        ("sql", "/sql", ["Start from an example", "Row limit", "Run query"]),
    ]
    shots = []
    for name, path, expected in pages:
        browser.get(served_app + path)
        _wait_for(browser, expected, name)
        if name == "runs":
            WebDriverWait(browser, PAGE_TIMEOUT_S).until(lambda d: _loaded_images(d) >= 1)
        if name == "gan":
            WebDriverWait(browser, PAGE_TIMEOUT_S).until(lambda d: _loaded_images(d) >= 3)
        if name == "sql":
            query = browser.execute_script("return document.querySelector('textarea').value")
            assert "FROM class_scores" in query  # the first example is loaded
            browser.find_element(By.XPATH, "//button[.//p[text()='Run query']]").click()
            body = _wait_for(browser, ["rows in"], "sql result")
            assert "Refused" not in body and "Query failed" not in body
        shots.append(_check_and_capture(browser, name))
    assert all(s.stat().st_size > 10_000 for s in shots)
