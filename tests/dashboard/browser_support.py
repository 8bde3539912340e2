"""Serving the dashboard for real (`streamlit run`, the README's form) and driving it with Debian's
headless Chromium: shared by the browser test (fabricated warehouse) and the end-to-end test (the
warehouse a real `dvc repro` filled).

Needs Debian's chromium and chromium-driver (`apt-get install -y chromium chromium-driver`) and the
selenium package; `requires_browser` skips with the reason when they are missing, and selenium is
imported only once a browser is started, so a module using this can run its other tests without it.
No browser is downloaded.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
APP = REPO / "dashboards" / "app.py"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
# Screenshots: $SEGLAB_TEST_ARTIFACTS/dashboard[/<subfolder>] (default tests/artifacts/dashboard).
ARTIFACTS = Path(os.environ.get("SEGLAB_TEST_ARTIFACTS", REPO / "tests" / "artifacts")) / "dashboard"
PAGE_TIMEOUT_S = 60
SERVER_START_TIMEOUT_S = 60

HAVE_BROWSER = Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()
NO_BROWSER_REASON = (f"headless browser test needs Debian's chromium and chromedriver ({CHROMIUM}, {CHROMEDRIVER} "
                     "not found): apt-get install -y chromium chromium-driver")
NO_SELENIUM_REASON = "the browser test needs `pip install selenium`"
requires_browser = pytest.mark.skipif(not HAVE_BROWSER, reason=NO_BROWSER_REASON)

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,2000"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_dashboard(log: Path, app_args: list[str], *, env: dict[str, str] | None = None) -> Iterator[str]:
    """`streamlit run dashboards/app.py -- <app_args>` on a free local port until the block ends;
    yields its URL once /_stcore/health answers. `env` replaces the environment (default: this
    one without SEGLAB_* settings, so only `app_args` say where the data is)."""
    port = free_port()
    if env is None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SEGLAB_")}
    env = {**env, "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    with log.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(APP), "--server.headless", "true",
             "--server.address", "127.0.0.1", "--server.port", str(port),
             "--server.fileWatcherType", "none", "--browser.gatherUsageStats", "false",
             # The README's form: the app's own options after `--`.
             "--", *app_args],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
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


@contextlib.contextmanager
def chromium(profile_dir: Path):
    """A headless Chromium (selenium WebDriver) with its own profile folder; skips without selenium."""
    webdriver = pytest.importorskip("selenium.webdriver", reason=NO_SELENIUM_REASON)
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile_dir}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(PAGE_TIMEOUT_S)
    try:
        yield driver
    finally:
        driver.quit()


def page_text(driver) -> str:
    return driver.execute_script("return document.body.innerText")


def wait_for(driver, texts: list[str], what: str) -> str:
    """Wait until every text is on the page and Streamlit has finished running the script."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def ready(d):
        body = page_text(d)
        running = d.find_elements(By.CSS_SELECTOR, '[data-testid="stStatusWidget"]')
        return body if all(t in body for t in texts) and not running else False
    try:
        return WebDriverWait(driver, PAGE_TIMEOUT_S, poll_frequency=0.3).until(ready)
    except TimeoutException:
        body = page_text(driver)
        missing = [t for t in texts if t not in body]
        pytest.fail(f"{what}: {missing} never appeared; the page reads:\n{body[:3000]}")


def wait_until(driver, condition, what: str, timeout: float = PAGE_TIMEOUT_S):
    """WebDriverWait(...).until(condition), failing with `what` and the page's text."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.3).until(condition)
    except TimeoutException:
        pytest.fail(f"{what} never happened; the page reads:\n{page_text(driver)[:3000]}")


def check_and_capture(driver, name: str, folder: Path = ARTIFACTS) -> Path:
    """Fail on a Streamlit exception box; otherwise save a screenshot `<folder>/<name>.png`."""
    from selenium.webdriver.common.by import By

    errors = driver.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]')
    assert not errors, f"{name}: Streamlit shows an exception: {errors[0].text[:2000]}"
    # Let Vega finish its layout transitions before the picture is taken.
    time.sleep(0.5)
    folder.mkdir(parents=True, exist_ok=True)
    shot = folder / f"{name}.png"
    driver.save_screenshot(str(shot))
    print(f"screenshot: {shot}")
    return shot


def loaded_images(driver) -> int:
    """Images Streamlit shows (st.image, fullscreen frames) that have finished loading."""
    return driver.execute_script(
        "return [...document.querySelectorAll('[data-testid=\"stImage\"] img, "
        "[data-testid=\"stFullScreenFrame\"] img')].filter(i => i.complete && i.naturalWidth > 0).length")


def vega_charts(driver) -> int:
    """Vega-Lite charts drawn (Altair: a canvas or svg inside each chart container)."""
    return driver.execute_script(
        "return document.querySelectorAll('[data-testid=\"stVegaLiteChart\"] canvas, "
        "[data-testid=\"stVegaLiteChart\"] svg.marks').length")
