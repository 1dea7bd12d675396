"""What a user does in the viewer, as small steps for the browser tests (Playwright, sync API)."""

from __future__ import annotations

import io
import os
import re
import shutil
import time
from pathlib import Path

from tests.e2e.conftest import ARTIFACTS, VIEWPORT
from tests.integration.harness import PASSWORD, USER

REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / "docs" / "screenshots"
VIEWER_LOAD_MS = 90_000  # first load on a loaded 2-core machine: ~5 s usually
JOB_MS = 240_000
ROWS = "table tbody tr:not([data-filter-row])"  # the worklist's study rows


class Viewer:
    """One browser context (its own login and storage) on one Orthanc."""

    def __init__(self, browser, orthanc, name: str) -> None:
        self.orthanc = orthanc
        self.name = name
        self.context = browser.new_context(base_url=orthanc.url, viewport=VIEWPORT, accept_downloads=True,
                                           http_credentials={"username": USER, "password": PASSWORD})
        self.context.set_default_timeout(30_000)
        self.page = self.context.new_page()
        self.console: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        self.page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))
        self.accept_dialogs = False  # the answer to window.confirm(); the questions go to self.dialogs
        self.page.on("dialog", self._on_dialog)

    def _on_dialog(self, dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.accept() if self.accept_dialogs else dialog.dismiss()

    def close(self) -> None:
        # Leave the app first: a reload it scheduled (after a delete) racing the close has hung close().
        try:
            self.page.goto("about:blank", timeout=10_000)
        except Exception:  # the page may already be gone
            pass
        self.context.close()

    def wait_until(self, predicate, timeout_s: float, what: str, interval_ms: int = 250):
        """Poll ``predicate`` while letting Playwright dispatch its events (dialogs, downloads): a plain
        time.sleep would starve them."""
        deadline = time.time() + timeout_s
        last = None
        while time.time() < deadline:
            last = predicate()
            if last:
                return last
            self.page.wait_for_timeout(interval_ms)
        raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what} (last value: {last!r})")

    # -- navigation --------------------------------------------------------------------------------
    def open_worklist(self) -> None:
        self.page.goto("/ohif/")
        # a study row with text (the list shows an empty row while it loads)
        self.page.locator(ROWS).filter(has_text=re.compile(r"\d{4}")).first.wait_for(timeout=VIEWER_LOAD_MS)

    def rows(self, text: str | None = None):
        return self.page.locator(ROWS, has_text=text) if text else self.page.locator(ROWS)

    def open_study(self, study_uid: str) -> None:
        self.page.goto(f"/ohif/viewer?StudyInstanceUIDs={study_uid}")
        self.page.wait_for_selector("[data-cy=viewport-pane] canvas", timeout=VIEWER_LOAD_MS)
        self.page.wait_for_selector("[data-cy=study-browser-thumbnail]", timeout=VIEWER_LOAD_MS)
        self.wait_for_image()

    def wait_for_image(self, timeout_s: float = 60) -> None:
        """Until the viewport shows a picture (some bright pixels), not just a black canvas."""
        self.wait_until(lambda: self.bright_fraction() > 0.01, timeout_s, "an image in the viewport")

    def extension_status(self) -> dict | None:
        return self.page.evaluate("window.orthancAi || null")

    # -- pixels ------------------------------------------------------------------------------------
    def viewport_pixels(self):
        import numpy as np
        from PIL import Image

        png = self.page.locator("[data-cy=viewport-pane]").first.screenshot()
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)

    def bright_fraction(self) -> float:
        px = self.viewport_pixels()
        return float((px.mean(axis=2) > 60).mean())

    def overlay_pixels(self) -> int:
        """Pixels of a saturated warm colour (our SEG's recommended display colour is red/orange)."""
        px = self.viewport_pixels()
        r, g, b = px[..., 0], px[..., 1], px[..., 2]
        return int(((r > 150) & (r - g > 70) & (r - b > 70)).sum())

    # -- study browser -------------------------------------------------------------------------------
    def thumbnails(self) -> list[str]:
        loc = self.page.locator("[data-cy=study-browser-thumbnail], [data-cy=study-browser-thumbnail-no-image]")
        return [re.sub(r"\s+", " ", t) for t in loc.all_inner_texts()]

    def study_menu(self, date_text: str) -> None:
        """Open the "…" menu of the study whose header shows ``date_text`` in the study browser."""
        header = self.page.locator("[data-cy=studyBrowser-panel] h3 button", has_text=date_text).first
        header.hover()
        header.locator("button[aria-haspopup=menu]").click()
        self.page.wait_for_selector("[role=menu]")

    # -- toasts --------------------------------------------------------------------------------------
    def toast(self, text: str, timeout_ms: int = 30_000):
        loc = self.page.locator("[data-sonner-toast]", has_text=text).first
        loc.wait_for(timeout=timeout_ms)
        return loc

    def toast_texts(self) -> list[str]:
        return self.page.locator("[data-sonner-toast]").all_inner_texts()

    # -- artefacts -----------------------------------------------------------------------------------
    def shot(self, name: str, docs: bool = False) -> Path:
        """Save a screenshot as a test artefact; with docs=True and AI_E2E_UPDATE_SCREENSHOTS=1 also as
        docs/screenshots/<name> (the README's pictures)."""
        path = ARTIFACTS / f"{self.name}-{name}"
        self.page.screenshot(path=str(path))
        if docs and os.environ.get("AI_E2E_UPDATE_SCREENSHOTS") == "1":
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, SCREENSHOTS / name)
        return path

    def errors(self) -> list[str]:
        return [c for c in self.console if c.startswith(("pageerror", "error: [orthanc-ai]"))]
