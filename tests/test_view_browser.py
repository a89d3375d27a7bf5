"""``fed-nessa view`` in a real browser: headless Chromium (Debian's package) driven by selenium.

CI installs the browser (.ci/install-browser.sh); without one these tests skip, saying why.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_view import HOSTILE_ID, HOSTILE_NOTE, hostile_run

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """A headless Chromium session (skipped, with the reason, when no browser is installed)."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e .[test])")
    if not BROWSER or not DRIVER:
        pytest.skip("no Chromium and chromedriver on PATH (bash .ci/install-browser.sh installs them)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,1600"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _env() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


@pytest.fixture()
def viewer(tmp_path: Path) -> Iterator[Callable[[Path], str]]:
    """Start ``fed-nessa view RUN_DIR`` in its own process; returns its address."""
    procs: list[subprocess.Popen[str]] = []

    def start(run: Path) -> str:
        proc = subprocess.Popen([sys.executable, "-m", "fed_nessa.cli", "view", str(run)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=_env())
        procs.append(proc)
        line = proc.stdout.readline() if proc.stdout else ""
        match = re.search(r"http://127\.0\.0\.1:\d+/", line)
        assert match, line
        return match.group(0)

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=30)


def _wait(predicate: Callable[[], Any], timeout: float, what: str,
          proc: subprocess.Popen[str] | None = None) -> Any:
    """``predicate()`` once truthy; fails after ``timeout`` s, or at once if ``proc`` failed."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() not in (None, 0):
            said = proc.stderr.read() if proc.stderr else ""
            raise AssertionError(f"the run failed while waiting for {what}: {said}")
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _reported(driver: Any) -> tuple[int, bool]:
    """(rounds the page reports, whether it says the run finished)."""
    from selenium.common.exceptions import WebDriverException

    try:
        text = driver.find_element("tag name", "h1").find_element("xpath", "following-sibling::p[1]").text
    except WebDriverException:
        return -1, False
    match = re.search(r"(\d+) round\(s\) reported", text)
    return (int(match.group(1)) if match else -1), text.startswith("finished")


def test_the_page_follows_a_live_run_round_by_round(browser: Any, viewer: Callable[[Path], str],
                                                    tmp_path: Path) -> None:
    """A real `fed-nessa simulate` (the smoke config) writes the folder while the open page shows each round."""
    run = tmp_path / "live"
    browser.get(viewer(run))  # the folder does not exist yet: the page waits for the run
    assert _reported(browser) == (0, False)
    sim = subprocess.Popen([sys.executable, "-m", "fed_nessa.cli", "simulate", "--config", "smoke", "--quiet",
                            "--set", "num-server-rounds=40", "--run-dir", str(run)], env=_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        seen = {_wait(lambda: (lambda n: n[0] if n[0] > 0 and not n[1] else 0)(_reported(browser)), 300,
                      "the first round on the page", sim)}
        first = min(seen)
        _wait(lambda: _reported(browser)[0] > first, 300, "a later round on the page", sim)
        _, finished = _wait(lambda: (lambda n: n if n[1] else None)(_reported(browser)), 300, "the finished run", sim)
        assert finished and _reported(browser)[0] == 40
    finally:
        sim.wait(timeout=600)
    assert sim.returncode == 0, sim.stderr.read() if sim.stderr else ""
    body = browser.find_element("tag name", "body").text
    for shown in ("Quality", "Privacy", "Engine and cost", "spent epsilon over devices", "gate"):
        assert shown in body
    # The SVG charts drew. The page swaps its fragment in on every live refresh, so an image may be
    # mid-load at any one instant (CI saw that once): wait for a moment when all have loaded.
    _wait(lambda: browser.execute_script(
        "const im = Array.from(document.images);"
        "return im.length > 0 && im.every(i => i.complete && i.naturalWidth > 0)"), 30, "the SVG charts to draw")


def test_a_device_id_holding_markup_is_shown_as_text(browser: Any, viewer: Callable[[Path], str],
                                                     tmp_path: Path) -> None:
    browser.get(viewer(hostile_run(tmp_path / "run")))
    cells = [td.text for td in browser.find_elements("tag name", "td")]
    assert HOSTILE_ID in cells and HOSTILE_NOTE in cells
    assert browser.title != "pwned" and not browser.find_elements("css selector", "img[src='x']")
    time.sleep(2.5)  # one live refresh later (the fragment is swapped in by script): still text
    assert browser.title != "pwned" and HOSTILE_ID in [td.text for td in browser.find_elements("tag name", "td")]


def test_a_path_outside_the_run_folder_is_refused(browser: Any, viewer: Callable[[Path], str],
                                                  tmp_path: Path) -> None:
    run = hostile_run(tmp_path / "run")
    (tmp_path / "secret.json").write_text('{"secret": 1}')
    base = viewer(run)
    browser.get(base + "file/summary.json")
    assert "rounds" in browser.find_element("tag name", "body").text
    for path in ("file/%2e%2e/secret.json", "file/..%2fsecret.json", "file/%2e%2e%2f%2e%2e%2fetc%2fpasswd"):
        browser.get(base + path)
        text = browser.find_element("tag name", "body").text
        # the browser itself may resolve an encoded ".." first: then no route matches at all
        assert ("not a file of this run folder" in text or text == "Not Found") and "secret" not in text, path
