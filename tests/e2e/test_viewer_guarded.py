"""The viewer survives a broken AI extension; it is served by Orthanc behind Orthanc's login."""

from __future__ import annotations

import pydicom
import pytest
import requests

from tests.e2e.viewer_page import Viewer
from tests.integration.harness import OrthancServer


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    server = OrthancServer(tmp_path_factory.mktemp("orthanc-e2e-guard"), overrides={"AI": {"AutoTrigger": False}}).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def study(orthanc, shared_data) -> str:
    series = shared_data / "mr_brain" / "siemens_t1_fl2d_sag_HFS"
    orthanc.storescu(series)
    return pydicom.dcmread(next(series.glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID


@pytest.fixture()
def viewer(browser, orthanc, request):
    v = Viewer(browser, orthanc, request.node.name)
    yield v
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        v.shot("failure.png")
    v.close()


BROKEN = {
    "missing": dict(status=404, content_type="text/plain", body="not found"),
    "throws": dict(status=200, content_type="text/javascript", body="throw new Error('broken on purpose');"),
    "syntax": dict(status=200, content_type="text/javascript", body="export default {"),
}


@pytest.mark.parametrize("failure", sorted(BROKEN))
def test_a_failing_extension_does_not_blank_the_viewer(viewer, study, failure):
    viewer.page.route("**/ohif/ai-ext/index.js", lambda route: route.fulfill(**BROKEN[failure]))
    viewer.open_worklist()
    assert "crlab" in " ".join(viewer.rows().all_inner_texts())
    status = viewer.extension_status()
    assert status and status["loaded"] is False and status["error"], status
    assert viewer.page.locator("[data-cy=ai-delete-study]").count() == 0
    viewer.open_study(study)  # images still show
    assert viewer.page.locator("[data-cy=AISegment-btn]").count() == 0
    assert viewer.page.locator("[data-cy=lesionFollowUp-btn]").count() == 0
    if failure == "missing":
        viewer.shot("09-extension-missing-viewer-still-works.png", docs=True)


def test_without_the_host_react_the_commands_still_work(viewer, study):
    """What happens on an OHIF build where the React lookup fails: no React parts, no blank page."""
    viewer.page.route("**/ohif/ai-ext/host-react.js", lambda route: route.fulfill(
        status=200, content_type="text/javascript",
        body="export const EXPECTED_REACT_MAJOR = 18; export function getHostReact() { return null; }"))
    viewer.open_worklist()
    status = viewer.extension_status()
    assert status["loaded"] is True and status["reactVersion"] is None and status["panels"] is False
    assert "not the pinned 3.13.2" in status["error"]
    assert viewer.page.locator("[data-cy=ai-delete-study]").count() == 0
    viewer.open_study(study)
    assert viewer.page.locator("[data-cy=AISegment-btn]").count() == 1
    assert viewer.page.locator("[data-cy=lesionFollowUp-btn]").count() == 0


def test_viewer_is_served_by_orthanc_behind_its_login(orthanc):
    assert requests.get(f"{orthanc.url}/ohif/", timeout=10).status_code == 401
    assert requests.get(f"{orthanc.url}/ohif/ai-ext/index.js", timeout=10).status_code == 401
    s = orthanc.session
    page = s.get(f"{orthanc.url}/ohif/viewer", params={"StudyInstanceUIDs": "1.2.3"}, timeout=10)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert 'src="/ohif/app-config.js"' in page.text and page.headers["Cache-Control"] == "no-cache"
    module = s.get(f"{orthanc.url}/ohif/ai-ext/index.js", timeout=10)
    assert module.status_code == 200 and module.headers["Content-Type"].startswith("text/javascript")
    assert s.get(f"{orthanc.url}/ohif/no-such-bundle.js", timeout=10).status_code == 404
    assert orthanc.get("/ai/viewer") == {"installed": True, "url": "/ohif/", "ohif_version": "3.13.2",
                                         "package": "@ohif/app"}
