"""Whole-slide pathology against a real Orthanc with our plugin and worker: upload → QC → nuclei → report,
DICOM outputs in Orthanc, DICOM WSI by C-STORE, clear outcomes for bad slides, reproducibility."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest

from tests.integration.harness import wait_for

pytest.importorskip("cv2", reason="the slide readers are not installed: run `make test`")
pytest.importorskip("tiffslide", reason="the slide readers are not installed: run `make test`")

TERMINAL = ("done", "failed", "skipped")
# dicom3tools 1.00~20220618 reports Common Z Coordinate Value as present in every 2D bulk annotation group
# although it is absent (checked with pydicom); the condition in PS3.3 C.37.1.2 forbids it only for 2D.
DCIODVFY_FALSE_POSITIVES = ("Only valid for AnnotationCoordinateType of 3D - attribute <CommonZCoordinateValue>",)


@pytest.fixture(scope="module")
def wsi(shared_data: Path) -> Path:
    folder = shared_data / "wsi"
    if not (folder / "CMU-1-Small-Region.svs").is_file():
        pytest.skip(f"{folder}/CMU-1-Small-Region.svs is not there")
    return folder


HEADERS = {"mpp": "X-Slide-Mpp", "patient_id": "X-Patient-ID", "patient_name": "X-Patient-Name"}


def upload(orthanc, path: Path, name: str | None = None, **fields):
    """POST the file as the request body (the answer is 202 with the slide)."""
    headers = {"Content-Type": "application/octet-stream",
               "Content-Disposition": f'attachment; filename="{name or path.name}"',
               **{HEADERS[k]: v for k, v in fields.items()}}
    return orthanc.session.post(orthanc.url + "/ai/slides", data=path.read_bytes(), headers=headers, timeout=60)


def wait_slide(orthanc, slide_id: str, timeout: float = 240) -> dict:
    def ready():
        slide = orthanc.get(f"/ai/slides/{slide_id}")
        return slide if slide["status"] in TERMINAL else None
    try:
        return wait_for(ready, timeout, f"slide {slide_id} to finish", interval=0.5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{orthanc.log()[-4000:]}") from None


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def dciodvfy_errors(path: Path) -> list[str]:
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return [line for line in (out.stdout + out.stderr).splitlines()
            if line.startswith("Error") and not any(fp in line for fp in DCIODVFY_FALSE_POSITIVES)]


def fetch_instance(orthanc, sop_uid: str, target: Path) -> pydicom.Dataset:
    hits = orthanc.session.post(orthanc.url + "/tools/lookup", data=sop_uid, timeout=10).json()
    ids = [h["ID"] for h in hits if h["Type"] == "Instance"]
    assert ids, f"{sop_uid} is not in Orthanc"
    r = orthanc.session.get(f"{orthanc.url}/instances/{ids[0]}/file", timeout=30)
    r.raise_for_status()
    target.write_bytes(r.content)
    return pydicom.dcmread(target)


@pytest.fixture(scope="module")
def svs_slide(orthanc, wsi) -> dict:
    r = upload(orthanc, wsi / "CMU-1-Small-Region.svs", patient_id="PATH-001", patient_name="Slide^Test")
    assert r.status_code == 202, r.text
    created = r.json()
    assert len(created["id"]) == 32 and created["status"] == "pending"
    return wait_slide(orthanc, created["id"])


def test_svs_upload_is_analysed(svs_slide, orthanc):
    slide = svs_slide
    assert slide["status"] == "done", slide["error"]
    meta = slide["metadata"]
    assert (meta["width_px"], meta["height_px"]) == (2220, 2967)
    assert meta["mpp_x"] == pytest.approx(0.499) and meta["mpp_source"] == "slide"
    assert meta["width_mm"] == pytest.approx(1.1078, abs=1e-3) and meta["magnification"] == 20
    assert meta["vendor"] == "aperio" and meta["reader"].startswith("tiffslide") and len(meta["levels"]) == 1
    tiles = slide["tiles"]
    assert tiles["extracted"] + sum(tiles["filtered"].values()) == tiles["possible"] > 0
    assert slide["results"]["nuclei_total"] > 100
    audit = orthanc.get(f"/ai/slides/{slide['id']}/audit")["audit"]
    states = [a["to_state"] for a in audit if a["event"] == "transition"]
    assert states == ["qc", "queued", "running", "done"]
    stages = {a["detail"].split(":")[0] for a in audit if a["event"] == "stage"}
    assert {"thumbnail", "tissue_mask", "qc_tiles", "nuclei", "aggregation", "geojson", "dicom"} <= stages


def test_report_validates_and_pngs_have_the_thumbnail_size(svs_slide, orthanc, wsi):
    import jsonschema

    from inference.pathology.report import SCHEMA_PATH

    report = orthanc.get(f"/ai/slides/{svs_slide['id']}/report")
    jsonschema.validate(report, json.loads(SCHEMA_PATH.read_text()))
    assert report["status"] == "done" and report["slide_id"] == svs_slide["id"]
    assert report["source"]["sha256"] == hashlib.sha256((wsi / "CMU-1-Small-Region.svs").read_bytes()).hexdigest()
    tiles = report["processing"]["tiles"]
    assert tiles["extracted"] + sum(tiles["filtered"].values()) == tiles["possible"]
    nuclei = report["results"]["nuclei"]
    assert sum(nuclei["by_type"].values()) == nuclei["total"]
    assert report["audit"]["model"]["id"] == "classical-watershed" and "not a trained model" in report["audit"]["model"]["name"]
    sizes = {}
    for name in ("thumbnail", "tissue-mask", "heatmap"):
        r = orthanc.session.get(f"{orthanc.url}/ai/slides/{svs_slide['id']}/{name}", timeout=30)
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("image/png")
        sizes[name] = png_size(r.content)
    assert sizes["thumbnail"] == sizes["tissue-mask"] == sizes["heatmap"]
    assert max(sizes["thumbnail"]) == 1024


def test_geojson_imports_as_qupath_detections(svs_slide, orthanc):
    import shapely.geometry

    r = orthanc.session.get(f"{orthanc.url}/ai/slides/{svs_slide['id']}/nuclei.geojson.gz", timeout=30)
    assert r.status_code == 200
    data = json.loads(gzip.decompress(r.content))
    assert data["type"] == "FeatureCollection"
    assert len(data["features"]) == svs_slide["results"]["nuclei_total"]
    ids = set()
    for feature in data["features"][:500]:
        ring = feature["geometry"]["coordinates"][0]
        assert feature["geometry"]["type"] == "Polygon" and ring[0] == ring[-1] and len(ring) >= 4
        assert shapely.geometry.shape(feature["geometry"]).is_valid
        assert feature["properties"]["objectType"] == "detection"
        assert feature["properties"]["classification"]["name"]
        ids.add(feature["id"])
    assert len(ids) == min(500, len(data["features"]))


def test_dicom_outputs_are_stored_and_valid(svs_slide, orthanc, tmp_path):
    outputs = svs_slide["outputs"]
    assert len(outputs) == 2  # heatmap SC + SR (no bulk annotations: the slide is not DICOM)
    classes = set()
    for i, uid in enumerate(outputs):
        ds = fetch_instance(orthanc, uid, tmp_path / f"{i}.dcm")
        classes.add(ds.SOPClassUID)
        assert ds.Manufacturer == "Orthanc AI" and ds.SeriesDescription.startswith("AI ")
        assert ds.PatientID == "PATH-001"
        if shutil.which("dciodvfy"):
            assert not dciodvfy_errors(tmp_path / f"{i}.dcm"), dciodvfy_errors(tmp_path / f"{i}.dcm")
    assert classes == {"1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.88.33"}


def test_three_runs_give_identical_counts(svs_slide, orthanc):
    first = orthanc.get(f"/ai/slides/{svs_slide['id']}/report")["results"]["nuclei"]
    for _ in range(2):
        r = orthanc.post(f"/ai/slides/{svs_slide['id']}/rerun")
        assert r.status_code == 202, r.text
        again = wait_slide(orthanc, svs_slide["id"])
        assert again["status"] == "done"
        report = orthanc.get(f"/ai/slides/{svs_slide['id']}/report")["results"]["nuclei"]
        assert report["total"] == first["total"] and report["by_type"] == first["by_type"]
        assert report["density_per_mm2"] == first["density_per_mm2"]
        assert report["regions_of_interest"] == first["regions_of_interest"]
    assert orthanc.get(f"/ai/slides/{svs_slide['id']}")["outputs"] == svs_slide["outputs"]  # replaced, not duplicated


def test_dicom_wsi_sent_by_storescu_is_processed(orthanc, wsi, tmp_path):
    folder = wsi / "dicom_wsi_cmu1_small_region"
    # -R -xy: propose the files' own SOP class with JPEG baseline (storescu's default list lacks VL WSI)
    sent = subprocess.run(["storescu", "-aec", "ORTHANC", "-aet", "TESTSCU", "-R", "-xy", "+sd", "+r", "127.0.0.1",
                           str(orthanc.dicom_port), str(folder)], env={**os.environ, "TCP_NODELAY": "1"},
                          capture_output=True, text=True, timeout=120)
    assert sent.returncode == 0, sent.stderr
    series_uid = pydicom.dcmread(next(folder.glob("level-0*.dcm")), stop_before_pixels=True).SeriesInstanceUID

    def created():
        return [s for s in orthanc.get("/ai/slides")["slides"] if s["source"]["series_instance_uid"] == series_uid]
    slide = wait_for(created, 60, "the DICOM WSI series to become a slide")[0]
    slide = wait_slide(orthanc, slide["id"])
    assert slide["status"] == "done", slide["error"]
    assert slide["source"]["kind"] == "dicom" and slide["metadata"]["reader"].startswith("wsidicom")
    report = orthanc.get(f"/ai/slides/{slide['id']}/report")
    assert any("YCbCr" in w for w in report["quality_control"]["warnings"])  # the sample's mislabelled colours
    kinds = {}
    for i, uid in enumerate(slide["outputs"]):
        ds = fetch_instance(orthanc, uid, tmp_path / f"{i}.dcm")
        kinds[ds.SOPClassUID] = ds
        assert ds.StudyInstanceUID == pydicom.dcmread(next(folder.glob("level-0*.dcm")),
                                                      stop_before_pixels=True).StudyInstanceUID
        if shutil.which("dciodvfy"):
            assert not dciodvfy_errors(tmp_path / f"{i}.dcm"), dciodvfy_errors(tmp_path / f"{i}.dcm")
    ann = kinds["1.2.840.10008.5.1.4.1.1.91.1"]
    assert sum(int(g.NumberOfAnnotations) for g in ann.AnnotationGroupSequence) == slide["results"]["nuclei_total"]
    assert ann.ReferencedImageSequence[0].ReferencedSOPClassUID == "1.2.840.10008.5.1.4.1.1.77.1.6"
    assert "1.2.840.10008.5.1.4.1.1.88.33" in kinds and "1.2.840.10008.5.1.4.1.1.7" in kinds
    # the same series stable again (our results were added to the study) is not queued twice
    assert len(created()) == 1


def test_unsupported_format_is_refused_at_upload(orthanc, tmp_path):
    png = tmp_path / "photo.svs"  # the extension lies; the content decides
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 200)
    r = upload(orthanc, png)
    assert r.status_code == 415 and "PNG" in r.json()["error"]


def test_unknown_and_corrupt_files_fail_clearly(orthanc, wsi, tmp_path):
    noise = tmp_path / "noise.svs"
    noise.write_bytes(bytes(range(256)) * 64)
    truncated = tmp_path / "truncated.svs"
    truncated.write_bytes((wsi / "CMU-1-Small-Region.svs").read_bytes()[:300_000])
    ids = {name: upload(orthanc, path).json()["id"] for name, path in (("noise", noise), ("truncated", truncated))}
    noise_slide, truncated_slide = wait_slide(orthanc, ids["noise"]), wait_slide(orthanc, ids["truncated"])
    assert noise_slide["status"] == "failed" and "not a whole-slide image format" in noise_slide["error"]
    assert truncated_slide["status"] == "failed" and "truncated or damaged" in truncated_slide["error"]


def test_slide_without_mpp_fails_clearly_or_uses_the_declared_value(orthanc, tmp_path):
    from inference.pathology.synthetic import write_synthetic_slide

    path = write_synthetic_slide(tmp_path / "nompp.tif", 1536, mpp=None)
    failed = wait_slide(orthanc, upload(orthanc, path).json()["id"])
    assert failed["status"] == "failed" and "pixel size" in failed["error"] and "mpp" in failed["error"]
    report = orthanc.get(f"/ai/slides/{failed['id']}/report")
    assert report["status"] == "failed" and report["metadata"]["mpp_source"] == "missing"
    declared = wait_slide(orthanc, upload(orthanc, path, mpp="0.25").json()["id"])
    assert declared["status"] == "done", declared["error"]
    assert declared["metadata"]["mpp_source"] == "declared" and declared["metadata"]["mpp_x"] == 0.25
    assert any("declared" in w for w in declared["quality_control"]["warnings"])


def test_empty_slide_is_skipped_with_the_reason(orthanc, tmp_path):
    from inference.pathology.synthetic import write_synthetic_slide

    path = write_synthetic_slide(tmp_path / "empty.tif", 1536, empty=True)
    slide = wait_slide(orthanc, upload(orthanc, path).json()["id"])
    assert slide["status"] == "skipped" and "no tissue" in slide["error"]
    assert orthanc.session.get(f"{orthanc.url}/ai/slides/{slide['id']}/thumbnail", timeout=10).status_code == 200
    r = orthanc.session.get(f"{orthanc.url}/ai/slides/{slide['id']}/heatmap", timeout=10)
    assert r.status_code == 404 and "not available" in r.json()["error"]


def test_form_upload_is_accepted_although_orthanc_answers_it(orthanc, tmp_path):
    from inference.pathology.synthetic import write_synthetic_slide

    path = write_synthetic_slide(tmp_path / "form.tif", 1024, mpp=None)
    with open(path, "rb") as f:  # requests puts the data fields before the file, as browsers do
        r = orthanc.session.post(orthanc.url + "/ai/slides", data={"mpp": "0.5"}, files={"file": ("form.tif", f)},
                                 timeout=60)
    assert r.status_code == 200 and r.content == b""  # Orthanc's own answer to every multipart/form-data POST
    slide = next(s for s in orthanc.get("/ai/slides")["slides"] if s["source"]["filename"] == "form.tif")
    slide = wait_slide(orthanc, slide["id"])
    assert slide["status"] == "done" and slide["metadata"]["mpp_x"] == 0.5, slide


@pytest.mark.parametrize("how", ["PUT", "override"])
def test_form_upload_as_put_answers_202_with_the_slide(orthanc, tmp_path, how):
    from inference.pathology.synthetic import write_synthetic_slide

    path = write_synthetic_slide(tmp_path / f"form-{how}.tif", 1024, empty=True)
    with open(path, "rb") as f:
        kwargs = dict(data={"patient_id": "P-9"}, files={"file": (path.name, f)}, timeout=60)
        if how == "PUT":
            r = orthanc.session.put(orthanc.url + "/ai/slides", **kwargs)
        else:  # a browser form posts; the header turns it into a PUT before Orthanc's form handling
            r = orthanc.session.post(orthanc.url + "/ai/slides", headers={"X-HTTP-Method-Override": "PUT"}, **kwargs)
    assert r.status_code == 202, r.text
    slide = r.json()
    assert slide["source"]["filename"] == path.name and slide["status"] == "pending", slide
    assert orthanc.get(f"/ai/slides/{slide['id']}")["id"] == slide["id"]


def test_mixed_multipart_upload_answers_202(orthanc, tmp_path):
    from inference.pathology.synthetic import write_synthetic_slide

    path = write_synthetic_slide(tmp_path / "mixed.tif", 1024, empty=True)
    boundary = "slide-boundary-42"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="patient_id"\r\n\r\nP-7\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="mixed.tif"\r\n'
            f"Content-Type: image/tiff\r\n\r\n").encode() + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    r = orthanc.session.post(orthanc.url + "/ai/slides", data=body, timeout=60,
                             headers={"Content-Type": f"multipart/mixed; boundary={boundary}"})
    assert r.status_code == 202, r.text
    assert r.json()["source"]["filename"] == "mixed.tif" and r.json()["status"] == "pending"


def test_delete_forgets_the_slide(orthanc, tmp_path):
    from inference.pathology.synthetic import write_synthetic_slide

    path = write_synthetic_slide(tmp_path / "gone.tif", 1024, empty=True)
    slide = wait_slide(orthanc, upload(orthanc, path).json()["id"])
    r = orthanc.session.delete(f"{orthanc.url}/ai/slides/{slide['id']}", timeout=10)
    assert r.status_code == 200 and r.json()["deleted"] == slide["id"]
    assert orthanc.session.get(f"{orthanc.url}/ai/slides/{slide['id']}", timeout=10).status_code == 404
    listed = orthanc.get("/ai/slides")
    assert slide["id"] not in [s["id"] for s in listed["slides"]] and "done" in listed["counts"]
