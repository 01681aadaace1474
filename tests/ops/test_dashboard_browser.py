"""The dashboard in a real headless Chromium (Selenium): no console errors, a sync that finishes after
the page loaded appears (table row and plotted point), the plot canvas is not blank; /docs renders
offline from the vendored Swagger UI. .ci/run installs chromium, chromium-driver and selenium."""

from __future__ import annotations

import shutil
import time

import pytest

from wsync.schemas import JobKind

from .test_events import REPORT

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="no chromium/chromedriver binary on PATH "
                                "(.ci/run installs Debian's chromium and chromium-driver)")


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (.ci/run installs it)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1200"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait_for(fn, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def console_errors(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


# Pixels of the dense series' colour (#1f77b4) in the end-to-end-ms plot.
COUNT_DENSE = """
const c = document.querySelector('#plot-ms canvas'); const ctx = c.getContext('2d');
const d = ctx.getImageData(0, 0, c.width, c.height).data; let n = 0;
for (let i = 0; i < d.length; i += 4)
  if (Math.abs(d[i]-31) < 8 && Math.abs(d[i+1]-119) < 8 && Math.abs(d[i+2]-180) < 8 && d[i+3] > 200) n++;
return n;"""


def test_dashboard_shows_a_sync_that_just_finished(server, browser):
    browser.get(server.url + "/")
    wait_for(lambda: browser.find_element("id", "live").text == "live", what="the event stream to connect")
    assert browser.execute_script(COUNT_DENSE) == 0  # no syncs yet: nothing in the series colour
    job = server.state.runner.submit(JobKind.sync_dense, {}, ["engine:e-1"], lambda ctx: dict(REPORT))
    row = wait_for(lambda: browser.find_elements("css selector", f'#syncs tr[data-sync="{job.id}:dense"]'),
                   what="the finished sync's row")[0]
    assert "dense" in row.text and "5.0" in row.text
    wait_for(lambda: "succeeded" in browser.find_element("css selector", f'#jobs tr[data-job="{job.id}"]').text,
             what="the job row to turn succeeded")
    assert wait_for(lambda: browser.execute_script(COUNT_DENSE) > 10, what="the point to be drawn")
    assert console_errors(browser) == []


def test_dashboard_renders_history_and_docs_offline(server, browser):
    job = server.state.runner.submit(JobKind.sync_dense, {}, ["engine:e-1"], lambda ctx: dict(REPORT))
    server.wait_job(job.id, 10)
    browser.get(server.url + "/")
    assert browser.find_elements("css selector", f'#syncs tr[data-sync="{job.id}:dense"]')
    assert wait_for(lambda: browser.execute_script(COUNT_DENSE) > 10, what="history points")
    browser.get(server.url + "/docs")
    title = wait_for(lambda: browser.find_elements("css selector", ".swagger-ui .info .title"), what="Swagger UI")
    assert "wsync" in title[0].text
    html = browser.page_source
    assert "cdn.jsdelivr" not in html and "unpkg" not in html
    assert console_errors(browser) == []
