"""The report (schema), the QuPath GeoJSON and the DICOM outputs (SR, heatmap SC, bulk annotations)."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tiffslide", reason="the slide readers are not installed: run `make test`")

import jsonschema  # noqa: E402

from inference.pathology import dicom as D  # noqa: E402
from inference.pathology.geojson import write_geojson  # noqa: E402
from inference.pathology.pipeline import SlideSettings, analyse_slide  # noqa: E402
from inference.pathology.reader import open_slide  # noqa: E402
from inference.pathology.report import SCHEMA_PATH, build_report, parameters_hash, validate_report  # noqa: E402
from inference.pathology.store import NucleusStore  # noqa: E402

# dicom3tools 1.00~20220618 reports Common Z Coordinate Value in every 2D annotation group although it is absent
FALSE_POSITIVES = ("Only valid for AnnotationCoordinateType of 3D - attribute <CommonZCoordinateValue>",)


@pytest.fixture(scope="module")
def analysed(shared_data: Path, tmp_path_factory):
    """The DICOM WSI sample analysed end to end (its header gives the DICOM outputs a source)."""
    work = tmp_path_factory.mktemp("out")
    with open_slide(shared_data / "wsi" / "dicom_wsi_cmu1_small_region") as slide:
        qc, analysis = analyse_slide(slide, work, SlideSettings(workers=1))
        header = slide.dicom_header
    state = qc.state()
    part = {"figures": analysis.figures.to_json(), "timings": analysis.timings, "warnings": analysis.warnings,
            "detector": analysis.detector,
            "nuclei_tiles": {"core_px": 896, "margin_px": 64, "mpp": analysis.nuclei.mpp,
                             "processed": analysis.nuclei.tiles_processed, "possible": analysis.nuclei.tiles_possible}}
    report = build_report(slide_id="a" * 32, status="done", error=None,
                          source={"kind": "dicom", "sha256": "b" * 64, "filename": None},
                          qc_state=state, analysis=part, outputs={"dicom": [], "files": []},
                          parameters={"qc": {"tile_px": 224}}, worker="test")
    return work, qc, analysis, report, header


def test_report_follows_the_schema(analysed):
    _, qc, analysis, report, _ = analysed
    validate_report(report)
    tiles = report["processing"]["tiles"]
    assert tiles["extracted"] + sum(tiles["filtered"].values()) == tiles["possible"]
    assert report["results"]["nuclei"]["total"] == analysis.nuclei.total > 100
    assert report["audit"]["parameters_sha256"] == parameters_hash({"qc": {"tile_px": 224}})
    broken = json.loads(json.dumps(report))
    del broken["source"]["sha256"]
    with pytest.raises(jsonschema.ValidationError):
        validate_report(broken)
    broken = json.loads(json.dumps(report))
    broken["status"] = "finished"
    with pytest.raises(jsonschema.ValidationError):
        validate_report(broken)
    assert json.loads(SCHEMA_PATH.read_text())["$schema"].endswith("2020-12/schema")


def test_geojson_for_qupath(analysed, tmp_path):
    work, _, analysis, _, _ = analysed
    store = NucleusStore.open(analysis.store_path)
    out = write_geojson(store, tmp_path / "n.geojson.gz", tuple(analysis.detector["classes"]), slide_key="k")
    again = write_geojson(store, tmp_path / "m.geojson.gz", tuple(analysis.detector["classes"]), slide_key="k")
    store.close()
    data = json.loads(gzip.decompress((tmp_path / "n.geojson.gz").read_bytes()))
    assert out["features"] == len(data["features"]) == analysis.nuclei.total
    first = data["features"][0]
    assert first["properties"]["objectType"] == "detection" and "classification" in first["properties"]
    ring = first["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1]
    assert gzip.decompress((tmp_path / "m.geojson.gz").read_bytes()) == gzip.decompress(
        (tmp_path / "n.geojson.gz").read_bytes()) and again["features"] == out["features"]


def _errors(path: Path) -> list[str]:
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return [line for line in (out.stdout + out.stderr).splitlines()
            if line.startswith("Error") and not any(fp in line for fp in FALSE_POSITIVES)]


def test_dicom_outputs_for_a_dicom_slide(analysed, tmp_path):
    _, qc, analysis, report, header = analysed
    source = D.complete_source(header, "slide-1", "key")
    heat = np.zeros((qc.thumbnail.shape[0], qc.thumbnail.shape[1], 3), np.uint8)
    sc = D.heatmap_image(heat, slide_key="key", detector=analysis.detector, source=source, study=None,
                         container_identifier="slide-1", pixel_spacing_mm=0.0014)
    sr = D.slide_report_sr(report, slide_key="key", evidence=[source])
    store = NucleusStore.open(analysis.store_path)
    anns = D.nuclei_annotations(store, source, tuple(analysis.detector["classes"]), analysis.detector,
                                slide_key="key", max_per_instance=1000)
    store.close()
    assert len(anns) == -(-analysis.nuclei.total // 1000)  # split so that viewers cope
    assert sum(int(g.NumberOfAnnotations) for a in anns for g in a.AnnotationGroupSequence) == analysis.nuclei.total
    for ds in (sc, sr, *anns):
        assert ds.StudyInstanceUID == header.StudyInstanceUID and ds.Manufacturer == "Orthanc AI"
        assert ds.SeriesDescription.startswith("AI ")
    assert sr.ConceptNameCodeSequence[0].CodeValue == "11526-1"  # not TID 1500: follow-up leaves it alone
    # deterministic UIDs: a re-run replaces its results
    assert D.slide_report_sr(report, slide_key="key", evidence=[source]).SOPInstanceUID == sr.SOPInstanceUID
    if shutil.which("dciodvfy"):
        for i, ds in enumerate((sc, sr, anns[0])):
            ds.save_as(tmp_path / f"{i}.dcm", enforce_file_format=True)
            assert not _errors(tmp_path / f"{i}.dcm"), _errors(tmp_path / f"{i}.dcm")


def test_dicom_outputs_for_a_vendor_file(analysed, tmp_path):
    _, _, analysis, report, _ = analysed
    study = D.StudyContext(study_instance_uid=D.derived_uid("slide study", "x"), patient_id="P-1",
                           patient_name="Doe^Jane", study_date="20260101", study_time="120000", study_id="SLIDE")
    sc = D.heatmap_image(np.zeros((64, 48, 3), np.uint8), slide_key="x", detector=analysis.detector, source=None,
                         study=study, container_identifier="slide.svs", pixel_spacing_mm=0.01)
    sr = D.slide_report_sr(report, slide_key="x", evidence=[sc])
    assert sc.PatientID == sr.PatientID == "P-1" and sc.StudyInstanceUID == sr.StudyInstanceUID
    if shutil.which("dciodvfy"):
        for i, ds in enumerate((sc, sr)):
            ds.save_as(tmp_path / f"v{i}.dcm", enforce_file_format=True)
            assert not _errors(tmp_path / f"v{i}.dcm"), _errors(tmp_path / f"v{i}.dcm")
