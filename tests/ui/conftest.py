"""Fixtures of the web timeline's tests (helpers: ``uiutil.py``).

- ``ui_server(store)`` starts ``chronicle ui`` on a free port and returns
  ``(url, proc)``; every server is stopped by its PID (SIGTERM) at the end of
  the test, and a traceback or ERROR on its stderr fails the test.
- ``browser`` is a page of headless Debian ``chromium`` (``/usr/bin/chromium``)
  driven by Playwright (no browser download); ``shots`` is the directory the
  test saves screenshots to (``$CHRONICLE_ARTIFACTS/ui/<test>`` if set, else
  under the test's temp dir), printed.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

try:
    from . import uiutil
except ImportError:
    import uiutil

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture
def ui_server(tmp_path):
    servers = uiutil.Servers(tmp_path)
    try:
        yield servers
    finally:
        problems = servers.stop()
    if problems:
        pytest.fail("chronicle ui:\n" + "\n".join(problems) + "\n" + servers.logs(), pytrace=False)


# -- the browser --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def _playwright():
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="session")
def _chromium(_playwright):
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"the browser tests need Debian's chromium at {CHROMIUM} (tools/setup.sh installs it)")
    browser = _playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                          args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
    yield browser
    browser.close()


@pytest.fixture
def browser(_chromium):
    context = _chromium.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    yield page
    context.close()


@pytest.fixture
def shots(request, tmp_path) -> Path:
    base = os.environ.get("CHRONICLE_ARTIFACTS")
    where = (Path(base) / "ui" / request.node.name) if base else tmp_path / "screenshots"
    where.mkdir(parents=True, exist_ok=True)
    print(f"\nscreenshots of {request.node.name}: {where}")
    return where
