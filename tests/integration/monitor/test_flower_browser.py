"""Flower in a real browser: headless Chromium (Debian's, through chromedriver) logs in
with the session cluster's credentials and finds every GPU worker and its device.

Skipped, with the reason, where Chromium, chromedriver or selenium is missing."""

from __future__ import annotations

import base64
import importlib.util
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpu_tasks.local.cluster import LocalCluster
from tests.conftest import GPUS, NODE, wait_until
from tests.support.flowerclient import client_of

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver") or (
    "/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None)
_missing = [name for name, found in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER),
                                     ("selenium", importlib.util.find_spec("selenium")))
            if not found]
pytestmark = pytest.mark.skipif(
    bool(_missing), reason=f"{', '.join(_missing)} not installed (apt-get install chromium "
                           "chromium-driver; pip install selenium, in the dev extra)")


@pytest.fixture()
def browser(cluster: LocalCluster) -> Iterator[Any]:
    """Headless Chromium that sends the cluster's Flower credentials with every request
    (a DevTools header: credentials in the URL would not reach the page's own requests)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    assert CHROMIUM is not None and CHROMEDRIVER is not None
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        flower = client_of(cluster)
        assert flower.basic_auth is not None
        token = base64.b64encode(flower.basic_auth.encode()).decode()
        driver.execute_cdp_cmd("Network.enable", {})
        driver.execute_cdp_cmd("Network.setExtraHTTPHeaders",
                               {"headers": {"Authorization": f"Basic {token}"}})
        yield driver
    finally:
        driver.quit()


def test_a_browser_sees_every_gpu_worker_and_its_device(
        cluster: LocalCluster, browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    url = cluster.flower_url
    workers = [f"gpu{i}@{NODE}" for i in range(GPUS)]
    # Flower's worker page needs the worker inspected once; this makes sure it has been.
    client_of(cluster).workers(workers)

    # The workers list names every GPU worker
    def listed() -> set[str]:
        links = browser.find_elements(By.CSS_SELECTOR, "a[href*='/worker/']")
        return {(a.get_attribute("textContent") or "").strip() for a in links}

    browser.get(f"{url}/workers")
    wait_until(lambda: set(workers) <= listed(), timeout=30, interval=0.5,
               what=lambda: f"the page links to {sorted(listed())}")
    browser.save_screenshot(str(tmp_path / "workers.png"))

    # Each worker's page shows its GPU on the Other tab
    for i, worker in enumerate(workers):
        browser.get(f"{url}/worker/{worker}")
        assert browser.find_element(By.ID, "workername").text == worker
        browser.find_element(By.ID, "worker-tab-other").click()
        pane = browser.find_element(By.ID, "tab-other")
        wait_until(pane.is_displayed, timeout=10, interval=0.2)
        rows = {cells[0].text: cells[1].text for cells in (
            row.find_elements(By.TAG_NAME, "td") for row in pane.find_elements(
                By.TAG_NAME, "tr")) if len(cells) == 2}
        assert rows["gpu"] == f"gpu.{NODE}.{i}"
        assert f"SIM-{NODE}-{i}" in rows["gpu_device"]
        assert " used of " in rows["gpu_memory"]
        for key in ("gpu_entities", "gpu_buffers", "gpu_generation", "gpu_shards",
                    "gpu_spills", "gpu_state"):
            assert rows[key], key
        if i == 0:
            browser.save_screenshot(str(tmp_path / f"worker-{worker}.png"))
    assert (tmp_path / "workers.png").stat().st_size > 0
