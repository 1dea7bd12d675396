"""Fault tolerance with real processes: a worker killed again and again, Orthanc restarted under load,
parallel senders, a malformed corpus. Nothing lost, nothing duplicated, everything explained."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.integration.harness import OrthancServer, wait_for

RESULT_MODALITIES = ("SEG", "RTSTRUCT", "SR", "DOC")
FAST_RESTART = {"AI": {"WorkerRestartMaxBackoffSeconds": 1, "MaxAttempts": 3}}


@pytest.fixture(scope="module")
def brain(shared_data: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in sorted((shared_data / "mr_brain" / "siemens_t1_fl2d_sag_HFS").glob("*.dcm"))]


def brain_copy(brain: list[pydicom.Dataset], out: Path, patient: str = "FT-PATIENT", date: str = "20260101") -> str:
    """The real brain series as a new study (new UIDs): same pixels, so the same work for the model."""
    study, series = generate_uid(), generate_uid()
    out.mkdir(parents=True, exist_ok=True)
    for i, src in enumerate(brain):
        ds = copy.deepcopy(src)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientID, ds.StudyDate = patient, date
        ds.save_as(out / f"{i:03d}.dcm", enforce_file_format=True)
    return study


def results(orthanc: OrthancServer, study_uid: str) -> dict[str, int]:
    counts = {m: 0 for m in RESULT_MODALITIES}
    for s in orthanc.series_of_study(study_uid):
        modality = s["MainDicomTags"].get("Modality")
        if modality in counts:
            counts[modality] += len(s["Instances"])
    return counts


def worker_pid(orthanc: OrthancServer) -> int | None:
    proc = orthanc.health()["worker"]["processes"][0]
    return proc["pid"] if proc["state"] == "running" else None


def test_worker_killed_ten_times_each_job_done_exactly_once(tmp_path, brain):
    # Jobs are started by hand once every study is in (a job takes ~1.5 s: routing on arrival would let the
    # first ones finish while the others are still being sent), two more than the kills, for slack.
    orthanc = OrthancServer(tmp_path / "orthanc", overrides={"AI": {**FAST_RESTART["AI"], "AutoTrigger": False}}
                            ).start()
    try:
        studies = []
        for n in range(12):
            studies.append(brain_copy(brain, tmp_path / f"s{n}"))
            orthanc.storescu(tmp_path / f"s{n}")
        time.sleep(3)  # stable
        for study in studies:
            orthanc.post(f"/ai/studies/{study}/segment", {"model": "brain-lesion-candidates"}).raise_for_status()
        seen: set[str] = set()
        killed_pids: set[int] = set()
        while len(killed_pids) < 10:
            def fresh_running_job():  # a job not run before, by a worker not killed yet
                pid = worker_pid(orthanc)
                jobs = orthanc.get("/ai/jobs", params={"state": "running"})["jobs"]
                fresh = [j for j in jobs if j["id"] not in seen and j["attempts"] == 1]
                return (fresh[0], pid) if fresh and pid and pid not in killed_pids else None
            job, pid = wait_for(fresh_running_job, 120, f"job {len(killed_pids) + 1} to be running", interval=0.05)
            os.kill(pid, signal.SIGKILL)  # the worker dies in that job (or, rarely, in the next it claimed)
            seen.add(job["id"])
            killed_pids.add(pid)
        for study in studies:
            (job,) = orthanc.wait_jobs(study, timeout=300)
            assert job["state"] == "done", job
            assert results(orthanc, study) == {m: 1 for m in RESULT_MODALITIES}  # exactly once, none lost
        attempts = [orthanc.wait_jobs(s)[0]["attempts"] for s in studies]
        assert sum(a >= 2 for a in attempts) >= 9, attempts  # killed jobs were requeued and completed
        assert orthanc.health()["worker"]["processes"][0]["restarts"] >= 10
    finally:
        orthanc.stop()


def test_orthanc_restart_with_jobs_queued_and_running(tmp_path, brain):
    root = tmp_path / "orthanc"
    orthanc = OrthancServer(root, overrides=FAST_RESTART).start()
    studies = []
    try:
        studies = [brain_copy(brain, tmp_path / f"s{n}") for n in range(3)]
        senders = [threading.Thread(target=orthanc.storescu, args=(tmp_path / f"s{n}",)) for n in range(3)]
        for t in senders:  # in parallel, so the three studies become stable together
            t.start()
        for t in senders:
            t.join()

        def in_flight():
            counts = orthanc.get("/ai/jobs")["counts"]
            return counts if counts["running"] >= 1 and counts["queued"] >= 1 else None
        wait_for(in_flight, 120, "one job running and others queued", interval=0.05)
    finally:
        orthanc.stop()  # SIGTERM: Orthanc, the plugin and its worker stop with work in flight

    again = OrthancServer(root, overrides=FAST_RESTART)
    again.http_port, again.dicom_port = orthanc.http_port, orthanc.dicom_port
    again.url = orthanc.url
    again.start()
    try:
        for study in studies:
            (job,) = again.wait_jobs(study, timeout=300)  # one job per study: none lost, none duplicated
            assert job["state"] == "done", job
            assert results(again, study) == {m: 1 for m in RESULT_MODALITIES}
        assert again.health()["worker"]["state"] == "running"  # a new worker connected
    finally:
        again.stop()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    server = OrthancServer(tmp_path_factory.mktemp("orthanc-ft"), overrides=FAST_RESTART).start()
    yield server
    server.stop()


def test_parallel_associations_and_a_resend_during_the_job(orthanc, brain, tmp_path):
    a = brain_copy(brain, tmp_path / "a", date="20250101")
    b = brain_copy(brain, tmp_path / "b", date="20260101")
    threads = [threading.Thread(target=orthanc.storescu, args=(tmp_path / d,)) for d in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wait_for(lambda: orthanc.get(f"/ai/studies/{a}/jobs")["jobs"], 60, "the first job")
    orthanc.storescu(tmp_path / "a")  # the same study again while its job is queued or running
    for study in (a, b):
        jobs = orthanc.wait_jobs(study, timeout=240)
        assert [j["state"] for j in jobs] == ["done"], jobs
        assert results(orthanc, study) == {m: 1 for m in RESULT_MODALITIES}


def _slices(n: int, out: Path, template: pydicom.Dataset, mutate=None) -> str:
    study, series = generate_uid(), generate_uid()
    out.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        ds = copy.deepcopy(template)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0.0, 0.0, 2.0 * k], [1, 0, 0, 0, 1, 0]
        ds.InstanceNumber = k + 1
        if mutate:
            mutate(ds, k)
        ds.save_as(out / f"{k:04d}.dcm", enforce_file_format=True)
    return study


def test_malformed_corpus_gives_clear_outcomes(orthanc, shared_data, tmp_path):
    template = pydicom.dcmread(shared_data / "mr" / "MR_small.dcm")
    cases = {}

    def no_position(ds, k):
        del ds.ImagePositionPatient
    cases["missing ImagePositionPatient"] = (_slices(4, tmp_path / "nopos", template, no_position), "skipped",
                                             "Image Position")

    def mixed_size(ds, k):
        if k == 2:
            ds.Rows, ds.Columns = 32, 32
            ds.PixelData = np.zeros((32, 32), np.int16).tobytes()
    cases["mixed-size slices"] = (_slices(4, tmp_path / "mixed", template, mixed_size), "failed", "")

    wrong = _slices(4, tmp_path / "wrongts", template)
    for f in (tmp_path / "wrongts").glob("*.dcm"):  # claim Explicit VR Big Endian, keep Little Endian bytes
        data = f.read_bytes()
        f.write_bytes(data.replace(b"1.2.840.10008.1.2.1\x00", b"1.2.840.10008.1.2.2\x00", 1))

    for name in ("nopos", "mixed"):
        orthanc.storescu(tmp_path / name)
    wrong_status = [orthanc.session.post(orthanc.url + "/instances", data=f.read_bytes()).status_code
                    for f in sorted((tmp_path / "wrongts").glob("*.dcm"))]

    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    assert orthanc.session.post(orthanc.url + "/instances", data=b"").status_code == 400  # 0-byte file refused

    dup_dir = tmp_path / "dup"
    dup_study = _slices(4, dup_dir, template)
    orthanc.storescu(dup_dir)
    orthanc.storescu(dup_dir)  # duplicate SOP Instance UIDs: stored once

    big_study = _slices(2000, tmp_path / "big", template)
    orthanc.storescu(tmp_path / "big")

    for label, (study, state, needle) in cases.items():
        (job,) = orthanc.wait_jobs(study, timeout=120)
        assert job["state"] == state, (label, job)
        assert job["error"] and needle in job["error"], (label, job["error"])
    if all(s == 200 for s in wrong_status):  # Orthanc accepted the lie: the job must fail clearly
        (job,) = orthanc.wait_jobs(wrong, timeout=120)
        assert job["state"] in ("failed", "skipped") and job["error"], job
    else:
        assert set(wrong_status) == {400}
    (dup,) = orthanc.wait_jobs(dup_study, timeout=120)
    assert dup["input_fingerprint"] == "instances=4"
    (big,) = orthanc.wait_jobs(big_study, timeout=300)
    assert big["state"] in ("done", "skipped"), big  # a 2 000-slice series is processed or declined, clearly
    if big["state"] == "skipped":
        assert big["error"]
    health = orthanc.health()
    assert health["worker"]["state"] == "running" and health["worker"]["processes"][0]["restarts"] == 0
