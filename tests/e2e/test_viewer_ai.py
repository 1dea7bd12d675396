"""The viewer end to end, as a clinician uses it: a real Orthanc with the real plugin and worker, the installed
OHIF viewer with our extension, the real brain MR study, headless Chromium.

The tests of this module share one Orthanc and run in order: segment study A, upload study B (the same
patient a year later), follow both over time, then delete B from the study browser and A from the worklist.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pydicom
import pytest

from tests.e2e.viewer_page import JOB_MS, Viewer
from tests.integration.harness import OrthancServer, wait_for

FOLLOW_UP_DATE = "20230407"


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    # No automatic routing: here the user starts every job with the Segment button.
    server = OrthancServer(tmp_path_factory.mktemp("orthanc-e2e"), overrides={"AI": {"AutoTrigger": False}}).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def study_a(orthanc, shared_data) -> str:
    """The real brain MR study (patient "crlab", 07-Apr-2022), sent by C-STORE."""
    series = shared_data / "mr_brain" / "siemens_t1_fl2d_sag_HFS"
    orthanc.storescu(series)
    return pydicom.dcmread(next(series.glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID


@pytest.fixture(scope="module")
def study_b_files(shared_data, tmp_path_factory) -> tuple[str, list[Path]]:
    """The same patient's other real series as a follow-up study a year later (dates moved to 2023)."""
    out = tmp_path_factory.mktemp("study-b")
    files = []
    for path in sorted((shared_data / "mr_brain" / "siemens_t1_fl2d_sag_HFDR").glob("*.dcm")):
        ds = pydicom.dcmread(path)
        for keyword in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
            if keyword in ds:
                setattr(ds, keyword, FOLLOW_UP_DATE)
        ds.save_as(out / path.name)
        files.append(out / path.name)
    return str(ds.StudyInstanceUID), files


@pytest.fixture()
def study_b(orthanc, study_b_files) -> str:
    """Study B in Orthanc (uploaded by test_upload; sent by C-STORE when that test did not run)."""
    uid, files = study_b_files
    if not orthanc.study_id(uid):
        orthanc.storescu(*files)
    return uid


@pytest.fixture()
def viewer(browser, orthanc, request):
    v = Viewer(browser, orthanc, request.node.name)
    yield v
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        v.shot("failure.png")
    own_errors = [c for c in v.console if "orthanc-ai" in c and c.startswith("error")]
    v.close()
    assert not own_errors, own_errors


def mr_models(orthanc) -> list[str]:
    return [m["id"] for m in orthanc.get("/ai/models")["models"]
            if m.get("status", "available") == "available" and m["modality"].upper() == "MR"]


def click_segment(v: Viewer, orthanc, model: str = "brain-lesion-candidates") -> None:
    v.page.click("[data-cy=AISegment-btn]")
    if len(mr_models(orthanc)) > 1:  # a small menu of the models that fit the study's modality
        v.page.click(f"[data-cy=ai-model-{model}]")


def test_extension_loads_with_the_host_react(viewer, study_a):
    viewer.open_worklist()
    status = viewer.extension_status()
    assert status and status.get("loaded"), f"the AI extension did not load: {status}\n" + "\n".join(viewer.console[-20:])
    assert status["reactVersion"] == "18.3.1", (
        "the extension could not borrow the viewer's React (OHIF 3.13.2 ships React 18.3.1): the OHIF build "
        f"changed; re-check viewer_extension/ai-ext/host-react.js. Status: {status}")
    assert status["panels"] is True
    assert viewer.page.locator("[data-cy=ai-delete-study]").count() == 1
    assert "crlab" in " ".join(viewer.rows().all_inner_texts())


def test_segment_button_runs_a_job_and_results_appear_without_reload(viewer, orthanc, study_a):
    viewer.open_study(study_a)
    viewer.page.evaluate("window.__sameDocument = true")
    assert viewer.overlay_pixels() < 20
    click_segment(viewer, orthanc)
    viewer.toast("AI segmentation")
    viewer.shot("segment-toast.png")
    done = viewer.toast("Done:", timeout_ms=JOB_MS)
    viewer.page.wait_for_function(
        "document.querySelectorAll('[data-cy=study-browser-thumbnail-no-image]').length >= 4", timeout=30_000)
    thumbnails = " | ".join(viewer.thumbnails())
    for modality in ("SEG", "RTSTRUCT", "SR", "DOC"):
        assert re.search(rf"\b{modality} AI ", thumbnails), thumbnails
    assert viewer.page.evaluate("window.__sameDocument === true"), "the page was reloaded"
    viewer.shot("03-segment-done.png", docs=True)

    jobs = orthanc.get(f"/ai/studies/{study_a}/jobs")["jobs"]
    assert [(j["state"], j["trigger"], j["model_id"]) for j in jobs] == [("done", "manual", "brain-lesion-candidates")]

    # The SEG overlay in one click, on the slice where the lesion candidate is.
    done.get_by_role("button", name="Show overlay").click()
    viewer.wait_until(lambda: viewer.overlay_pixels() > 20, 45, "the SEG overlay to be drawn")
    viewer.shot("04-seg-overlay.png", docs=True)


def _job(state: str, **extra) -> dict:
    return {"id": "f" * 32, "state": state, "progress": 0, "queue_position": None, "eta_seconds": None,
            "model_id": "brain-lesion-candidates", "error": None, "message": None, "outputs": [], **extra}


def test_toast_shows_queue_position_progress_eta_and_the_error(viewer, study_a):
    """The toast's wording for every job state (the real job is too quick to show its queue)."""
    states = iter([
        _job("queued", queue_position=1, eta_seconds=40),
        _job("running", progress=0.4, eta_seconds=12, message="inference"),
        _job("running", progress=0.8, eta_seconds=3),
        _job("failed", progress=0.8, error="The series has a single slice: this model needs a volume."),
    ])
    last = {}

    def job_route(route):
        last["job"] = next(states, last.get("job"))
        route.fulfill(status=200, content_type="application/json", body=json.dumps(last["job"]))

    viewer.page.route("**/ai/models", lambda r: r.fulfill(status=200, content_type="application/json", body=json.dumps(
        {"models": [{"id": "brain-lesion-candidates", "name": "Brain lesion candidates", "modality": "MR",
                     "status": "available"}]})))
    viewer.page.route("**/ai/studies/*/segment", lambda r: r.fulfill(
        status=202, content_type="application/json",
        body=json.dumps({**_job("queued", queue_position=2, eta_seconds=95), "jobs": [_job("queued", queue_position=2, eta_seconds=95)]})))
    viewer.page.route(f"**/ai/jobs/{'f' * 32}", job_route)
    viewer.open_study(study_a)
    viewer.page.click("[data-cy=AISegment-btn]")
    viewer.toast("position 2 in the queue, starts in about 1 min 35 s")
    viewer.toast("Running — 40 %, about 12 s left")
    viewer.page.locator("[data-cy=ai-segment-progress]").wait_for()
    viewer.shot("02-segment-progress.png", docs=True)
    failed = viewer.toast("Failed: The series has a single slice: this model needs a volume.")
    assert failed.get_by_role("button", name="Retry").is_visible()


def test_model_menu_lists_the_models_that_fit_the_modality(viewer, study_a):
    models = [
        {"id": "mr-one", "name": "MR model one", "modality": "MR", "status": "available"},
        {"id": "mr-two", "name": "MR model two", "modality": "MR", "status": "available"},
        {"id": "ct-one", "name": "CT model", "modality": "CT", "status": "available"},
        {"id": "mr-off", "name": "MR model unavailable", "modality": "MR", "status": "unavailable"},
    ]
    posts: list[dict] = []

    def segment_route(route):
        posts.append(json.loads(route.request.post_data or "{}"))
        if len(posts) == 1:
            route.fulfill(status=409, content_type="application/json", body=json.dumps(
                {"error": "this study was already processed by this model; send {\"force\": true} to re-run"}))
        else:
            route.fulfill(status=202, content_type="application/json", body=json.dumps(
                _job("failed", error="stopped by the test")))

    viewer.page.route("**/ai/models", lambda r: r.fulfill(status=200, content_type="application/json",
                                                          body=json.dumps({"models": models})))
    viewer.page.route("**/ai/studies/*/segment", segment_route)
    viewer.open_study(study_a)
    viewer.page.click("[data-cy=AISegment-btn]")
    menu = viewer.page.locator("[data-cy=ai-model-menu]")
    menu.wait_for()
    items = menu.get_by_role("menuitem").all_inner_texts()
    assert [i.split(" (")[0] for i in items] == ["MR model one", "MR model two"], items
    viewer.shot("segment-model-menu.png")
    viewer.page.click("[data-cy=ai-model-mr-two]")
    again = viewer.toast("already segmented with this model")
    again.get_by_role("button", name="Run again").click()
    viewer.toast("Failed: stopped by the test")
    assert posts == [{"model": "mr-two", "force": False}, {"model": "mr-two", "force": True}]


def test_upload_by_drag_and_drop(viewer, orthanc, study_a, study_b_files):
    uid, files = study_b_files
    assert not orthanc.study_id(uid)
    viewer.open_worklist()
    viewer.page.get_by_role("button", name="Upload").click()
    zone = viewer.page.locator("[role=dialog] [tabindex='0']").filter(has_text="Drag").first
    payload = [{"name": f.name, "data": base64.b64encode(f.read_bytes()).decode()} for f in files]
    data_transfer = viewer.page.evaluate_handle("""files => {
        const dt = new DataTransfer();
        for (const f of files) {
          const bytes = Uint8Array.from(atob(f.data), c => c.charCodeAt(0));
          dt.items.add(new File([bytes], f.name, { type: 'application/dicom' }));
        }
        return dt;
      }""", payload)
    for event in ("dragenter", "dragover", "drop"):
        zone.dispatch_event(event, {"dataTransfer": data_transfer})
    viewer.page.locator("[role=dialog]", has_text=re.compile(r"files completed")).wait_for()
    viewer.shot("05-upload-progress.png", docs=True)  # usually still running: "12 of 35 files completed", a bar
    dialog = viewer.page.locator("[role=dialog]", has_text="Completed!")
    dialog.wait_for(timeout=180_000)
    assert "35 files completed" in dialog.inner_text()
    assert orthanc.study_id(uid)
    instances = orthanc.get(f"/studies/{orthanc.study_id(uid)}/instances")
    assert len(instances) == 35
    dialog.get_by_role("button", name="Close").first.click()
    viewer.open_worklist()
    viewer.rows("07-Apr-2023").wait_for()
    viewer.shot("01-worklist.png", docs=True)


def test_follow_up_panel_and_page_show_two_time_points(viewer, orthanc, study_a, study_b):
    for uid in (study_a, study_b):
        r = orthanc.post(f"/ai/studies/{uid}/segment", {"model": "brain-lesion-candidates"})
        assert r.status_code in (202, 409), r.text
        orthanc.wait_jobs(uid, 1, timeout=JOB_MS / 1000)
    probe = orthanc.session.get(f"{orthanc.url}/ai/patients/crlab/lesions", timeout=30)
    if probe.status_code == 404 and "no route" in probe.text:
        viewer.open_study(study_b)
        viewer.page.click("[data-cy=lesionFollowUp-btn]")
        viewer.page.locator("[data-cy=ai-followup-empty]", has_text="not available on this server").wait_for()
        pytest.skip("this server has no follow-up route yet: only the honest empty state was checked")

    def two_timepoints():
        r = orthanc.session.get(f"{orthanc.url}/ai/patients/crlab/lesions", timeout=30)
        return r.status_code == 200 and len(r.json()["timepoints"]) == 2 and r.json()
    data = wait_for(two_timepoints, 60, "two follow-up time points for patient crlab", interval=1)
    lesion_rows = sum(len(tp["lesions"]) for tp in data["timepoints"])
    measured = sum(l.get("volume_ml") is not None for tp in data["timepoints"] for l in tp["lesions"])

    viewer.open_study(study_a)
    viewer.page.click("[data-cy=lesionFollowUp-btn]")
    panel = viewer.page.locator("[data-cy=ai-followup-panel]")
    panel.locator("[data-cy=ai-followup-summary]", has_text="Patient crlab — 2 time points").wait_for()
    assert panel.locator("[data-cy=ai-followup-chart] circle").count() == measured
    assert panel.locator("[data-cy=ai-followup-row]").count() == lesion_rows
    viewer.shot("06-followup-panel.png", docs=True)

    page_link = panel.locator("[data-cy=ai-followup-open-page]")
    assert page_link.get_attribute("href") == "/ohif/followup?PatientID=crlab"
    viewer.page.goto("/ohif/followup?PatientID=crlab")
    page = viewer.page.locator("[data-cy=ai-followup-page]")
    page.locator("[data-cy=ai-followup-chart]").wait_for()
    assert page.locator("[data-cy=ai-followup-row]").count() == lesion_rows
    assert "07-Apr-2022" in page.inner_text() and "07-Apr-2023" in page.inner_text()
    viewer.shot("07-followup-page.png", docs=True)
    with viewer.page.expect_download() as download:
        page.locator("[data-cy=ai-followup-csv]").click()
    assert download.value.suggested_filename.endswith(".csv")
    lines = Path(download.value.path()).read_text().strip().splitlines()
    assert lines[0].startswith("patient_id,study_instance_uid,")
    assert len(lines) == 1 + lesion_rows and all(l.startswith("crlab,") for l in lines[1:])


def test_delete_from_the_study_browser_asks_first(viewer, orthanc, study_a, study_b):
    viewer.open_study(study_a)
    viewer.study_menu("07-Apr-2023")
    item = viewer.page.get_by_role("menuitem", name="Delete study")
    viewer.shot("08-study-menu-delete.png", docs=True)
    viewer.accept_dialogs = False
    item.click()
    viewer.wait_until(lambda: viewer.dialogs, 15, "the confirmation")
    question = viewer.dialogs[-1]
    assert "HFS" in question and "(ID crlab)" in question and "07-Apr-2023" in question, question
    assert "cannot be undone" in question
    viewer.page.wait_for_timeout(1500)
    assert orthanc.study_id(study_b), "cancelled, yet deleted"

    viewer.study_menu("07-Apr-2023")
    viewer.accept_dialogs = True
    viewer.page.get_by_role("menuitem", name="Delete study").click()
    viewer.wait_until(lambda: not orthanc.study_id(study_b), 30, "study B to be deleted")
    viewer.toast("Deleted the study of HFS from 07-Apr-2023")
    # the viewer reloads and its study browser lists only study A
    viewer.page.wait_for_load_state()
    viewer.page.wait_for_selector("[data-cy=study-browser-thumbnail]", timeout=90_000)
    viewer.wait_until(lambda: "07-Apr-2023" not in viewer.page.locator("[data-cy=studyBrowser-panel]").inner_text(),
                      30, "study B to leave the study browser")


def test_delete_from_the_worklist_asks_first(viewer, orthanc, study_a):
    viewer.open_worklist()
    row = viewer.rows("07-Apr-2022")
    viewer.accept_dialogs = True
    row.locator("[data-cy=ai-delete-study]").click()
    viewer.wait_until(lambda: viewer.dialogs, 15, "the confirmation")
    assert "HFS" in viewer.dialogs[-1] and "07-Apr-2022" in viewer.dialogs[-1], viewer.dialogs
    viewer.wait_until(lambda: not orthanc.study_id(study_a), 30, "study A to be deleted")
    viewer.page.wait_for_load_state()
    viewer.wait_until(lambda: viewer.rows("07-Apr-2022").count() == 0, 60, "the row to leave the worklist")
