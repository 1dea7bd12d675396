"""A vendor slide converted to DICOM WSI on request opens in OHIF's microscopy mode (headless Chromium, the real
Aperio slide, a real Orthanc with the plugin and its workers)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.e2e.viewer_page import SCREENSHOTS, VIEWER_LOAD_MS, Viewer
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


# -- the nuclei as Microscopy Bulk Simple Annotations (ANN) over the slide ---------------------------------------

ANN_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.91.1"
# The binary elements of an annotation group (PS3.3 C.37.1.2): DICOM JSON must carry them as InlineBinary or
# BulkDataURI (PS3.18 F.2.7). Orthanc 1.10.1 writes them as "Value" holding only the FIRST number (its DCMTK
# visitor reads the value multiplicity of an O* element, which is 1), so a viewer gets one coordinate per group.
ANN_BINARY = {"00660016": "PointCoordinatesData", "00660022": "DoublePointCoordinatesData",
              "00660040": "LongPrimitivePointIndexList", "00660125": "FloatingPointValues",
              "006A0011": "AnnotationIndexList"}
YELLOW = (255, 234, 0)  # OHIF's loadAnnotation styles every annotation group in this colour

# The dicom-microscopy-viewer instance of the viewport: OHIF keeps it in the state of its React component
# (DicomMicroscopyViewport), reached from the viewport's container element through React's fiber.
_ANNOTATION_GROUPS_JS = """() => {
  const el = document.querySelector('.DicomMicroscopyViewer [data-viewportid]');
  const key = el && Object.keys(el).find(k => k.startsWith('__reactFiber$'));
  for (let fiber = key ? el[key] : null; fiber; fiber = fiber.return) {
    for (let hook = fiber.memoizedState; hook && typeof hook === 'object'; hook = hook.next) {
      const viewer = hook.memoizedState;
      if (viewer && typeof viewer.getAllAnnotationGroups === 'function') {
        return viewer.getAllAnnotationGroups().map(g => ({uid: g.uid, label: g.label, number: g.number,
          seriesInstanceUID: g.seriesInstanceUID, referencedSOPInstanceUID: g.referencedSOPInstanceUID}));
      }
    }
  }
  return null;
}"""


def _yellow_pixels(v: Viewer) -> int:
    png = v.page.locator(".ol-viewport").first.screenshot()
    px = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    r, g, b = px[..., 0], px[..., 1], px[..., 2]
    return int(((r > 200) & (g > 170) & (b < 90) & (abs(r - YELLOW[0]) + abs(g - YELLOW[1]) < 80)).sum())


def _ann_series(orthanc, converted) -> dict:
    series = orthanc.get(f"/studies/{converted['orthanc_study_id']}/series?expand")
    ann = [s for s in series if s["MainDicomTags"].get("Modality") == "ANN"]
    assert len(ann) == 1, [s["MainDicomTags"].get("Modality") for s in series]
    return ann[0]


def _binary_in_dicom_json(metadata: list[dict]) -> dict[str, str]:
    """How each binary element of the annotation groups is encoded: 'InlineBinary', 'BulkDataURI' or 'Value'."""
    found: dict[str, str] = {}

    def walk(dataset: dict) -> None:
        for tag, element in dataset.items():
            if tag in ANN_BINARY:
                found[ANN_BINARY[tag]] = next((k for k in ("InlineBinary", "BulkDataURI", "Value") if k in element),
                                              "empty")
            for item in element.get("Value", []) if element.get("vr") == "SQ" else []:
                walk(item)
    for instance in metadata:
        walk(instance)
    return found


def test_nuclei_annotations_are_drawn_on_the_slide(browser, orthanc, converted) -> None:
    """The user opens the converted slide in the microscopy mode, then the "AI Nuclei" ANN series from the study
    browser (double-click): OHIF's ANN handler hands it to dicom-microscopy-viewer, which draws the nuclei in
    yellow over the slide.

    Orthanc 1.10.1's own DICOM JSON truncates every coordinate array to its first number (see ANN_BINARY), and
    the viewer then draws no nucleus; our plugin answers the series metadata with those elements inline
    (orthanc_plugin/dicomweb_metadata.py). Everything here is real: Orthanc, the plugin, the worker's ANN."""
    assert converted.get("annotations"), converted  # the worker stored the nuclei as ANN
    ann = _ann_series(orthanc, converted)
    ann_uid = ann["MainDicomTags"]["SeriesInstanceUID"]
    metadata_path = f"/dicom-web/studies/{converted['study_instance_uid']}/series/{ann_uid}/metadata"
    metadata = orthanc.session.get(orthanc.url + metadata_path, timeout=30).json()
    assert [m["00080016"]["Value"][0] for m in metadata] == [ANN_SOP_CLASS] * len(metadata)
    encoding = _binary_in_dicom_json(metadata)
    assert {"PointCoordinatesData", "LongPrimitivePointIndexList"} <= set(encoding), encoding
    assert set(encoding.values()) <= {"InlineBinary", "BulkDataURI"}, encoding  # PS3.18 F.2.7, not "Value"

    def open_annotations(v: Viewer) -> None:
        v.page.goto(f"/ohif/microscopy?StudyInstanceUIDs={converted['study_instance_uid']}")
        v.page.wait_for_selector(".ol-viewport canvas, .ol-layer canvas", timeout=VIEWER_LOAD_MS)
        v.page.locator("[data-cy=side-panel-header-left]").first.click()  # the mode starts with it closed
        thumbnail = v.page.locator("[data-cy=study-browser-thumbnail-no-image], [data-cy=study-browser-thumbnail]",
                                   has_text="ANN").first
        thumbnail.wait_for(timeout=VIEWER_LOAD_MS)
        thumbnail.dblclick()
        v.wait_until(lambda: v.page.evaluate(_ANNOTATION_GROUPS_JS), 60, "the annotation group in the viewer")
        v.wait_until(lambda: any("add n=" in c and "annotations for annotation group" in c for c in v.console),
                     60, "the viewer creating the nuclei from the annotation group")

    def check_loaded(v: Viewer) -> list[int]:
        groups = v.page.evaluate(_ANNOTATION_GROUPS_JS)
        assert [(g["label"], g["seriesInstanceUID"]) for g in groups] == [("Nucleus (unclassified)", ann_uid)], groups
        failures = [c for c in v.console if "failed to add annotation groups" in c or "Error loading annotations"
                    in c or c.startswith("pageerror") or "Failed to retrieve" in c]
        assert not failures, failures
        assert not [t for t in v.toast_texts() if "Error loading annotations" in t]
        return [int(c.split("add n=")[1].split()[0]) for c in v.console if "add n=" in c]

    v = Viewer(browser, orthanc, "microscopy-ann")
    try:
        open_annotations(v)
        added = check_loaded(v)
        # At full resolution the viewer creates the nuclei whose outline starts inside the viewport (and again
        # when the view moves): some of the slide's nuclei, never more.
        assert added and 0 < added[0] <= converted["annotations"], (added, converted["annotations"])
        # the small test slide opens at full resolution already: no zoom needed to see the outlines
        v.wait_until(lambda: _yellow_pixels(v) > 500, 60, "yellow nuclei outlines drawn over the slide")
        path = v.shot("microscopy-annotations.png")
        if os.environ.get("AI_E2E_UPDATE_SCREENSHOTS") == "1":
            picture = Image.open(path).convert("RGB").resize((1200, 675), Image.LANCZOS)  # as 10-microscopy.jpg
            picture.save(SCREENSHOTS / "11-microscopy-annotations.jpg", quality=75, optimize=True)
    finally:
        v.close()
