"""The plugin side of slides (no server): store and state machine, leases, uploads, config, routes."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from orthanc_plugin import slides as S
from orthanc_plugin.routes import RawBody, Request

TIFF = b"II*\x00" + bytes(200)


@pytest.fixture()
def service(tmp_path) -> S.Slides:
    store = S.SlideStore(tmp_path / "jobs.sqlite", tmp_path / "slides", max_attempts=2, lease_seconds=30)
    return S.Slides(store, S.PathologyConfig.parse({}, tmp_path), rest=None)


def req(method: str, body: bytes | dict = b"", headers: dict | None = None, query: dict | None = None) -> Request:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    return Request(method=method, path="", query=query or {}, body=data,
                   headers={"authorization": "Basic dXNlcjpwdw==", **(headers or {})})


def upload(service: S.Slides, data: bytes = TIFF, **headers) -> dict:
    status, body = service.post_slide(req("POST", data, {"content-type": "application/octet-stream",
                                                         "content-disposition": 'attachment; filename="a.svs"',
                                                         **headers}))
    assert status == 202
    return body


def test_upload_stores_the_file_and_answers_the_slide(service):
    slide = upload(service, **{"x-slide-mpp": "0.25", "x-patient-id": "P1"})
    assert slide["status"] == "pending" and slide["source"]["filename"] == "a.svs"
    stored = service.store.get(slide["id"])
    assert stored["declared_mpp"] == 0.25 and stored["study"] == {"patient_id": "P1"}
    assert (service.store.folder(slide["id"]) / "source").read_bytes() == TIFF
    assert slide["source"]["sha256"] and slide["source"]["size_bytes"] == len(TIFF)


def test_refusals(service):
    with pytest.raises(S.SlideError) as err:
        service.post_slide(req("POST", b"\x89PNG\r\n\x1a\n" + bytes(100), {"content-type": "image/png"}))
    assert err.value.status == 415 and "PNG" in str(err.value)
    with pytest.raises(S.SlideError, match="mpp"):
        upload(service, **{"x-slide-mpp": "fast"})
    with pytest.raises(S.SlideError, match="series_instance_uid"):
        service.post_slide(req("POST", {"series": 1}, {"content-type": "application/json"}))


def test_multipart_mixed_and_form_parts(service):
    boundary = "XyZ"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="mpp"\r\n\r\n0.5\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="m.tif"\r\n\r\n').encode() \
        + TIFF + f"\r\n--{boundary}--\r\n".encode()
    status, slide = service.post_slide(req("POST", body, {"content-type": f"multipart/mixed; boundary={boundary}"}))
    assert status == 202 and slide["source"]["filename"] == "m.tif"
    assert service.store.get(slide["id"])["declared_mpp"] == 0.5
    # Orthanc splits multipart/form-data itself: parts arrive one by one, in order, on one thread
    part = {"content-disposition": 'form-data; name="mpp"'}
    assert service.post_slide(Request("POST", "", {}, b"0.3", part))[0] == 200
    status, slide = service.post_slide(Request("POST", "", {}, TIFF,
                                               {"content-disposition": 'form-data; name="file"; filename="f.tif"'}))
    assert service.store.get(slide["id"])["declared_mpp"] == 0.3 and slide["source"]["filename"] == "f.tif"
    other = {}
    threading.Thread(target=lambda: other.update(s=service.post_slide(Request(
        "POST", "", {}, TIFF, {"content-disposition": 'form-data; name="file"; filename="g.tif"'}))[1])).start()
    for _ in range(100):
        if other:
            break
        threading.Event().wait(0.02)
    assert service.store.get(other["s"]["id"])["declared_mpp"] is None  # fields belong to their own request


def test_state_machine_claims_and_leases(service):
    first, second = upload(service), upload(service)
    status, claimed = service.claim(req("POST", {"worker": "w1"}))
    assert status == 200 and claimed["stage"] == "qc" and claimed["slide"]["id"] == first["id"]
    lease = claimed["lease"]
    assert service.heartbeat(req("POST", {"lease": lease, "progress": 0.5}), first["id"])[1]["status"] == "qc"
    assert service.store.get(first["id"])["progress"] == pytest.approx(0.125)
    with pytest.raises(S.SlideError) as err:
        service.heartbeat(req("POST", {"lease": "wrong"}), first["id"])
    assert err.value.status == 409
    service.put_artifact(req("POST", b"png", {"x-slide-lease": lease}), first["id"], "thumbnail.png")
    with pytest.raises(S.SlideError):
        service.put_artifact(req("POST", b"x", {"x-slide-lease": lease}), first["id"], "../../etc")
    done = service.qc_complete(req("POST", {"lease": lease, "outcome": "pass", "metadata": {"width_px": 5},
                                            "qc_state": {"tiles": "x", "tile_counts": {"possible": 1}},
                                            "timings": {"thumbnail": 0.1}}), first["id"])[1]
    assert done["status"] == "queued" and done["metadata"] == {"width_px": 5} and done["files"] == ["thumbnail.png"]
    # a queued slide (its nuclei stage) goes before a pending one
    claimed = service.claim(req("POST", {"worker": "w2"}))[1]
    assert claimed["stage"] == "analysis" and claimed["slide"]["id"] == first["id"]
    assert claimed["qc_state"]["tiles"] == "x"
    view = service.complete(req("POST", {"lease": claimed["lease"], "outputs": ["1.2.3"], "summary": {"n": 3},
                                         "timings": {"nuclei": 2.0}}), first["id"])[1]
    assert view["status"] == "done" and view["progress"] == 1.0 and view["outputs"] == ["1.2.3"]
    audit = service.get_audit(req("GET"), first["id"])[1]["audit"]
    assert [a["to_state"] for a in audit if a["event"] == "transition"] == ["qc", "queued", "running", "done"]
    assert {a["detail"] for a in audit if a["event"] == "stage"} == {"thumbnail: 0.1 s", "nuclei: 2.0 s"}
    # an expired lease sends the slide back, then fails it after max_attempts
    claimed = service.claim(req("POST", {"worker": "w3"}))[1]
    assert claimed["slide"]["id"] == second["id"]
    service.store.release_expired(now=10 ** 12)
    assert service.store.get(second["id"])["state"] == "pending"
    service.claim(req("POST", {"worker": "w3"}))
    service.store.release_expired(now=10 ** 12)
    failed = service.store.get(second["id"])
    assert failed["state"] == "failed" and "gave up after 2 attempts" in failed["error"]
    assert service.rerun(req("POST"), second["id"])[1]["status"] == "pending"


def test_worker_failures_and_skips(service):
    slide = upload(service)
    lease = service.claim(req("POST", {"worker": "w"}))[1]["lease"]
    view = service.fail(req("POST", {"lease": lease, "error": "Orthanc did not answer", "retryable": True}),
                        slide["id"])[1]
    assert view["status"] == "pending" and "retrying" in view["error"]
    lease = service.claim(req("POST", {"worker": "w"}))[1]["lease"]
    view = service.qc_complete(req("POST", {"lease": lease, "outcome": "empty", "error": "no tissue found"}),
                               slide["id"])[1]
    assert view["status"] == "skipped" and view["error"] == "no tissue found"


def test_artifacts_and_delete(service):
    slide = upload(service)
    with pytest.raises(S.SlideError) as err:
        service.get_png(req("GET"), slide["id"], "heatmap")
    assert err.value.status == 404 and "pending" in str(err.value)
    (service.store.folder(slide["id"]) / "heatmap.png").write_bytes(b"\x89PNG")
    status, body = service.get_png(req("GET"), slide["id"], "heatmap")
    assert status == 200 and isinstance(body, RawBody) and body.mime == "image/png"
    chunk = service.get_source(req("GET", query={"offset": "4", "length": "10"}), slide["id"])[1]
    assert chunk.data == TIFF[4:14]
    assert service.delete_slide(req("DELETE"), slide["id"])[1]["deleted"] == slide["id"]
    assert not service.store.folder(slide["id"]).exists()
    with pytest.raises(S.SlideNotFound):
        service.get_slide(req("GET"), slide["id"])


def test_inbox_takes_files_once_they_stop_growing(service, tmp_path):
    inbox = service.config.inbox_directory
    inbox.mkdir(parents=True, exist_ok=True)
    (inbox / "a.svs").write_bytes(TIFF)
    (inbox / "b.svs.part").write_bytes(TIFF)
    assert service.scan_inbox() == []  # first sighting: it may still be copying
    created = service.scan_inbox()
    assert [s["source_kind"] for s in created] == ["inbox"] and created[0]["filename"] == "a.svs"
    assert not (inbox / "a.svs").exists() and (inbox / "b.svs.part").exists()
    (inbox / "c.txt").write_bytes(b"%PDF-1.4 nope")
    service.scan_inbox()
    bad = service.scan_inbox()[0]
    assert bad["state"] == "failed" and "PDF" in bad["error"]


def test_dicom_wsi_series_become_slides_once(service):
    class Rest:
        def get(self, uri):
            if uri.startswith("/series/"):
                return json.dumps({"ParentStudy": "st", "Instances": ["i1", "i2"], "MainDicomTags": {
                    "SeriesInstanceUID": "1.2.3", "Modality": "SM"}}).encode()
            if uri.startswith("/studies/"):
                return json.dumps({"MainDicomTags": {"StudyInstanceUID": "1.2"}}).encode()
            return S.WSI_SOP_CLASS.encode()

    service.rest = Rest()
    slide = service.on_stable_series("series-id")
    assert slide["source_kind"] == "dicom" and slide["study_instance_uid"] == "1.2"
    assert service.on_stable_series("series-id") is None  # seen already


def test_config_is_validated(tmp_path):
    cfg = S.PathologyConfig.parse({"DefaultMpp": 0.5, "BlurThreshold": 30, "HotspotCount": 5}, tmp_path)
    assert cfg.default_mpp == 0.5 and cfg.qc["blur_threshold"] == 30.0 and cfg.aggregation["hotspot_count"] == 5
    assert cfg.inbox_directory == tmp_path / "slides-inbox"
    with pytest.raises(ValueError, match="AI.Pathology.DefaultMpp"):
        S.PathologyConfig.parse({"DefaultMpp": -1}, tmp_path)
    with pytest.raises(ValueError, match="unknown key"):
        S.PathologyConfig.parse({"Blur": 1}, tmp_path)
    with pytest.raises(ValueError, match="NucleiModel"):
        S.PathologyConfig.parse({"NucleiModel": str(tmp_path / "missing")}, tmp_path)


def test_the_plugin_module_stays_light():
    source = Path(S.__file__).read_text()
    for heavy in ("numpy", "cv2", "openslide", "tiffslide", "wsidicom", "torch", "skimage"):
        assert f"import {heavy}" not in source and f"from {heavy}" not in source
