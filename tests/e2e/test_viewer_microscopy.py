"""A vendor slide converted to DICOM WSI on request opens in OHIF's microscopy mode (headless Chromium, the real
Aperio slide, a real Orthanc with the plugin and its workers)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.e2e.viewer_page import VIEWER_LOAD_MS, Viewer
from tests.integration.harness import OrthancServer, wait_for

pytest.importorskip("tiffslide", reason="the slide readers are not installed: run `make test`")


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    server = OrthancServer(tmp_path_factory.mktemp("orthanc-wsi-e2e")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def converted(orthanc, shared_data: Path) -> dict:
    """The Aperio slide uploaded, analysed and converted to a DICOM WSI series in its results' study."""
    import shutil

    svs = shared_data / "wsi" / "CMU-1-Small-Region.svs"
    if not svs.is_file():
        pytest.skip(f"{svs} is not there")
    if not shutil.which("OrthancWSIDicomizer"):
        pytest.skip("OrthancWSIDicomizer (Debian orthanc-wsi) is not installed: run `make test`")
    r = orthanc.session.post(orthanc.url + "/ai/slides", data=svs.read_bytes(), timeout=60, headers={
        "Content-Type": "application/octet-stream", "Content-Disposition": f'attachment; filename="{svs.name}"'})
    assert r.status_code == 202, r.text
    slide_id = r.json()["id"]
    wait_for(lambda: orthanc.get(f"/ai/slides/{slide_id}")["status"] in ("done", "failed", "skipped"), 240,
             "the slide's analysis", interval=0.5)
    r = orthanc.session.post(f"{orthanc.url}/ai/slides/{slide_id}/dicom", json={}, timeout=30)
    assert r.status_code == 202, r.text

    def converted_view():
        dicom = orthanc.get(f"/ai/slides/{slide_id}").get("dicom") or {}
        return dicom if dicom.get("status") in ("done", "failed") else None
    dicom = wait_for(converted_view, 240, "the DICOM conversion", interval=0.5)
    assert dicom["status"] == "done", dicom
    return dicom


def test_converted_slide_opens_in_the_microscopy_mode(browser, orthanc, converted) -> None:
    v = Viewer(browser, orthanc, "microscopy")
    frames: list[int] = []
    v.page.on("response", lambda r: frames.append(r.status) if "/frames/" in r.url else None)
    try:
        v.page.goto(f"/ohif/microscopy?StudyInstanceUIDs={converted['study_instance_uid']}")
        v.page.wait_for_selector(".ol-viewport canvas, .ol-layer canvas", timeout=VIEWER_LOAD_MS)
        v.wait_until(lambda: frames.count(200) >= 1, 60, "tiles of the slide fetched over DICOMweb")

        def tissue_on_screen() -> bool:  # H&E: pink/purple pixels, not just the white background
            png = v.page.locator(".ol-viewport").first.screenshot()
            px = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
            saturation = px.max(axis=2) - px.min(axis=2)
            return float((saturation > 40).mean()) > 0.02
        v.wait_until(tissue_on_screen, 60, "the slide's tissue drawn in the viewer")
        v.shot("microscopy.png")
        assert all(status == 200 for status in frames), frames
        errors = [c for c in v.console if c.startswith("pageerror")]
        assert not errors, errors
    finally:
        v.close()
