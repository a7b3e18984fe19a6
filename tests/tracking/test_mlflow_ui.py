"""The MLflow UI as a user sees it, in a real browser: `mlflow ui` on a small real sweep's store,
driven by headless Chromium (Debian's chromium + chromium-driver, `make chromium`) via Selenium.

Checked: the URL the launch prints opens the experiment on its runs (the model-training view,
not the GenAI overview); the sweep run expands to its trials, each with a dataset, the source
and a logged model; a trial's page shows its metrics, datasets and logged model; the registered
model is in the Model Registry. The runs page is saved as a screenshot (into docs/img/ with
CALIB_UPDATE_SCREENSHOTS=1, the README's figure).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest
from support.grids import tiny_grid
from support.ports import free_port
from support.processes import start_process, stop_processes, wait_healthy

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
SCREENSHOT = REPO / "docs" / "img" / "mlflow-runs.png"


def _grid(tmp_path: Path) -> Path:
    return tiny_grid(tmp_path / "grid.yaml", tmp_path / "data", tmp_path / "cache", name="ui",
                     methods={"platt": {}, "temperature": {}})


@pytest.fixture
def ui_server(ray_session, tmp_path, mlflow_store):
    """A finished small sweep in ``mlflow_store``, and `mlflow ui` serving it: (base URL, launch log)."""
    from sweeps.launch_sweep import LaunchOptions, launch

    out = io.StringIO()
    rc = launch(LaunchOptions(grid=str(_grid(tmp_path)), tracking_uri=mlflow_store), out=out, err=out)
    assert rc == 0, out.getvalue()
    port = free_port()
    log = tmp_path / "ui.log"
    proc = start_process([str(Path(sys.executable).with_name("mlflow")), "ui", "--backend-store-uri", mlflow_store,
                          "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], log)
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_healthy(f"{base}/health", proc, log, 90, "mlflow ui")
        except RuntimeError as exc:
            pytest.fail(f"mlflow ui did not come up: {exc}")
        yield base, out.getvalue()
    finally:
        stop_processes(proc)


@pytest.fixture
def browser():
    if not (CHROMIUM and DRIVER):
        pytest.skip("no chromium / chromedriver (Debian: `make chromium` installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,900"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def _wait_text(driver, *needles: str, timeout: float = 60.0) -> str:
    """The page's text once it holds every needle (the UI renders asynchronously)."""
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        try:
            text = driver.find_element(By.TAG_NAME, "body").text
        except Exception:  # noqa: BLE001 - the page is being replaced
            text = ""
        if all(n in text for n in needles):
            return text
        time.sleep(0.5)
    raise AssertionError(f"page {driver.current_url} never showed {needles}; it shows: {text[:1500]!r}")


def test_the_ui_opens_on_runs_with_trials_datasets_and_models(ui_server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    base, launch_log = ui_server
    printed = re.search(r"^runs: (\S+)$", launch_log, re.M)
    assert printed, launch_log
    url = printed.group(1).replace("http://127.0.0.1:5000", base)  # the UI of this test
    assert url.endswith("/runs?workflowType=machine_learning")

    browser.get(url)
    text = _wait_text(browser, "Runs", "sweep-ui-")
    assert "Model training" in text and "Token Usage" not in text  # not the GenAI overview
    assert "Source" in text and "Models" in text and "Dataset" in text
    # the sweep run expands to its eight trials
    browser.find_element(By.CSS_SELECTOR, "button[data-component-id*='runnamecellrenderer']").click()
    text = _wait_text(browser, "calibrate brats18/CE/platt fold 0", "base brats18/CE fold 1", "pretrain brats18 fold 0")
    names = [a.text for a in browser.find_elements(By.XPATH, "//a[contains(@href, '/runs/')]")]
    assert sum(n.startswith(("pretrain", "base", "calibrate")) for n in names) == 8, names
    assert "brats18-fold0-train" in text and "brats18-CE-platt-fold0" in text
    for close in browser.find_elements(By.CSS_SELECTOR, "[aria-label='Close']"):  # the assistant panel
        close.click()
    time.sleep(1)
    shot = tmp_path / "mlflow-runs.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("CALIB_UPDATE_SCREENSHOTS") == "1":
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, SCREENSHOT)

    # a trial's own page: metrics, its datasets, the logged model, the source
    trial = next(a for a in browser.find_elements(By.XPATH, "//a[contains(@href, '/runs/')]")
                 if a.text == "calibrate brats18/CE/platt fold 0")
    browser.get(trial.get_attribute("href") + "?workflowType=machine_learning")
    # the logged-models table fills in after its header: wait for its row, not only the header
    text = _wait_text(browser, "dice_mean", "ece_mean", "Logged models (1)", "brats18-fold0-train",
                      "brats18-CE-platt-fold0", "Ready")
    assert "launch.py" in text and "Parent run" in text

    # the report registered the best calibrated model
    browser.get(f"{base}/#/models?workflowType=machine_learning")
    _wait_text(browser, "calib-ui-brats18-CE")
