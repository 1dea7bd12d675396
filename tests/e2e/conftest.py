"""Browser tests: Debian's headless Chromium driven by Playwright against a real Orthanc with our plugin,
worker and the installed OHIF viewer (``make viewer``). One Orthanc per test module; the machine is small,
so every wait is generous but bounded.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

CHROMIUM = os.environ.get("AI_E2E_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
VIEWER_DIR = REPO / "build" / "ohif"
ARTIFACTS = Path(os.environ.get("AI_E2E_ARTIFACTS", REPO / "build" / "e2e-artifacts"))
# As root on a closed network: no sandbox, no GPU (WebGL falls back to SwiftShader, which the viewer
# needs to draw anything), no background connections.
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--enable-unsafe-swiftshader", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1600, "height": 900}


def _missing() -> str | None:
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        return f"Chromium not found at {CHROMIUM}: install Debian's `chromium` (make test does)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed in this environment (requirements-dev.txt)"
    if not shutil.which("Orthanc") or not shutil.which("storescu"):
        return "Orthanc / DCMTK are not installed: run `make test` (it installs the Debian packages)"
    if not (VIEWER_DIR / "index.html").is_file():
        return f"the OHIF viewer is not installed in {VIEWER_DIR}: run `make viewer`"
    return None


@pytest.fixture(scope="session", autouse=True)
def _e2e_ready():
    why = _missing()
    if why:
        pytest.skip(why)
    # Test the extension as it is in the work tree, not as it was at the last `make viewer`.
    result = subprocess.run([sys.executable, str(REPO / "viewer_extension" / "install.py"), "--sync-only"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    ARTIFACTS.mkdir(parents=True, exist_ok=True)


@pytest.fixture(scope="session")
def browser(_e2e_ready):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # Playwright starts it headless with a fresh temporary profile (user-data-dir) of its own.
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test item, so fixtures can save a screenshot of a failure."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
