"""A vendor slide converted to DICOM WSI on request (OrthancWSIDicomizer in the worker), against a real Orthanc
with our plugin and worker: the series lands in the study of the slide's results, has the slide's size, opens
in wsidicom, passes dciodvfy, is replaced (not duplicated) when converted again, and is not analysed again."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from tests.integration.harness import wait_for
from tests.integration.test_slides import dciodvfy_errors, fetch_instance, upload, wait_slide

pytest.importorskip("wsidicom", reason="wsidicom is not installed: run `make test`")

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"


@pytest.fixture(scope="module")
def svs(shared_data: Path) -> Path:
    path = shared_data / "wsi" / "CMU-1-Small-Region.svs"
    if not path.is_file():
        pytest.skip(f"{path} is not there")
    if not shutil.which("OrthancWSIDicomizer"):
        pytest.skip("OrthancWSIDicomizer is not installed: install the Debian package orthanc-wsi (`make deps`)")
    return path


def wait_dicom(orthanc, slide_id: str, timeout: float = 180) -> dict:
    def ready():
        slide = orthanc.get(f"/ai/slides/{slide_id}")
        return slide if slide["dicom"] and slide["dicom"]["status"] in ("done", "failed") else None
    try:
        return wait_for(ready, timeout, f"the conversion of slide {slide_id}", interval=0.2)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{orthanc.log()[-4000:]}") from None


@pytest.fixture(scope="module")
def converted(orthanc, svs) -> dict:
    r = upload(orthanc, svs, patient_id="PATH-042", patient_name="Wsi^Convert")
    assert r.status_code == 202, r.text
    slide = wait_slide(orthanc, r.json()["id"])
    assert slide["status"] == "done", slide["error"]
    assert slide["dicom"] is None  # AI.Pathology.ConvertToDicom is off by default
    started = time.perf_counter()
    r = orthanc.post(f"/ai/slides/{slide['id']}/dicom")
    assert r.status_code == 202, r.text
    assert r.json()["dicom"]["status"] == "requested" and r.json()["status"] == "done"
    again = orthanc.post(f"/ai/slides/{slide['id']}/dicom")
    assert again.status_code == 409 and "already being converted" in again.json()["error"]
    slide = wait_dicom(orthanc, slide["id"])
    slide["_wall_seconds"] = round(time.perf_counter() - started, 2)
    print(f"\nconversion of {svs.name}: {slide['_wall_seconds']} s from request to done "
          f"(worker timings {slide['dicom']['timings']})")
    return slide


def series_instances(orthanc, study_uid: str, series_uid: str) -> list[dict]:
    r = orthanc.session.get(f"{orthanc.url}/dicom-web/studies/{study_uid}/series/{series_uid}/instances", timeout=30)
    r.raise_for_status()
    return r.json()


def test_conversion_is_done_and_audited(converted, orthanc):
    dicom = converted["dicom"]
    assert dicom["status"] == "done", dicom["error"]
    assert dicom["instances"] >= 1 and dicom["levels"] == [[2220, 2967]] and dicom["error"] is None
    assert dicom["dicomizer"].startswith("OrthancWSIDicomizer") and dicom["seconds"] > 0
    assert converted["status"] == "done" and converted["results"]["nuclei_total"] > 100  # results untouched
    audit = orthanc.get(f"/ai/slides/{converted['id']}/audit")["audit"]
    assert [a["to_state"] for a in audit if a["event"] == "dicom"] == ["requested", "converting", "done"]
    assert [a["to_state"] for a in audit if a["event"] == "transition"] == ["qc", "queued", "running", "done"]


def test_wsi_series_is_in_the_results_study_over_dicomweb(converted, orthanc, tmp_path):
    dicom = converted["dicom"]
    results_study = {fetch_instance(orthanc, uid, tmp_path / f"r{i}.dcm").StudyInstanceUID
                     for i, uid in enumerate(converted["outputs"])}
    assert results_study == {dicom["study_instance_uid"]}
    r = orthanc.session.get(f"{orthanc.url}/dicom-web/studies/{dicom['study_instance_uid']}/series",
                            params={"Modality": "SM"}, timeout=30)
    r.raise_for_status()
    sm = [s for s in r.json() if s["0020000E"]["Value"][0] == dicom["series_instance_uid"]]
    assert len(sm) == 1, r.json()
    instances = series_instances(orthanc, dicom["study_instance_uid"], dicom["series_instance_uid"])
    assert len(instances) == dicom["instances"]
    assert {i["00080016"]["Value"][0] for i in instances} == {WSI_SOP_CLASS}
    metadata = orthanc.session.get(f"{orthanc.url}/dicom-web/studies/{dicom['study_instance_uid']}/series/"
                                   f"{dicom['series_instance_uid']}/metadata", timeout=30).json()
    level0 = max(metadata, key=lambda m: m["00480006"]["Value"][0])
    assert (level0["00480006"]["Value"][0], level0["00480007"]["Value"][0]) == (
        converted["metadata"]["width_px"], converted["metadata"]["height_px"])
    assert level0["00100020"]["Value"][0] == "PATH-042"
    assert level0["00100010"]["Value"][0]["Alphabetic"] == "Wsi^Convert"
    shared = level0["52009229"]["Value"][0]["00289110"]["Value"][0]["00280030"]["Value"]
    assert shared == pytest.approx([converted["metadata"]["mpp_x"] / 1000] * 2, rel=1e-4)


def download_series(orthanc, series_id: str, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, instance in enumerate(orthanc.get(f"/series/{series_id}")["Instances"]):
        r = orthanc.session.get(f"{orthanc.url}/instances/{instance}/file", timeout=60)
        r.raise_for_status()
        paths.append(folder / f"{i:04d}.dcm")
        paths[-1].write_bytes(r.content)
    return paths


def test_wsidicom_reads_the_series_like_the_source(converted, orthanc, svs, tmp_path):
    import tiffslide
    from wsidicom import WsiDicom

    download_series(orthanc, converted["dicom"]["orthanc_series_id"], tmp_path / "wsi")
    with WsiDicom.open(tmp_path / "wsi") as wsi, tiffslide.TiffSlide(svs) as source:
        assert (wsi.size.width, wsi.size.height) == (2220, 2967)
        assert wsi.levels[0].mpp.width == pytest.approx(0.499, rel=1e-4)
        region = np.asarray(wsi.read_region((600, 900), 0, (512, 512)).convert("RGB"), dtype=np.int16)
        expected = np.asarray(source.read_region((600, 900), 0, (512, 512)).convert("RGB"), dtype=np.int16)
    assert region.shape == (512, 512, 3)
    # the JPEG tiles were transcoded, not re-encoded: the same pixels up to decoder rounding
    assert np.abs(region - expected).mean() < 2.0, np.abs(region - expected).mean()


def test_instances_pass_dciodvfy(converted, orthanc, tmp_path):
    if not shutil.which("dciodvfy"):
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    paths = download_series(orthanc, converted["dicom"]["orthanc_series_id"], tmp_path / "v")
    errors = {str(p.name): dciodvfy_errors(p) for p in paths}
    assert not any(errors.values()), errors
    ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
    frame_type = ds.SharedFunctionalGroupsSequence[0].WholeSlideMicroscopyImageFrameTypeSequence[0].FrameType
    assert list(ds.ImageType) == list(frame_type) == ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]


def test_nuclei_are_bulk_annotations_on_the_converted_image(converted, orthanc, tmp_path):
    import highdicom as hd

    dicom = converted["dicom"]
    total = converted["results"]["nuclei_total"]
    assert dicom["annotations"] == total and dicom["timings"]["annotations"] > 0, dicom
    study_id = orthanc.study_id(dicom["study_instance_uid"])
    series = [s for s in orthanc.get(f"/studies/{study_id}/series") if s["MainDicomTags"].get("Modality") == "ANN"]
    assert len(series) == 1, series
    paths = download_series(orthanc, series[0]["ID"], tmp_path / "ann")
    level0 = [p for p in download_series(orthanc, dicom["orthanc_series_id"], tmp_path / "wsi")
              if int(pydicom.dcmread(p, stop_before_pixels=True).TotalPixelMatrixColumns) == 2220]
    level0_uid = pydicom.dcmread(level0[0], stop_before_pixels=True).SOPInstanceUID
    count = 0
    for path in paths:
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.91.1"
        assert ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID == level0_uid  # the converted image
        assert ds.StudyInstanceUID == dicom["study_instance_uid"]
        for group in hd.ann.MicroscopyBulkSimpleAnnotations.from_dataset(ds).get_annotation_groups():
            polygons = group.get_graphic_data(coordinate_type="2D")
            count += len(polygons)
            inside = np.concatenate(polygons)
            assert inside[:, 0].max() <= 2220 and inside[:, 1].max() <= 2967 and inside.min() >= 0
        if shutil.which("dciodvfy"):
            assert not dciodvfy_errors(path), dciodvfy_errors(path)
    assert count == total


def test_annotations_keep_their_coordinates_over_dicomweb(converted, orthanc, tmp_path):
    """WADO-RS series metadata of the ANN carries every coordinate (InlineBinary, PS3.18 F.2.7), the same bytes as
    the stored file: Orthanc 1.10's DICOM JSON alone gives the first number only, and OHIF then draws nothing."""
    import base64

    dicom = converted["dicom"]
    study_id = orthanc.study_id(dicom["study_instance_uid"])
    ann = next(s for s in orthanc.get(f"/studies/{study_id}/series") if s["MainDicomTags"].get("Modality") == "ANN")
    stored = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p)
              for p in download_series(orthanc, ann["ID"], tmp_path / "ann")}
    r = orthanc.session.get(f"{orthanc.url}/dicom-web/studies/{dicom['study_instance_uid']}/series/"
                            f"{ann['MainDicomTags']['SeriesInstanceUID']}/metadata", timeout=30)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("application/dicom+json"), r.text[:300]
    metadata = r.json()
    assert {m["00080018"]["Value"][0] for m in metadata} == set(stored)
    checked = 0
    for instance in metadata:
        ds = stored[instance["00080018"]["Value"][0]]
        for item, group in zip(instance["006A0002"]["Value"], ds.AnnotationGroupSequence):
            for tag, keyword in (("00660016", "PointCoordinatesData"), ("00660040", "LongPrimitivePointIndexList")):
                if keyword in group:
                    assert base64.b64decode(item[tag]["InlineBinary"]) == group[keyword].value, tag
                    assert "Value" not in item[tag]
                    checked += 1
        assert instance["00100020"]["Value"][0] == "PATH-042"
    assert checked >= 2


def test_other_series_metadata_is_the_dicomweb_plugins_own(converted, orthanc):
    """Every other series' metadata is what the DICOMweb plugin answers for each of its instances."""
    dicom = converted["dicom"]
    base = f"{orthanc.url}/dicom-web/studies/{dicom['study_instance_uid']}/series/{dicom['series_instance_uid']}"
    series = orthanc.session.get(f"{base}/metadata", timeout=30).json()
    by_instance = []
    for instance in series_instances(orthanc, dicom["study_instance_uid"], dicom["series_instance_uid"]):
        sop = instance["00080018"]["Value"][0]
        by_instance += orthanc.session.get(f"{base}/instances/{sop}/metadata", timeout=30).json()
    key = lambda m: m["00080018"]["Value"][0]  # noqa: E731
    assert sorted(series, key=key) == sorted(by_instance, key=key) and len(series) == dicom["instances"]
    missing = orthanc.session.get(f"{orthanc.url}/dicom-web/studies/{dicom['study_instance_uid']}/series/"
                                  f"1.2.3.4.5.6.7/metadata", timeout=30)
    assert missing.status_code == 404
    elsewhere = orthanc.session.get(f"{orthanc.url}/dicom-web/studies/1.2.3.4/series/"
                                    f"{dicom['series_instance_uid']}/metadata", timeout=30)
    assert elsewhere.status_code == 404


def test_converted_series_is_not_analysed_as_a_new_slide(converted, orthanc):
    series_uid = converted["dicom"]["series_instance_uid"]
    time.sleep(4)  # StableAge is 2 s in the tests: the series has become stable by now
    assert not [s for s in orthanc.get("/ai/slides")["slides"] if s["source"]["series_instance_uid"] == series_uid]


def test_force_replaces_the_series(converted, orthanc):
    slide_id, dicom = converted["id"], converted["dicom"]
    r = orthanc.post(f"/ai/slides/{slide_id}/dicom")
    assert r.status_code == 409 and "already converted" in r.json()["error"]
    r = orthanc.post(f"/ai/slides/{slide_id}/dicom", {"force": True})
    assert r.status_code == 202, r.text
    again = wait_dicom(orthanc, slide_id)["dicom"]
    assert again["status"] == "done", again["error"]
    assert again["series_instance_uid"] == dicom["series_instance_uid"]
    series = orthanc.series_of_study(dicom["study_instance_uid"])
    wsi = [s for s in series if s["MainDicomTags"].get("Modality") == "SM"]
    assert len(wsi) == 1 and len(wsi[0]["Instances"]) == again["instances"]


def test_unknown_slide_is_404(orthanc, svs):
    r = orthanc.post(f"/ai/slides/{'0' * 32}/dicom")
    assert r.status_code == 404
