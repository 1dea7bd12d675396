"""Forwarding results to a PACS that is down when they are ready: delivered once it is back; dead letter
after the maximum age; an operator re-queues it. The PACS is DCMTK's storescp, a real DICOM peer."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pydicom
import pytest

from tests.integration.harness import OrthancServer, PlainOrthanc, free_port, wait_for


@pytest.fixture(scope="module")
def pacs_port():
    return free_port()


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    """A second Orthanc reached over HTTP (Orthanc peer), not started until the test says so."""
    server = PlainOrthanc(tmp_path_factory.mktemp("mirror"), aet="MIRROR", dicomweb=True)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory, pacs_port, mirror):
    dead_port = free_port()
    server = OrthancServer(tmp_path_factory.mktemp("orthanc-fwd"), overrides={
        "DicomModalities": {"pacs": ["PACS", "127.0.0.1", pacs_port], "void": ["VOID", "127.0.0.1", dead_port]},
        "OrthancPeers": {"mirror": [mirror.url + "/"]},
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Servers": {"mirror-web": [mirror.url + "/dicom-web/"]}},
        "AI": {"Destinations": {"main-pacs": {"Type": "dicom", "Target": "pacs"},
                                "nowhere": {"Type": "dicom", "Target": "void"},
                                "mirror": {"Type": "peer", "Target": "mirror"},
                                "mirror-web": {"Type": "dicomweb", "Target": "mirror-web"}},
               "Outbox": {"InitialBackoffSeconds": 1, "MaxBackoffSeconds": 2, "MaxAgeSeconds": 12},
               "Rules": [{"Name": "brain", "Modality": "MR", "Model": "brain-lesion-candidates",
                          "Destinations": ["main-pacs", "nowhere", "mirror", "mirror-web"]}]}}).start()
    yield server
    server.stop()


def start_storescp(port: int, folder: Path) -> subprocess.Popen:
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(["storescp", "-aet", "PACS", "-od", str(folder), "--sort-on-study-uid", "st", str(port)],
                            env={**os.environ, "TCP_NODELAY": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    time.sleep(0.5)
    return proc


def test_results_reach_a_pacs_that_was_down(orthanc, shared_data, pacs_port, mirror, tmp_path):
    brain = shared_data / "mr_brain" / "siemens_t1_fl2d_sag_HFS"
    study = pydicom.dcmread(next(brain.glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID
    orthanc.storescu(brain)
    job = orthanc.wait_jobs(study, timeout=180)[0]
    assert job["state"] == "done" and job["destinations"] == ["main-pacs", "nowhere", "mirror", "mirror-web"]

    def items(dest):
        return [i for i in orthanc.get("/ai/outbox")["items"] if i["destination"] == dest and i["job_id"] == job["id"]]
    failed = wait_for(lambda: [i for i in items("main-pacs") if i["attempts"] >= 1], 30, "a failed first attempt")
    assert failed[0]["state"] == "pending" and failed[0]["last_error"]
    assert "failed" in orthanc.health()["destinations"]["main-pacs"]["echo"]

    received = tmp_path / "pacs"
    scp = start_storescp(pacs_port, received)
    try:
        wait_for(lambda: items("main-pacs")[0]["state"] == "delivered", 30, "delivery after the PACS came back")
        files = list(received.rglob("*"))
        modalities = sorted(pydicom.dcmread(f, stop_before_pixels=True).Modality for f in files if f.is_file())
        assert modalities == ["DOC", "RTSTRUCT", "SEG", "SR"]  # each result exactly once
    finally:
        scp.terminate()
        scp.wait()

    mirror.start()  # the second Orthanc comes up: the HTTP peer destination catches up too
    wait_for(lambda: items("mirror")[0]["state"] == "delivered", 30, "delivery to the Orthanc peer")
    try:
        wait_for(lambda: items("mirror-web")[0]["state"] == "delivered", 30, "delivery over DICOMweb STOW-RS")
    except AssertionError:
        raise AssertionError(f"STOW-RS not delivered: {items('mirror-web')}") from None
    import requests
    stored = requests.get(mirror.url + "/instances?expand", timeout=10).json()
    assert sorted(i["MainDicomTags"]["SOPInstanceUID"] for i in stored) == sorted(job["outputs"])

    dead = wait_for(lambda: [i for i in items("nowhere") if i["state"] == "dead"], 40, "the dead letter")
    assert dead[0]["attempts"] >= 2
    assert orthanc.health()["outbox"]["nowhere"]["dead"] == 1
    r = orthanc.post(f"/ai/outbox/{dead[0]['id']}/retry")
    assert r.status_code == 200 and r.json()["state"] == "pending"
