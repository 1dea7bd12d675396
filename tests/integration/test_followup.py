"""Follow-up with a real Orthanc: three time points of one patient built from the real brain series.

A bright spherical lesion phantom is written into the pixel data of the brain series (new Study/Series/SOP and
Frame of Reference UIDs, later Study Dates, one Patient ID): at the first time point lesion A (radius 6 mm), at
the second A grown (8 mm) and a new lesion B (7 mm), at the third A gone and B still there. The first study is
stored while the AI extension is off, so it is a prior that was never measured: the second study must bring it
into the queue. The worker writes its SRs; the follow-up routes must return the volumes from those SRs, the
same lesion across time points, the new and the disappeared one, and the response; deleting a study in
Orthanc must remove its measurements.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.integration.harness import OrthancServer, wait_for

PATIENT = "FOLLOWUP-1"
A, B = (0.0, -10.0, 20.0), (-20.0, 20.0, 40.0)  # lesion centres, patient mm (LPS)
TIMEPOINTS = (  # (study date, [(centre, radius mm)])
    ("20230110", [(A, 6.0)]),
    ("20230411", [(A, 8.0), (B, 7.0)]),
    ("20230712", [(B, 7.0)]),
)


def _phantom_series(source: list[pydicom.Dataset], out: Path, date: str, lesions: list) -> tuple[str, dict]:
    """Write the series with the lesions burnt in; returns (StudyInstanceUID, {centre: voxelised volume ml})."""
    volume = np.stack([ds.pixel_array.astype(np.float64) for ds in source])
    head = volume[volume > np.percentile(volume, 60)]
    median = float(np.median(head))
    sigma = 1.4826 * float(np.median(np.abs(head - median)))
    bright = min(median + 8.0 * sigma, 2 ** int(source[0].BitsStored) - 1)  # +8 robust SDs above the brain
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    counts = {centre: 0 for centre, _ in lesions}
    out.mkdir(parents=True, exist_ok=True)
    for k, original in enumerate(source):
        ds = copy.deepcopy(original)
        position = np.array(ds.ImagePositionPatient, dtype=float)
        orientation = np.array(ds.ImageOrientationPatient, dtype=float)
        spacing = np.array(ds.PixelSpacing, dtype=float)
        rows, columns = np.mgrid[0:ds.Rows, 0:ds.Columns]
        points = (position + columns[..., None] * spacing[1] * orientation[:3]
                  + rows[..., None] * spacing[0] * orientation[3:])
        pixels = ds.pixel_array.copy()
        for centre, radius in lesions:
            inside = np.linalg.norm(points - np.array(centre), axis=-1) <= radius
            pixels[inside] = bright
            counts[centre] += int(inside.sum())
        ds.PixelData = pixels.astype(ds.pixel_array.dtype).tobytes()
        for keyword in ("SmallestImagePixelValue", "LargestImagePixelValue"):
            if keyword in ds:
                delattr(ds, keyword)
        ds.PatientID, ds.PatientName = PATIENT, "Follow^Up"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
        ds.AccessionNumber = f"FU{date}"
        ds.save_as(out / f"{k:03d}.dcm", enforce_file_format=True)
    slice_gap = float(np.linalg.norm(np.array(source[1].ImagePositionPatient, dtype=float)
                                     - np.array(source[0].ImagePositionPatient, dtype=float)))
    voxel_ml = float(spacing[0] * spacing[1] * slice_gap) / 1000.0
    return study, {centre: n * voxel_ml for centre, n in counts.items()}


@pytest.fixture(scope="module")
def timepoints(shared_data: Path, tmp_path_factory) -> list[tuple[str, Path, dict]]:
    folder = shared_data / "mr_brain" / "siemens_t1_fl2d_sag_HFS"
    source = sorted((pydicom.dcmread(p) for p in folder.glob("*.dcm")), key=lambda ds: int(ds.InstanceNumber))
    root = tmp_path_factory.mktemp("followup-series")
    out = []
    for i, (date, lesions) in enumerate(TIMEPOINTS):
        study, volumes = _phantom_series(source, root / f"tp{i}", date, lesions)
        out.append((study, root / f"tp{i}", volumes))
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory, timepoints):
    """Orthanc whose first study arrived while the AI extension was off; then the next two studies."""
    root = tmp_path_factory.mktemp("orthanc-followup")
    off = OrthancServer(root, {"AI": {"Enabled": False}}).start(wait=False)
    try:
        wait_for(off._up, 30, "Orthanc without the AI extension")
        off.storescu(timepoints[0][1])
    finally:
        off.stop()
    server = OrthancServer(root).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def measured(server, timepoints) -> dict:
    """Send the second then the third study; wait until every SR is in the follow-up."""
    (first, _, _), (second, second_dir, _), (third, third_dir, _) = timepoints
    server.storescu(second_dir)
    jobs = {second: server.wait_jobs(second, 1, timeout=240), first: server.wait_jobs(first, 1, timeout=240)}
    _wait_timepoints(server, 2)
    server.storescu(third_dir)
    jobs[third] = server.wait_jobs(third, 1, timeout=240)
    view = _wait_timepoints(server, 3)
    for study_jobs in jobs.values():
        assert [j["state"] for j in study_jobs] == ["done"], f"{study_jobs}\n{server.log()[-3000:]}"
    return {"jobs": jobs, "view": view}


def _lesions(server):
    r = server.session.get(f"{server.url}/ai/patients/{PATIENT}/lesions", timeout=30)
    return r.json() if r.status_code == 200 else None


def _wait_timepoints(server, n: int) -> dict:
    def ready():
        view = _lesions(server)
        return view if view and len(view["timepoints"]) == n else None
    try:
        return wait_for(ready, 60, f"{n} time points in the follow-up", interval=0.5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{server.log()[-4000:]}") from None


def _sr_values(server, study_uid: str) -> dict[str, float]:
    """Tracking UID → volume (ml) as the worker's SR in Orthanc states it (read with highdicom)."""
    from inference.results.sr import read_measurement_report

    out = {}
    for series in server.series_of_study(study_uid):
        if series["MainDicomTags"].get("Modality") == "SR":
            data = server.session.get(f"{server.url}/instances/{series['Instances'][0]}/file", timeout=30).content
            for group in read_measurement_report(pydicom.dcmread(io.BytesIO(data))):
                out[group["tracking_uid"]] = group["measurements"]["Volume"][0]
    return out


def _at(tp: dict, centre, tolerance: float = 5.0) -> dict | None:
    """The lesion of a time point whose centre is within ``tolerance`` mm of ``centre``."""
    for lesion in tp["lesions"]:
        if lesion["centroid_mm"] and np.linalg.norm(np.array(lesion["centroid_mm"]) - centre) <= tolerance:
            return lesion
    return None


def test_the_unmeasured_prior_was_queued_by_the_follow_up(server, measured, timepoints) -> None:
    first = timepoints[0][0]
    (job,) = measured["jobs"][first]
    created = server.get(f"/ai/jobs/{job['id']}/audit")["audit"][0]
    assert created["event"] == "created" and created["actor"] == "follow-up", created
    report = server.get(f"/ai/patients/{PATIENT}/report")
    assert report["pending_priors"] == []  # it has been measured since


def test_the_route_returns_the_volumes_of_the_srs(server, measured, timepoints) -> None:
    view = measured["view"]
    assert view["patient_id"] == PATIENT
    assert [tp["study_instance_uid"] for tp in view["timepoints"]] == [t[0] for t in timepoints]
    assert [tp["date"] for tp in view["timepoints"]] == ["2023-01-10", "2023-04-11", "2023-07-12"]
    for tp in view["timepoints"]:
        stated = _sr_values(server, tp["study_instance_uid"])
        present = [lesion for lesion in tp["lesions"] if lesion["status"] != "disappeared"]
        assert {lesion["sr_tracking_uid"]: lesion["volume_ml"] for lesion in present} == pytest.approx(stated, abs=1e-4)
        for lesion in present:
            assert lesion["longest_diameter_mm"] > 0 and lesion["short_axis_mm"] > 0
    # lesion A as the detector measured it against the phantom written into the pixels (voxelised sphere)
    volumes = sorted((lesion["volume_ml"] for lesion in view["timepoints"][0]["lesions"]), reverse=True)
    expected_a = timepoints[0][2][A]
    assert any(abs(v - expected_a) <= 0.35 * expected_a for v in volumes), (volumes, expected_a)
    assert server.get("/ai/followup/skipped")["skipped"] == []


def test_csv_and_report(server, measured) -> None:
    r = server.session.get(f"{server.url}/ai/patients/{PATIENT}/lesions.csv", timeout=30)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/csv")
    lines = r.text.strip().splitlines()
    assert lines[0].startswith("patient_id,study_instance_uid,study_date")
    assert len(lines) - 1 == sum(len(tp["lesions"]) for tp in measured["view"]["timepoints"])
    encoded = server.session.get(f"{server.url}/ai/patients/FOLLOWUP%2D1/report", timeout=30)
    assert encoded.status_code == 200 and encoded.json()["patient"]["patient_id"] == PATIENT
    patients = server.get("/ai/patients", params={"query": "followup"})
    assert patients["total"] == 1 and patients["patients"][0]["study_count"] == 3
    report = server.get(f"/ai/patients/{PATIENT}/report")
    assert [tp["response"]["category"] for tp in report["timepoints"]][0] == "baseline"
    assert "to be confirmed by the physician" in report["current_response"]["text"]


def test_the_same_lesion_is_matched_a_new_one_labelled_and_the_response_computed(server, measured) -> None:
    view = measured["view"]
    if not any(lesion["centroid_mm"] for tp in view["timepoints"] for lesion in tp["lesions"]):
        pytest.skip("our SR does not carry lesion centres yet (issue 6: a Center of Mass SCOORD3D per group in "
                    "inference/results/sr.py); without them our lesions cannot be matched across studies")
    first, second, third = view["timepoints"]
    a1, a2 = _at(first, A), _at(second, A)
    assert a1 and a2 and a1["label"] == a2["label"] and a2["status"] == "persisting"
    assert a1["tracking_uid"] == a2["tracking_uid"] and a2["sr_tracking_uid"] != a1["sr_tracking_uid"]
    assert a2["volume_ml"] > 1.5 * a1["volume_ml"] and a2["volume_change_percent"] > 50
    b2 = _at(second, B)
    assert b2 and b2["status"] == "new" and b2["label"] not in {lesion["label"] for lesion in first["lesions"]}
    b3 = _at(third, B)
    assert b3 and b3["label"] == b2["label"] and b3["status"] == "persisting"
    gone = next(lesion for lesion in third["lesions"] if lesion["label"] == a1["label"])
    assert gone["status"] == "disappeared" and gone["volume_ml"] is None
    for lesion in first["lesions"]:  # whatever else the detector marks in this brain stays where it is
        if lesion["label"] not in (a1["label"],):
            assert {l["label"]: l["status"] for l in second["lesions"]}[lesion["label"]] == "persisting"
    assert second["response"]["category"] == "PD" and b2["label"] in second["response"]["new_lesions"]
    assert third["response"]["category"] in ("PR", "SD")  # A (a target) gone: the SLD falls
    assert third["response"]["sum_of_longest_diameters_mm"] < first["response"]["sum_of_longest_diameters_mm"]
    comparison = server.get(f"/ai/studies/{second['study_instance_uid']}/comparison")
    items = {item["label"]: item for item in comparison["comparison"]}
    assert items[a1["label"]]["status"] == "increased" and items[b2["label"]]["status"] == "new"
    assert comparison["prior"]["study_instance_uid"] == first["study_instance_uid"]


def test_deleting_a_study_removes_its_measurements(server, measured, timepoints) -> None:
    third = timepoints[2][0]
    assert server.session.delete(f"{server.url}/studies/{server.study_id(third)}", timeout=30).status_code == 200
    view = _wait_timepoints(server, 2)
    assert third not in [tp["study_instance_uid"] for tp in view["timepoints"]]
    r = server.session.get(f"{server.url}/ai/studies/{third}/comparison", timeout=30)
    assert r.status_code == 404
