"""The FA-histogram page of the built smoke book in headless Chromium (no kernel, no network).

Checks what a reader of the static page gets: the widget renders from the embedded state, its
controls switch the displayed histogram in the browser, MathJax typesets the equations, and
every request the page makes stays on this machine. Needs Debian's ``chromium`` and
``chromium-driver`` (``make browser``); skipped without them unless ``FASTERKD_MAKE_TEST=1``.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

PAGE = "executed/06_fa_histograms.html"
SCREENSHOT = Path("/tmp/fa_hist.png")
WIDGET = ".fasterkd-fa-histograms"


def _missing(reason: str) -> None:
    if os.environ.get("FASTERKD_MAKE_TEST") == "1":
        pytest.fail(f"{reason} (FASTERKD_MAKE_TEST=1: `make test` must run the browser tests)")
    pytest.skip(reason)


def _chromium() -> tuple[str, str]:
    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        _missing("headless Chromium is not installed (apt-get install -y chromium chromium-driver, or `make browser`)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        _missing("selenium is not installed (pip install -e '.[test]')")
    return browser, driver


# ------------------------------------------------------------------------------ the page


@pytest.fixture(scope="module")
def fa_html(request) -> Path:
    """The ``_build/html`` folder of the shared smoke book (conftest's ``smoke_book``)."""
    _chromium()  # skip before building the book when there is no browser to look at it
    html = request.getfixturevalue("smoke_book")
    assert (html / PAGE).is_file(), f"the smoke book has no {PAGE} (found {sorted(p.name for p in html.iterdir())})"
    return html


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep pytest output clean
        pass


@pytest.fixture(scope="module")
def server(fa_html):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(fa_html)))
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def driver():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    browser, chromedriver = _chromium()
    opts = Options()
    opts.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1400",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--disable-default-apps"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    d = webdriver.Chrome(service=Service(chromedriver), options=opts)
    yield d
    d.quit()


# ------------------------------------------------------------------------------ helpers

# A digest of the pixels of the histogram frame the reader sees (the visible <img> in the widget).
_VISIBLE_FRAME = """
const imgs = Array.from(document.querySelectorAll(arguments[0] + ' img'))
  .filter(e => e.offsetParent !== null && e.getBoundingClientRect().width > 0 && e.complete && e.naturalWidth > 0);
if (imgs.length !== 1) return {count: imgs.length};
const img = imgs[0], c = document.createElement('canvas');
c.width = img.naturalWidth; c.height = img.naturalHeight;
const ctx = c.getContext('2d'); ctx.drawImage(img, 0, 0);
const px = ctx.getImageData(0, 0, c.width, c.height).data;
let h1 = 0, h2 = 0;
for (let i = 0; i < px.length; i++) { h1 = (h1 * 31 + px[i]) >>> 0; h2 = (h2 + px[i] * (i % 251 + 1)) >>> 0; }
return {count: 1, digest: h1 + ':' + h2, width: c.width, height: c.height};
"""


def _frame(d) -> dict:
    return d.execute_script(_VISIBLE_FRAME, WIDGET)


def _wait(d, predicate, what: str, timeout: float = 30.0):
    end = time.time() + timeout
    last = None
    while time.time() < end:
        last = predicate()
        if last:
            return last
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


def _changed(d, before: str) -> dict:
    return _wait(d, lambda: (f := _frame(d)).get("count") == 1 and f["digest"] != before and f,
                 "the displayed histogram to change")


def _open(d, url: str) -> dict:
    d.get(url)
    return _wait(d, lambda: (f := _frame(d)).get("count") == 1 and f, "the FA-histogram widget to render")


# ------------------------------------------------------------------------------ tests


def test_widget_renders_and_its_controls_switch_the_histogram(driver, server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    first = _open(driver, f"{server}/{PAGE}")
    assert first["width"] > 200 and first["height"] > 100
    widget = driver.find_element(By.CSS_SELECTOR, WIDGET)
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", widget)

    # the bins slider: one step to the right shows another pre-rendered frame
    handle = driver.find_element(By.CSS_SELECTOR, f"{WIDGET} .noUi-handle")
    readout = lambda: driver.execute_script(  # noqa: E731
        "return document.querySelector(arguments[0] + ' .widget-readout').textContent.trim()", WIDGET)
    bins_before = readout()
    handle.send_keys(Keys.ARROW_RIGHT)
    moved = _changed(driver, first["digest"])
    assert readout() != bins_before
    handle.send_keys(Keys.ARROW_LEFT)
    back = _changed(driver, moved["digest"])
    assert back["digest"] == first["digest"]  # the same frame again: frames are switched, not redrawn

    # the path dropdown, the checkpoint dropdown and the ConvNorm toggle switch frames too
    path, checkpoint = [Select(s) for s in driver.find_elements(By.CSS_SELECTOR, f"{WIDGET} select")]
    path.select_by_index(2)
    f_path = _changed(driver, back["digest"])
    checkpoint.select_by_visible_text("student_c1")
    f_ck = _changed(driver, f_path["digest"])
    toggle = [b for b in driver.find_elements(By.CSS_SELECTOR, f"{WIDGET} button") if b.text == "without ConvNorm"]
    assert len(toggle) == 1
    toggle[0].click()
    _changed(driver, f_ck["digest"])

    driver.save_screenshot(str(SCREENSHOT))
    assert SCREENSHOT.stat().st_size > 10_000


def test_equations_are_typeset_and_no_request_leaves_the_machine(driver, server):
    driver.get_log("performance")  # drop the previous test's events
    _open(driver, f"{server}/{PAGE}")
    _wait(driver, lambda: driver.execute_script("return document.querySelectorAll('mjx-container').length") >= 2,
          "MathJax to typeset the equations")
    display = driver.execute_script("return document.querySelectorAll('mjx-container[display=\"true\"]').length")
    assert display >= 2  # Eq. 4 and Eq. 5 as display maths
    time.sleep(1.0)  # let late requests (fonts, widget assets) be logged
    host = urlparse(server).netloc

    def local(url: str) -> bool:
        u = urlparse(url)
        if u.scheme in ("data", "about"):
            return True
        if u.scheme == "blob":  # blob:http://127.0.0.1:port/uuid
            return urlparse(url[5:]).netloc == host
        return u.scheme in ("http", "https") and u.netloc == host or u.scheme == "file"

    resources = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    events = [json.loads(e["message"])["message"] for e in driver.get_log("performance")]
    requested = [m["params"]["request"]["url"] for m in events if m.get("method") == "Network.requestWillBeSent"]
    assert len(resources) > 5 and len(requested) > 5
    outside = sorted({u for u in resources + requested if not local(u)})
    assert not outside, f"the page requested URLs off this machine: {outside[:10]}"
    assert any("embed-amd.js" in u for u in requested) and any("tex-mml-chtml.js" in u for u in requested)
