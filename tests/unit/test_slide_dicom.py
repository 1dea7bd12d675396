"""Converting vendor slides to DICOM WSI, without a server: the route and its state machine (plugin), the
worker's conversion stage with the conversion mocked, and OrthancWSIDicomizer failures (a fake program)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from orthanc_plugin import slides as S
from orthanc_plugin.routes import Request

TIFF = b"II*\x00" + bytes(200)


def make_service(tmp_path: Path, **config) -> S.Slides:
    store = S.SlideStore(tmp_path / "jobs.sqlite", tmp_path / "slides", max_attempts=2, lease_seconds=30)
    return S.Slides(store, S.PathologyConfig.parse(config, tmp_path), rest=None)


@pytest.fixture()
def service(tmp_path) -> S.Slides:
    return make_service(tmp_path)


def req(method: str, body: bytes | dict = b"", headers: dict | None = None) -> Request:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    return Request(method=method, path="", query={}, body=data,
                   headers={"authorization": "Basic dXNlcjpwdw==", **(headers or {})})


def upload(service: S.Slides) -> dict:
    return service.post_slide(req("POST", TIFF, {"content-type": "application/octet-stream",
                                                 "content-disposition": 'attachment; filename="a.svs"'}))[1]


def done_body(**extra) -> dict:
    return {"study_instance_uid": "1.2.3", "series_instance_uid": "1.2.3.4", "instances": 2,
            "levels": [[2220, 2967]], "timings": {"dicomize": 0.4, "store": 0.1}, "orthanc_series_id": "abc",
            **extra}


def test_route_is_listed_and_unknown_slide_is_404(service):
    assert ("POST", rf"slides/({S._ID})/dicom", service.request_dicom) in service.routes()
    with pytest.raises(S.SlideNotFound) as err:
        service.request_dicom(req("POST"), "0" * 32)
    assert err.value.status == 404


def test_request_claim_heartbeat_complete(service):
    slide = upload(service)
    assert slide["dicom"] is None
    status, view = service.request_dicom(req("POST"), slide["id"])
    assert status == 202 and view["dicom"]["status"] == "requested" and view["status"] == "pending"
    assert view["dicom"]["requested_by"] == "user"
    with pytest.raises(S.SlideError) as err:  # one conversion at a time
        service.request_dicom(req("POST"), slide["id"])
    assert err.value.status == 409 and "already being converted" in str(err.value)
    # a conversion is claimed before the slide's own QC stage, with its own lease
    status, claimed = service.claim(req("POST", {"worker": "w1"}))
    assert status == 200 and claimed["stage"] == "dicom" and claimed["slide"]["id"] == slide["id"]
    assert claimed["slide"]["source"]["sha256"] and "study" in claimed["slide"]
    lease = claimed["lease"]
    assert service.store.get(slide["id"])["state"] == "pending"  # the slide's own state is untouched
    assert service.dicom_heartbeat(req("POST", {"lease": lease, "progress": 0.5, "message": "converting"}),
                                   slide["id"])[1]["status"] == "converting"
    assert service.get_slide(req("GET"), slide["id"])[1]["dicom"]["progress"] == 0.5
    with pytest.raises(S.SlideError) as err:
        service.dicom_heartbeat(req("POST", {"lease": "wrong"}), slide["id"])
    assert err.value.status == 409
    with pytest.raises(S.SlideError, match="instances"):
        service.dicom_complete(req("POST", {"lease": lease, **done_body(instances=0)}), slide["id"])
    view = service.dicom_complete(req("POST", {"lease": lease, "worker": "w1", **done_body()}), slide["id"])[1]
    dicom = view["dicom"]
    assert dicom["status"] == "done" and dicom["instances"] == 2 and dicom["series_instance_uid"] == "1.2.3.4"
    assert dicom["seconds"] == 0.5 and dicom["error"] is None and dicom["levels"] == [[2220, 2967]]
    assert view["status"] == "pending"
    assert service.claim(req("POST", {"worker": "w2"}))[1]["stage"] == "qc"  # no conversion left
    audit = service.get_audit(req("GET"), slide["id"])[1]["audit"]
    assert [(a["from_state"], a["to_state"]) for a in audit if a["event"] == "dicom"] == [
        (None, "requested"), ("requested", "converting"), ("converting", "done")]
    assert "2 instance(s) in series 1.2.3.4" in [a for a in audit if a["event"] == "dicom"][-1]["detail"]


def test_done_needs_force_and_dicom_slides_are_refused(service):
    slide = upload(service)
    service.request_dicom(req("POST"), slide["id"])
    lease = service.claim(req("POST", {"worker": "w"}))[1]["lease"]
    service.dicom_complete(req("POST", {"lease": lease, **done_body()}), slide["id"])
    with pytest.raises(S.SlideError) as err:
        service.request_dicom(req("POST"), slide["id"])
    assert err.value.status == 409 and "force" in str(err.value)
    with pytest.raises(S.SlideError, match="force"):
        service.request_dicom(req("POST", {"force": "yes"}), slide["id"])
    view = service.request_dicom(req("POST", {"force": True}), slide["id"])[1]
    assert view["dicom"]["status"] == "requested" and view["dicom"]["series_instance_uid"] is None
    dicom_slide = service.add_series("orthanc-id", {"MainDicomTags": {"SeriesInstanceUID": "9.8"}}, actor="t")
    with pytest.raises(S.SlideError) as err:
        service.request_dicom(req("POST"), dicom_slide["id"])
    assert err.value.status == 409 and "already a DICOM WSI series" in str(err.value)
    gone = upload(service)
    (service.store.folder(gone["id"]) / "source").unlink()
    with pytest.raises(S.SlideError) as err:
        service.request_dicom(req("POST"), gone["id"])
    assert err.value.status == 409 and "gone" in str(err.value)


def test_failures_retries_and_lost_leases(service):
    slide = upload(service)
    service.request_dicom(req("POST"), slide["id"])
    lease = service.claim(req("POST", {"worker": "w"}))[1]["lease"]
    view = service.dicom_fail(req("POST", {"lease": lease, "error": "Orthanc did not answer", "retryable": True}),
                              slide["id"])[1]
    assert view["dicom"]["status"] == "requested" and "retrying" in view["dicom"]["error"]
    lease = service.claim(req("POST", {"worker": "w"}))[1]["lease"]
    error = "OrthancWSIDicomizer could not convert the slide: Bad file format (exit status 255)"
    view = service.dicom_fail(req("POST", {"lease": lease, "error": error, "retryable": True}), slide["id"])[1]
    assert view["dicom"]["status"] == "failed" and view["dicom"]["error"] == error  # 2 attempts = max_attempts
    assert view["dicom"]["attempts"] == 2 and view["status"] == "pending"
    with pytest.raises(S.SlideError) as err:  # the lease is gone with the failure
        service.dicom_complete(req("POST", {"lease": lease, **done_body()}), slide["id"])
    assert err.value.status == 409
    # a failed conversion can be asked for again; a worker that stops answering is replaced, then given up on
    assert service.request_dicom(req("POST"), slide["id"])[1]["dicom"]["attempts"] == 0
    service.claim(req("POST", {"worker": "w"}))
    service.store.release_expired(now=10 ** 12)
    assert service.store.get(slide["id"])["dicom_state"] == "requested"
    service.claim(req("POST", {"worker": "w"}))
    service.store.release_expired(now=10 ** 12)
    lost = service.get_slide(req("GET"), slide["id"])[1]["dicom"]
    assert lost["status"] == "failed" and "gave up after 2 attempts" in lost["error"]


def test_convert_to_dicom_queues_every_readable_vendor_slide(tmp_path):
    service = make_service(tmp_path, ConvertToDicom=True)
    assert service.config.convert_to_dicom and not S.PathologyConfig.parse({}, tmp_path).convert_to_dicom
    with pytest.raises(ValueError, match="AI.Pathology.ConvertToDicom"):
        S.PathologyConfig.parse({"ConvertToDicom": "yes"}, tmp_path)
    slide, unreadable = upload(service), upload(service)
    claimed = service.claim(req("POST", {"worker": "w"}))[1]
    assert claimed["stage"] == "qc" and claimed["slide"]["id"] == slide["id"]
    service.qc_complete(req("POST", {"lease": claimed["lease"], "outcome": "pass", "metadata": {"mpp_x": 0.5},
                                     "qc_state": {"tiles": "x"}}), slide["id"])
    claimed = service.claim(req("POST", {"worker": "w"}))[1]
    assert claimed["stage"] == "analysis" and service.store.get(slide["id"])["dicom_state"] == ""
    view = service.complete(req("POST", {"lease": claimed["lease"], "outputs": []}), slide["id"])[1]
    assert view["status"] == "done" and view["dicom"]["status"] == "requested"
    assert view["dicom"]["requested_by"] == "system"
    assert service.claim(req("POST", {"worker": "w"}))[1]["stage"] == "dicom"
    claimed = service.claim(req("POST", {"worker": "w"}))[1]
    assert claimed["stage"] == "qc" and claimed["slide"]["id"] == unreadable["id"]
    view = service.qc_complete(req("POST", {"lease": claimed["lease"], "outcome": "fail", "metadata": {"mpp_x": None},
                                            "error": "no pixel size"}), unreadable["id"])[1]
    assert view["status"] == "failed" and view["dicom"] is None  # no pixel size: the conversion would fail too


# -- the worker's conversion stage, with the conversion mocked --------------------------------------------
class FakeResponse:
    def __init__(self, status: int = 200, content: bytes = b"", data=None) -> None:
        self.status_code, self.content, self._data = status, content, data
        self.text = content.decode("latin-1")

    def json(self):
        return self._data

    def raise_for_status(self) -> None:
        if self.status_code >= 400:
            raise RuntimeError(self.status_code)


class FakeClient:
    """The plugin's worker routes and the bits of Orthanc's REST API that the conversion stage uses."""

    def __init__(self, source: bytes) -> None:
        self.source, self.posts, self.stored, self.deleted = source, [], [], []

    def post_json(self, uri: str, body: dict, *, timeout=None) -> FakeResponse:
        self.posts.append((uri, body))
        return FakeResponse(200, data={})

    def _request(self, method: str, uri: str, **kw) -> FakeResponse:
        if uri.endswith("/source"):
            offset = int(kw["params"]["offset"])
            return FakeResponse(200, self.source[offset:offset + int(kw["params"]["length"])])
        if uri.endswith("/report"):  # not analysed: the conversion adds no annotations
            return FakeResponse(404, data={"error": "no report yet"})
        if uri == "/tools/lookup":
            return FakeResponse(200, data=[{"Type": "Series", "ID": "old-series"}])
        if method == "DELETE":
            self.deleted.append(uri)
            return FakeResponse(200, data={})
        if uri == "/instances":
            self.stored.append(kw["data"])
            return FakeResponse(200, data={"ParentSeries": "new-series", "ParentStudy": "new-study"})
        raise AssertionError(f"unexpected {method} {uri}")


@pytest.fixture()
def claimed_conversion(tmp_path):
    from inference.pathology.synthetic import write_synthetic_slide

    source = write_synthetic_slide(tmp_path / "s.tif", 512, mpp=0.25).read_bytes()
    slide = {"id": "f" * 32, "status": "done", "attempts": 1, "created_at": "2025-01-02T03:04:05+00:00",
             "source": {"kind": "upload", "filename": "s.tif", "sha256": hashlib.sha256(source).hexdigest(),
                        "size_bytes": len(source)},
             "study": {"patient_id": "P-9", "patient_name": "Doe^Jane"}}
    return FakeClient(source), {"slide": slide, "stage": "dicom", "lease": "L", "lease_seconds": 30,
                                "settings": {"workers": 1}}


def test_worker_stores_the_converted_series_and_reports_it(claimed_conversion, tmp_path, monkeypatch):
    pytest.importorskip("cv2")
    from inference.pathology import worker as W
    from inference.pathology.dicomize import WsiSeries

    client, claimed = claimed_conversion
    seen = {}

    def fake_dicomize(source, folder, target, *, levels, threads, progress, cancelled):
        seen.update(target=target, levels=levels, source=Path(source).read_bytes())
        folder.mkdir(parents=True, exist_ok=True)
        files = [folder / "wsi-0.dcm", folder / "wsi-1.dcm"]
        for f in files:
            f.write_bytes(b"DICM")
        return WsiSeries(target.study.study_instance_uid, target.series_instance_uid, files, ["1", "2"],
                         [(512, 512)], {"dicomize": 0.3, "complete": 0.01}, "1.1")

    monkeypatch.setattr(W, "dicomize", fake_dicomize)
    W.SlideWorker(client, "w", workdir=tmp_path).process(claimed)
    target = seen["target"]
    assert seen["source"] == client.source and (target.width_px, target.mpp_x) == (512, 0.25)
    assert target.study.patient_id == "P-9" and target.study.patient_name == "Doe^Jane"
    uri, body = client.posts[-1]
    assert uri == f"/ai/slides/{'f' * 32}/dicom/complete" and body["lease"] == "L"
    assert body["annotations"] is None
    assert body["instances"] == 2 and body["orthanc_series_id"] == "new-series"
    assert body["study_instance_uid"] == target.study.study_instance_uid
    assert body["dicomizer"] == "OrthancWSIDicomizer 1.1" and set(body["timings"]) == {"dicomize", "complete", "store"}
    assert client.deleted == ["/series/old-series"] and client.stored == [b"DICM", b"DICM"]  # replaced
    # the same study as the slide's results (worker._study, used for the heatmap and the SR)
    worker = W.SlideWorker(client, "w", workdir=tmp_path)
    assert worker._study(claimed["slide"], worker._slide_key(claimed["slide"])) == target.study


def test_worker_reports_a_missing_dicomizer(claimed_conversion, tmp_path, monkeypatch):
    pytest.importorskip("cv2")
    from inference.pathology import worker as W

    client, claimed = claimed_conversion
    monkeypatch.setenv("ORTHANC_AI_DICOMIZER", str(tmp_path / "nowhere"))
    W.SlideWorker(client, "w", workdir=tmp_path).process(claimed)
    uri, body = client.posts[-1]
    assert uri.endswith("/dicom/fail") and body["retryable"] is False
    assert "not an executable" in body["error"] and client.stored == []
    monkeypatch.delenv("ORTHANC_AI_DICOMIZER")
    monkeypatch.setenv("PATH", str(tmp_path))
    W.SlideWorker(client, "w", workdir=tmp_path).process(claimed)
    assert "install the Debian package orthanc-wsi" in client.posts[-1][1]["error"]


# -- OrthancWSIDicomizer itself, replaced by a script -----------------------------------------------------
def fake_program(tmp_path: Path, script: str) -> str:
    path = tmp_path / "OrthancWSIDicomizer"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)
    return str(path)


def target():
    from inference.pathology.dicom import StudyContext
    from inference.pathology.dicomize import WsiTarget

    study = StudyContext(study_instance_uid="1.2.3", patient_id="PAT-123", patient_name="Doe^Jane")
    return WsiTarget.for_slide(study, "key", container_identifier="s.svs", width_px=2000, height_px=1000,
                               mpp_x=0.5)


def test_failure_message_has_the_log_tail_without_patient_values(tmp_path):
    from inference.pathology.dicomize import DicomizerFailed, dicomize

    program = fake_program(tmp_path, 'echo "W0101 00:00:00.1 Dicomizer.cpp:1] The input image is: $*" >&2\n'
                                     'echo "E0101 00:00:00.2 Dicomizer.cpp:2] Cannot read PAT-123 Doe^Jane" >&2\n'
                                     'echo "E0101 00:00:00.3 Dicomizer.cpp:3] Terminating on exception: Bad file '
                                     'format" >&2\nexit 0\n')
    with pytest.raises(DicomizerFailed) as err:
        dicomize(tmp_path / "slide", tmp_path / "out" / "dcm", target(), executable=program)
    message = str(err.value)
    assert "Terminating on exception: Bad file format" in message and "(exit status 0)" in message
    assert "PAT-123" not in message and "Doe^Jane" not in message and "The input image" not in message


def test_command_line_and_dataset(tmp_path):
    from inference.pathology.dicomize import dicomizer_command, wsi_dataset

    t = target()
    ds = wsi_dataset(t, "1.1")
    assert ds["StudyInstanceUID"] == "1.2.3" and ds["PatientID"] == "PAT-123"
    assert ds["SeriesInstanceUID"] == t.series_instance_uid and ds["SpecimenDescriptionSequence"][0]["SpecimenUID"]
    assert "Laterality" not in ds and ds["SoftwareVersions"].startswith("OrthancWSIDicomizer 1.1\\")
    cmd = dicomizer_command("x", Path("s"), Path("o"), Path("d.json"), t, levels=3, threads=2, openslide=None)
    # columns run along the slide's Y axis: imaged width (slide X) = rows x mpp
    assert cmd[cmd.index("--imaged-width") + 1] == "0.500000" and cmd[cmd.index("--imaged-height") + 1] == "1.000000"
    assert "--pyramid" not in cmd
    flat = dicomizer_command("x", Path("s"), Path("o"), Path("d.json"), replace(t, width_px=9000), levels=1,
                             threads=2, openslide="/lib/libopenslide.so.1")
    assert flat[flat.index("--pyramid") + 1] == "1" and flat[flat.index("--openslide") + 1] == "/lib/libopenslide.so.1"
    assert os.path.basename(flat[-1]) == "s"
