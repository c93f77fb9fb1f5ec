"""What a user sees: the real MLflow UI of the session's finished tiny training run, in a headless
Chromium driven by Selenium (Debian's ``chromium`` and ``chromium-driver``; ``make setup`` installs
them where it can).

Screenshots go to the test's tmp folder and, when ``UI_SCREENSHOT_DIR`` is set, there too (the
pictures of docs/mlflow.md, in docs/images/, come from such a run).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient
from selenium import webdriver
from selenium.common.exceptions import (
    NoSuchElementException,
    StaleElementReferenceException,
    TimeoutException,
    WebDriverException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

from pipelines.registry.tracking_uri import run_url

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
# Checked at collection, so that a machine without them skips before the session trains its runs.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (BROWSER and DRIVER),
        reason=f"chromium ({BROWSER or 'not found'}) and chromedriver ({DRIVER or 'not found'}) must be on PATH: "
               "`make setup` installs Debian's chromium and chromium-driver when run as root with apt-get",
    ),
]

#: Seconds to wait for one page state (the UI's bundle is large and the machine may be busy).
WAIT_S = 120
SAMPLE_GRID = "samples/step_00000004.png"
#: Selectors found by inspecting the DOM of MLflow 3.17.2's UI.
CHART_CARD = '[data-testid="experiment-view-compare-runs-card"]'
CHART_TITLE = "h4[title]"
CHART_LINE = ".js-plotly-plot path.js-line"
CHART_SEARCH = 'input[placeholder="Search metric charts"]'
ASSISTANT_CLOSE = 'button[aria-label="Close"]'
#: Raised while React redraws what a wait looks at: try again at the next poll.
_REDRAWN = (NoSuchElementException, StaleElementReferenceException)
#: Where a failed wait leaves its screenshot (``timeout.png``): the ``screenshots`` folders.
_FAILURE_FOLDERS: list[Path] = []


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for argument in ("--headless=new", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,960",
                     "--hide-scrollbars"):
        options.add_argument(argument)
    if os.geteuid() == 0:
        options.add_argument("--no-sandbox")  # Chromium refuses to run as root inside its sandbox
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(WAIT_S)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Folders that every screenshot is written to."""
    folders = [tmp_path_factory.mktemp("ui-screenshots")]
    if os.environ.get("UI_SCREENSHOT_DIR"):
        folders.append(Path(os.environ["UI_SCREENSHOT_DIR"]))
        folders[-1].mkdir(parents=True, exist_ok=True)
    _FAILURE_FOLDERS[:] = folders
    return folders


def _save(driver, folders: list[Path], name: str, element=None) -> None:
    png = element.screenshot_as_png if element is not None else driver.get_screenshot_as_png()
    for folder in folders:
        (folder / name).write_bytes(png)


def _wait(driver, condition, what: str):
    try:
        return WebDriverWait(driver, WAIT_S, poll_frequency=0.5, ignored_exceptions=_REDRAWN).until(condition)
    except TimeoutException:
        _save(driver, _FAILURE_FOLDERS, "timeout.png")
        pytest.fail(f"MLflow UI at {driver.current_url}: no {what} within {WAIT_S} s "
                    f"(screenshot timeout.png in {[str(f) for f in _FAILURE_FOLDERS]})")


def _close_assistant(driver) -> None:
    """Close the MLflow Assistant side panel if it is open (it takes a third of the window)."""
    for button in driver.find_elements(By.CSS_SELECTOR, ASSISTANT_CLOSE):
        try:
            if button.is_displayed():
                button.click()
        except WebDriverException:
            pass


@pytest.fixture(scope="module")
def run_page(mlflow_server: str, tiny_runs) -> str:
    """The UI page of the 2-worker run on the training view (``registry.tracking_uri.run_url``)."""
    run_id = tiny_runs[2].outcome["mlflow_run_id"]
    experiment_id = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run(run_id).info.experiment_id
    return run_url(mlflow_server, experiment_id, run_id)


def _tab_url(run_page: str, tab: str) -> str:
    page, query = run_page.split("?", 1)
    return f"{page}/{tab}?{query}"


def _chart_lines(driver, metric: str) -> list[str]:
    """The ``d`` attributes of the plotted lines in the chart card titled ``metric`` (the UI renders
    only the cards near the viewport: filter them with the search box first to reach the others)."""
    for card in driver.find_elements(By.CSS_SELECTOR, CHART_CARD):
        titles = card.find_elements(By.CSS_SELECTOR, CHART_TITLE)
        if titles and titles[0].get_attribute("title") == metric:
            return [p.get_attribute("d") or "" for p in card.find_elements(By.CSS_SELECTOR, CHART_LINE)]
    return []


def _search_charts(driver, text: str) -> None:
    box = driver.find_element(By.CSS_SELECTOR, CHART_SEARCH)
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.BACKSPACE)
    if text:
        box.send_keys(text)


def test_run_page_opens_on_the_training_view(browser, run_page: str, screenshots) -> None:
    browser.get(run_page)
    _wait(browser, EC.presence_of_element_located((By.XPATH, "//*[@role='tab' and normalize-space()='Model metrics']")),
          "'Model metrics' tab")
    _wait(browser, EC.presence_of_element_located((By.XPATH, "//*[normalize-space(text())='ddp-2']")), "run name ddp-2")
    assert "workflowType=machine_learning" in browser.current_url, browser.current_url
    _close_assistant(browser)
    _save(browser, screenshots, "run_overview.png")


def test_metric_charts_draw_lines(browser, run_page: str, screenshots) -> None:
    browser.get(_tab_url(run_page, "model-metrics"))
    _wait(browser, EC.presence_of_element_located((By.CSS_SELECTOR, CHART_CARD)), "metric chart card")
    _close_assistant(browser)
    # loss is logged at steps 1..4: a line through 4 points, i.e. a path "M x,y L x,y L x,y L x,y".
    lines = _wait(browser, lambda d: [p for p in _chart_lines(d, "loss") if p.startswith("M") and p.count("L") >= 3],
                  "line through 4 points in the 'loss' chart")
    assert len(lines) >= 1
    _save(browser, screenshots, "run_charts.png")

    _search_charts(browser, "val_bpd")  # logged at steps 2 and 4 (train.bpd_every=2): a line through 2 points
    _wait(browser, lambda d: [p for p in _chart_lines(d, "val_bpd") if p.startswith("M") and p.count("L") >= 1],
          "line in the 'val_bpd' chart")
    _save(browser, screenshots, "run_charts_val_bpd.png")
    _search_charts(browser, "")


def test_sample_grid_previews_as_an_image(browser, run_page: str, screenshots) -> None:
    browser.get(_tab_url(run_page, f"artifacts/{SAMPLE_GRID}"))
    image = _wait(
        browser,
        lambda d: next((i for i in d.find_elements(By.CSS_SELECTOR, f'img[alt="{SAMPLE_GRID}"]')
                        if d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i)), False),
        f"loaded <img> preview of {SAMPLE_GRID}",
    )
    width, height = browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image)
    assert width > 0 and height > 0
    _close_assistant(browser)
    _save(browser, screenshots, "sample_grid.png")


def test_registered_model_lists_the_version_with_its_run(browser, mlflow_server: str, tiny_runs, screenshots) -> None:
    name = tiny_runs[2].config.tracking.registered_model_name
    run_id = tiny_runs[2].outcome["mlflow_run_id"]
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    version = next(v.version for v in client.search_model_versions(f"name = '{name}'") if v.run_id == run_id)
    browser.get(f"{mlflow_server}/#/models/{name}?workflowType=machine_learning")
    _wait(browser, EC.presence_of_element_located((By.CSS_SELECTOR, f'a[href="#/models/{name}/versions/{version}"]')),
          f"link to version {version}")
    _close_assistant(browser)
    _save(browser, screenshots, "registered_model.png")

    browser.find_element(By.CSS_SELECTOR, f'a[href="#/models/{name}/versions/{version}"]').click()
    link = _wait(browser, EC.presence_of_element_located((By.CSS_SELECTOR, f'a[href*="/runs/{run_id}"]')),
                 f"link from version {version} to run {run_id}")
    assert link.text.strip() == "ddp-2"
    _save(browser, screenshots, "model_version.png")


@pytest.fixture(scope="module")
def sweep_runs_page(mlflow_server: str, asha_sweep) -> tuple[str, str, list[str]]:
    """The session's ASHA sweep (``asha_sweep``: 3 trials, one stopped early, one failed) in the server's
    store; returns the UI page of its experiment's runs, the parent's name and its children's names."""
    from _sweep_helpers import ASHA_NAME, QUICK

    from pipelines.tuning.tracking import children, find_parent

    assert asha_sweep.status == 0
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name(QUICK["tracking.experiment_name"])
    parent = find_parent(client, experiment.experiment_id, ASHA_NAME)
    names = [run.info.run_name for run in children(client, experiment.experiment_id, parent.info.run_id)]
    page = f"{mlflow_server}/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning"
    return page, parent.info.run_name, names


def test_sweep_parent_unfolds_its_trials(browser, sweep_runs_page: tuple[str, str, list[str]], screenshots) -> None:
    page, parent, trials = sweep_runs_page
    assert len(trials) == 3
    browser.get(page)
    name = _wait(browser, EC.presence_of_element_located((By.XPATH, f"//a[normalize-space()='{parent}']")),
                 f"parent run {parent} in the runs table")
    _close_assistant(browser)
    assert not any(e.is_displayed() for t in trials for e in browser.find_elements(By.XPATH, f"//a[normalize-space()='{t}']"))
    # the run-name cell holds the expander button (MLflow nests runs by the mlflow.parentRunId tag)
    name.find_element(By.XPATH, "./ancestor::div[.//button][1]//button").click()
    for trial in trials:
        _wait(browser, EC.visibility_of_element_located((By.XPATH, f"//a[normalize-space()='{trial}']")),
              f"child run {trial} under {parent}")
    _save(browser, screenshots, "sweep_runs.png")
