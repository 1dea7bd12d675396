"""Bad input and a killed worker: jobs fail or skip visibly, nothing is lost, later jobs succeed."""

from __future__ import annotations

import copy
import os
import signal
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.integration.harness import wait_for


def _series_from(template: pydicom.Dataset, n: int, out: Path, mutate=None) -> str:
    """Write ``n`` slices of a new study/series derived from ``template``; returns the StudyInstanceUID."""
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    out.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        ds = copy.deepcopy(template)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [0.0, 0.0, 5.0 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PatientID = "RESILIENCE"
        if mutate:
            mutate(ds, k)
        ds.save_as(out / f"{k:03d}.dcm", enforce_file_format=True)
    return study


@pytest.fixture(scope="module")
def mr_small(shared_data: Path) -> pydicom.Dataset:
    return pydicom.dcmread(shared_data / "mr" / "MR_small.dcm")


def test_single_slice_series_is_skipped_with_reason(orthanc, mr_small, tmp_path):
    study = _series_from(mr_small, 1, tmp_path / "single")
    orthanc.storescu(tmp_path / "single")
    job = orthanc.wait_jobs(study)[0]
    assert job["state"] == "skipped", job
    assert "1 slice" in job["error"]


def test_series_without_pixel_data_is_skipped(orthanc, mr_small, tmp_path):
    def strip(ds, k):
        del ds.PixelData
    study = _series_from(mr_small, 4, tmp_path / "nopixels", strip)
    orthanc.storescu(tmp_path / "nopixels")
    job = orthanc.wait_jobs(study)[0]
    assert job["state"] == "skipped", job
    assert "pixel data" in job["error"].lower()


def test_unsupported_sop_class_is_skipped_and_named(orthanc, mr_small, tmp_path):
    spectroscopy = "1.2.840.10008.5.1.4.1.1.4.2"  # MR Spectroscopy Storage: Modality MR, no image

    def as_spectroscopy(ds, k):
        ds.SOPClassUID = spectroscopy
        ds.file_meta.MediaStorageSOPClassUID = spectroscopy
        del ds.PixelData
    study = _series_from(mr_small, 3, tmp_path / "mrs", as_spectroscopy)
    orthanc.storescu(tmp_path / "mrs")
    job = orthanc.wait_jobs(study)[0]
    assert job["state"] == "skipped", job
    assert "Spectroscopy" in job["error"]


def test_truncated_file_is_refused_and_the_gapped_series_fails_clearly(orthanc, mr_small, tmp_path):
    """A transfer cut short: Orthanc refuses the broken file at the door (the sender sees the error), and the
    series left with a hole gets a job that fails saying a slice is missing, instead of a wrong volume."""
    study = _series_from(mr_small, 5, tmp_path / "truncated")
    victim = tmp_path / "truncated" / "002.dcm"
    victim.write_bytes(victim.read_bytes()[:-3000])  # cut into the pixel data
    statuses = {f.name: orthanc.session.post(orthanc.url + "/instances", data=f.read_bytes()).status_code
                for f in sorted((tmp_path / "truncated").glob("*.dcm"))}
    assert statuses.pop("002.dcm") == 400
    assert set(statuses.values()) == {200}
    job = orthanc.wait_jobs(study)[0]
    assert job["state"] == "failed", job
    assert "missing" in job["error"] and "Send the complete series" in job["error"]
    assert job["attempts"] == 1  # not retried: retrying cannot fix the input


def test_bad_input_did_not_hurt_orthanc_or_the_worker(orthanc):
    health = orthanc.health()
    assert health["worker"]["state"] == "running"
    assert health["worker"]["processes"][0]["restarts"] == 0  # bad input fails jobs, never the worker
    assert orthanc.get("/system")["Version"]


def test_killed_worker_job_completes_exactly_once(orthanc, shared_data):
    """Also the 'later jobs succeed' check: it runs after the bad inputs above, on the same server."""
    brain = shared_data / "mr_brain" / "siemens_t1_fl2d_sag_HFDR"
    study = pydicom.dcmread(next(brain.glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID
    orthanc.storescu(brain)

    def running():
        jobs = orthanc.get(f"/ai/studies/{study}/jobs")["jobs"]
        return jobs[0] if jobs and jobs[0]["state"] == "running" else None
    job = wait_for(running, 60, "the brain job to start running", interval=0.05)
    pid = orthanc.health()["worker"]["processes"][0]["pid"]
    os.kill(pid, signal.SIGKILL)

    final = orthanc.wait_jobs(study, timeout=120)
    assert len(final) == 1
    done = final[0]
    assert done["id"] == job["id"] and done["state"] == "done", f"{done}\n{orthanc.log()[-3000:]}"
    assert done["attempts"] == 2, done  # the killed attempt, then the one that completed
    trail = [(a["from_state"], a["to_state"]) for a in orthanc.get(f"/ai/jobs/{job['id']}/audit")["audit"]]
    assert trail.count(("queued", "running")) == 2 and trail[-1] == ("running", "done")
    assert ("running", "queued") in trail
    segs = [s for s in orthanc.series_of_study(study) if s["MainDicomTags"]["Modality"] == "SEG"]
    assert len(segs) == 1 and len(segs[0]["Instances"]) == 1
    wait_for(lambda: orthanc.health()["worker"]["processes"][0]["pid"] not in (None, pid), 30, "a new worker")
    assert orthanc.health()["worker"]["processes"][0]["restarts"] >= 1
