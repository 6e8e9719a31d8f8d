"""The dashboard in a real headless browser: Debian's Chromium and its driver, driven by Selenium,
against a running service and endpoint. It asserts what a person sees: a wrong token refused in
words, the sign-in link of ``tether dashboard``, counts, live charts, the endpoint's workers, a
task group's progress, and a failure's remote traceback one click away. A screenshot is saved
in the test's temporary directory (its path is printed).

Needs ``chromium`` and ``chromium-driver`` (apt); skips saying so unless ``CI`` is set (.ci/run
installs them).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tether import Executor
from tether.local import LocalStack, local_stack

import helpers

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def _missing() -> str | None:
    if not CHROMIUM or not DRIVER:
        return "needs Chromium and its driver: apt-get install -y chromium chromium-driver"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "needs selenium: pip install -e '.[test]'"
    return None


pytestmark = pytest.mark.skipif(bool(_missing()) and not os.environ.get("CI"), reason=str(_missing()))


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1800",
                f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def busy_stack(tmp_path: Path) -> Iterator[tuple[LocalStack, str]]:
    """A stack whose user ran a task group of 20 successes and one failure."""
    with local_stack(tmp_path / "home", workers=2) as stack:
        with Executor(endpoint_id=stack.endpoint_id, service=stack.service_url, token=stack.token,
                      task_group_id="campaign-1") as ex:
            ok = [ex.submit(helpers.square, i) for i in range(20)]
            bad = ex.submit(helpers.fail_with, ZeroDivisionError("the divisor was zero"))
            assert [f.result(timeout=60) for f in ok] == [i * i for i in range(20)]
            with pytest.raises(ZeroDivisionError):
                bad.result(timeout=60)
        yield stack, bad.task_id


@pytest.mark.timeout(180)
def test_the_dashboard_shows_a_users_work_at_a_glance(browser, busy_stack, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as seen
    from selenium.webdriver.support.ui import WebDriverWait

    stack, failed_task = busy_stack
    wait = WebDriverWait(browser, 30)
    text = lambda css: browser.find_element(By.CSS_SELECTOR, css).text  # noqa: E731

    # a wrong token is refused in words, and the sign-in form stays
    browser.get(stack.service_url + "/dashboard")
    wait.until(seen.visibility_of_element_located((By.ID, "token"))).send_keys("not-a-token")
    browser.find_element(By.CSS_SELECTOR, "#signin-form button").click()
    wait.until(lambda d: "did not accept that token" in text("#signin-error"))
    assert browser.find_element(By.ID, "token").is_displayed()

    # the link 'tether dashboard' prints signs in, and the token leaves the address bar
    link = subprocess.run([sys.executable, "-m", "tether.cli", "dashboard"], env=stack.env, capture_output=True,
                          text=True, timeout=60, check=True).stdout.strip()
    assert link.startswith(stack.service_url + "/dashboard#token=")
    browser.get(link)
    wait.until(lambda d: text("#who").startswith("signed in as "))
    assert "token" not in browser.current_url

    # counts, endpoint, group progress
    wait.until(lambda d: text('[data-card="succeeded"] b') == "20" and text('[data-card="failed"] b') == "1")
    endpoints = text("#endpoints")
    assert "online" in endpoints and stack.endpoint_id in endpoints and re.search(r"\d / 2\b", endpoints), endpoints
    assert "campaign-1" in text("#groups") and "21 / 21" in text("#groups .progress")

    # live charts: the throughput line rises above its baseline where the tasks finished
    points = browser.find_element(By.CSS_SELECTOR, '#chart-throughput polyline[data-name="finished"]')
    ys = [float(p.split(",")[1]) for p in points.get_attribute("points").split()]
    assert max(ys) - min(ys) > 10, ys
    assert browser.find_elements(By.CSS_SELECTOR, '#chart-states polygon[data-name="waiting"]')

    # a failure's traceback is one click away
    browser.find_element(By.CSS_SELECTOR, f'#failures a[data-task="{failed_task}"]').click()
    wait.until(lambda d: "ZeroDivisionError" in text("#traceback"))
    assert "the divisor was zero" in text("#task")
    assert "received" in text("#task") and "failed" in text("#task")

    shot = tmp_path / "dashboard.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    print(f"dashboard screenshot: {shot}")
