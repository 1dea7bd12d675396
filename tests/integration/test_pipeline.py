"""End to end: a PACS peer sends a brain MR by C-STORE → the plugin queues a job → the worker writes a SEG."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
import requests

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


@pytest.fixture(scope="module")
def brain_series(shared_data: Path) -> Path:
    return shared_data / "mr_brain" / "siemens_t1_fl2d_sag_HFS"


@pytest.fixture(scope="module")
def brain_uids(brain_series: Path) -> tuple[str, str]:
    ds = pydicom.dcmread(next(brain_series.glob("*.dcm")), stop_before_pixels=True)
    return ds.StudyInstanceUID, ds.SeriesInstanceUID


@pytest.fixture(scope="module")
def first_run(orthanc, brain_series, brain_uids):
    orthanc.storescu(brain_series)
    jobs = orthanc.wait_jobs(brain_uids[0], 1, timeout=180)
    return jobs


def seg_instances(orthanc, study_uid: str, modality: str = "SEG") -> list[str]:
    out = []
    for series in orthanc.series_of_study(study_uid):
        if series["MainDicomTags"].get("Modality") == modality:
            out.extend(series["Instances"])
    return out


def result_counts(orthanc, study_uid: str) -> dict[str, int]:
    return {m: len(seg_instances(orthanc, study_uid, m)) for m in ("SEG", "RTSTRUCT", "SR", "DOC")}


def test_cstore_creates_one_done_job(first_run, brain_uids, orthanc):
    assert len(first_run) == 1, first_run
    job = first_run[0]
    assert job["state"] == "done", f"{job}\n{orthanc.log()[-3000:]}"
    assert job["model_id"] == "brain-lesion-candidates" and job["trigger"] == "auto"
    assert job["series_instance_uid"] == brain_uids[1]
    assert job["progress"] == 1.0 and job["attempts"] == 1 and len(job["outputs"]) == 4
    assert orthanc.get(f"/ai/jobs/{job['id']}")["state"] == "done"


def test_seg_is_aligned_valid_and_readable(first_run, brain_uids, brain_series, orthanc, tmp_path):
    instances = seg_instances(orthanc, brain_uids[0])
    assert len(instances) == 1
    series = next(s for s in orthanc.series_of_study(brain_uids[0]) if s["MainDicomTags"]["Modality"] == "SEG")
    assert series["MainDicomTags"]["SeriesDescription"].startswith("AI ")
    data = orthanc.session.get(f"{orthanc.url}/instances/{instances[0]}/file").content
    path = tmp_path / "seg.dcm"
    path.write_bytes(data)

    seg = hd.seg.segread(io.BytesIO(data))
    assert seg.SOPClassUID == SEG_CLASS and seg.SOPInstanceUID in first_run[0]["outputs"]
    assert seg.StudyInstanceUID == brain_uids[0]
    referenced = {s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence}
    assert referenced == {brain_uids[1]}
    sources = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in brain_series.glob("*.dcm")}
    frame_refs = {f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
                  for f in seg.PerFrameFunctionalGroupsSequence}
    assert frame_refs == sources  # one frame per source slice, empty ones kept
    assert int(seg.NumberOfFrames) == len(sources) * len(seg.SegmentSequence)
    assert seg.Manufacturer == "Orthanc AI" and seg.ContributingEquipmentSequence

    if shutil.which("dciodvfy"):
        out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
        errors = [l for l in (out.stdout + out.stderr).splitlines() if l.startswith("Error")]
        assert not errors, "\n".join(errors)


def test_second_send_creates_no_duplicate(first_run, brain_series, brain_uids, orthanc):
    orthanc.storescu(brain_series)
    import time
    time.sleep(5)  # past StableAge (2 s): a duplicate job would have been created by now
    jobs = orthanc.wait_jobs(brain_uids[0], 1)
    assert [j["id"] for j in jobs] == [first_run[0]["id"]]
    assert result_counts(orthanc, brain_uids[0]) == {"SEG": 1, "RTSTRUCT": 1, "SR": 1, "DOC": 1}


def test_manual_force_rerun_replaces_the_result(first_run, brain_uids, orthanc):
    r = orthanc.post(f"/ai/studies/{brain_uids[0]}/segment", {})
    assert r.status_code == 409, r.text
    r = orthanc.post(f"/ai/studies/{brain_uids[0]}/segment", {"model": "brain-lesion-candidates", "force": True})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["state"] in ("queued", "running") and job["trigger"] == "manual"
    jobs = orthanc.wait_jobs(brain_uids[0], 2)
    rerun = next(j for j in jobs if j["id"] == job["id"])
    assert rerun["state"] == "done"
    assert rerun["outputs"] == first_run[0]["outputs"]  # deterministic UIDs: replaced, not duplicated
    assert result_counts(orthanc, brain_uids[0]) == {"SEG": 1, "RTSTRUCT": 1, "SR": 1, "DOC": 1}


def test_routes_need_authentication(orthanc):
    r = requests.get(orthanc.url + "/ai/jobs", timeout=10)
    assert r.status_code == 401
    r = requests.get(orthanc.url + "/ai/jobs", auth=("tester", "wrong"), timeout=10)
    assert r.status_code == 401


def test_health_models_and_errors(orthanc):
    health = orthanc.health()
    assert health["status"] == "ok" and health["worker"]["state"] == "running"
    assert health["worker"]["processes"][0]["pid"]
    models = orthanc.get("/ai/models")["models"]
    assert "brain-lesion-candidates" in [m["id"] for m in models]
    assert orthanc.session.get(orthanc.url + "/ai/jobs/" + "0" * 32).status_code == 404
    r = orthanc.post("/ai/studies/1.2.3.4/segment", {})
    assert r.status_code == 404 and "no study" in r.json()["error"]
    r = orthanc.session.post(orthanc.url + "/ai/studies/1.2.3.4/segment", data=b"{oops")
    assert r.status_code == 400 and "JSON" in r.json()["error"]


def dciodvfy_errors(path: Path) -> list[str]:
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return [l for l in (out.stdout + out.stderr).splitlines() if l.startswith("Error")]


def test_every_result_object_is_valid_and_references_the_source(first_run, brain_uids, orthanc, tmp_path):
    from inference.results.rtstruct import read_rois
    from inference.results.sr import read_measurement_report

    series = {s["MainDicomTags"]["Modality"]: s for s in orthanc.series_of_study(brain_uids[0])}
    datasets = {}
    for modality in ("SEG", "RTSTRUCT", "SR", "DOC"):
        assert series[modality]["MainDicomTags"]["SeriesDescription"].startswith("AI ")
        instance = series[modality]["Instances"][0]
        path = tmp_path / f"{modality}.dcm"
        path.write_bytes(orthanc.session.get(f"{orthanc.url}/instances/{instance}/file").content)
        datasets[modality] = pydicom.dcmread(path)
        assert datasets[modality].StudyInstanceUID == brain_uids[0]
        assert datasets[modality].SOPInstanceUID in first_run[0]["outputs"]
        if shutil.which("dciodvfy"):
            assert not dciodvfy_errors(path), (modality, dciodvfy_errors(path))
    rois = read_rois(datasets["RTSTRUCT"])
    assert [r.name for r in rois.values()] == ["Lesion candidate"]
    groups = read_measurement_report(datasets["SR"])
    assert isinstance(groups, list)
    for group in groups:  # every measured lesion points at a segment of our SEG
        assert group["referenced_segment"][0] == datasets["SEG"].SOPInstanceUID
    assert bytes(datasets["DOC"].EncapsulatedDocument).startswith(b"%PDF")
    if shutil.which("dsrdump"):
        assert subprocess.run(["dsrdump", str(tmp_path / "SR.dcm")], capture_output=True).returncode == 0


def test_prometheus_metrics(first_run, orthanc):
    r = orthanc.session.get(orthanc.url + "/ai/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
    assert 'orthanc_ai_jobs{state="done",model="brain-lesion-candidates"}' in r.text
    assert 'orthanc_ai_job_stage_seconds_count{model="brain-lesion-candidates",stage="model"}' in r.text
    assert "orthanc_ai_worker_up" in r.text


def test_our_monai_bundle_network_runs_end_to_end(first_run, brain_uids, orthanc):
    """The built-in brain-lesion UNet is a MONAI bundle: listed, run by hand, results stored like any model's."""
    models = {m["id"]: m for m in orthanc.get("/ai/models")["models"]}
    unet = models["brain-lesion-unet"]
    assert unet["kind"] == "monai_bundle" and unet["status"] == "available" and unet["demonstration"]
    assert "brain1" in unet["accuracy"] and len(unet["sha256"]) == 64
    r = orthanc.post(f"/ai/studies/{brain_uids[0]}/segment", {"model": "brain-lesion-unet"})
    assert r.status_code == 202, r.text
    job = next(j for j in orthanc.wait_jobs(brain_uids[0], 3, timeout=300) if j["id"] == r.json()["id"])
    assert job["state"] == "done", f"{job}\n{orthanc.log()[-3000:]}"
    assert len(job["outputs"]) == 4
    counts = result_counts(orthanc, brain_uids[0])
    assert counts == {"SEG": 2, "RTSTRUCT": 2, "SR": 2, "DOC": 2}  # one set per model, side by side
