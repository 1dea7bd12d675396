"""TID 1500 Measurement Report: round trip of findings through the SR, links to the SEG, identity, validity."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from inference import __version__
from inference.models.base import Code, ModelInfo, SegmentDescription
from inference.results.findings import Finding
from inference.results.identity import MANUFACTURER, derived_uid
from inference.results.measurements import measure_findings
from inference.results.seg import write_segmentation
from inference.results.sr import read_measurement_report, write_measurement_report
from inference.volume import Volume, volume_from_files

SEGMENTS = (
    SegmentDescription(  # label 2 is segment 1 and label 4 segment 2: the SR must use SEG segment numbers
        label=2,
        name="Edema",
        category=Code("49755003", "SCT", "Morphologically Altered Structure"),
        type=Code("79654002", "SCT", "Edema"),
        color=(0, 200, 0),
    ),
    SegmentDescription(
        label=4,
        name="Lesion",
        category=Code("49755003", "SCT", "Morphologically Altered Structure"),
        type=Code("52988006", "SCT", "Lesion"),
        color=(255, 80, 0),
    ),
)
MODEL = ModelInfo(
    id="test-lesion-seg",
    name="Test lesion segmentation",
    version="2.0.1",
    task="segmentation",
    modality="MR",
    segments=SEGMENTS,
    accuracy="Dice 0.71 on an internal test set.",
)
# The brain series' Patient's Name "HFS" has one component; highdicom warns when it copies it.
pytestmark = pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent:UserWarning")

MEASUREMENT_NAMES = {
    "volume_ml": ("Volume", "ml"),
    "max_3d_diameter_mm": ("Diameter (Maximum)", "mm"),
    "longest_axial_diameter_mm": ("Long axis", "mm"),
    "perpendicular_axial_diameter_mm": ("Short axis", "mm"),
    "mean_intensity": ("Mean", "[arb'U]"),
}


@pytest.fixture(scope="module")
def brain(shared_data: Path) -> Volume:
    return volume_from_files(sorted((shared_data / "mr_brain" / "siemens_t1_fl2d_sag_HFS").glob("*.dcm")))


@pytest.fixture(scope="module")
def lesions(brain: Volume) -> np.ndarray:
    """Three synthetic spherical lesions (two of label 4, one of label 2) placed in patient millimetres."""
    k, j, i = np.meshgrid(*(np.arange(n) for n in brain.shape), indexing="ij")
    centres = np.stack([i, j, k, np.ones_like(i)], axis=-1).astype(np.float64) @ brain.affine.T
    labels = np.zeros(brain.shape, dtype=np.uint8)
    for index, radius, label in (((17, 110, 120), 14.0, 4), ((10, 150, 90), 8.0, 4), ((24, 80, 160), 10.0, 2)):
        centre = brain.affine @ [index[2], index[1], index[0], 1.0]
        labels[np.linalg.norm(centres[..., :3] - centre[:3], axis=-1) <= radius] = label
    return labels


@pytest.fixture(scope="module")
def seg(brain: Volume, lesions: np.ndarray) -> pydicom.Dataset:
    return write_segmentation(
        brain,
        lesions,
        SEGMENTS,
        MODEL,
        series_instance_uid=derived_uid(brain.series_instance_uid, MODEL.id, "seg series"),
        sop_instance_uid=derived_uid(brain.series_instance_uid, MODEL.id, "seg"),
    )


@pytest.fixture(scope="module")
def findings(brain: Volume, lesions: np.ndarray) -> list[Finding]:
    return measure_findings(brain, lesions, SEGMENTS, uid_parts=(brain.series_instance_uid, MODEL.id, MODEL.version))


def _write(brain: Volume, findings, seg, path: Path, model: ModelInfo = MODEL, **kwargs) -> pydicom.Dataset:
    sr = write_measurement_report(
        brain,
        findings,
        seg,
        model,
        series_instance_uid=derived_uid(brain.series_instance_uid, model.id, "sr series"),
        sop_instance_uid=derived_uid(brain.series_instance_uid, model.id, "sr"),
        **kwargs,
    )
    sr.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path)


def _items(ds: pydicom.Dataset):
    """Every content item of the tree, depth first."""
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _items(item)


def _texts(ds: pydicom.Dataset) -> list[str]:
    return [str(item.TextValue) for item in _items(ds) if item.ValueType == "TEXT"]


def _tool_output(tool: str, path: Path) -> subprocess.CompletedProcess:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (Debian packages dicom3tools / dcmtk)")
    return subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)


def test_findings_round_trip_through_the_report(brain, findings, seg, tmp_path: Path) -> None:
    assert [(f.segment_name, f.number) for f in findings] == [("Edema", 1), ("Lesion", 1), ("Lesion", 2)]
    ds = _write(brain, findings, seg, tmp_path / "sr.dcm")

    groups = read_measurement_report(ds)

    assert len(groups) == len(findings)
    segment_number = {str(item.SegmentLabel): int(item.SegmentNumber) for item in seg.SegmentSequence}
    for group, finding in zip(groups, findings, strict=True):
        assert group["tracking_uid"] == finding.tracking_uid
        assert group["tracking_id"] == finding.tracking_id
        segment = next(s for s in SEGMENTS if s.label == finding.segment_label)
        assert group["finding"] == (segment.type.value, segment.type.scheme, segment.type.meaning)
        assert group["finding_site"] is None  # location unknown
        assert group["referenced_segment"] == (seg.SOPInstanceUID, segment_number[finding.segment_name])
        assert set(group["measurements"]) == {name for name, _ in MEASUREMENT_NAMES.values()}
        for attribute, (name, unit) in MEASUREMENT_NAMES.items():
            value, read_unit = group["measurements"][name]
            assert value == pytest.approx(getattr(finding, attribute), rel=1e-9, abs=1e-9)
            assert read_unit == unit
    assert groups[1]["referenced_segment"][1] == 2  # "Lesion" is label 4 but SEG segment 2

    # highdicom reads it as a TID 1500 report with the same groups
    report = hd.sr.srread(tmp_path / "sr.dcm")
    assert isinstance(report, hd.sr.Comprehensive3DSR)
    volumetric = report.content.get_volumetric_roi_measurement_groups()
    assert [g.tracking_uid for g in volumetric] == [f.tracking_uid for f in findings]
    assert volumetric[1].roi is None and volumetric[1].referenced_segment is not None


def test_long_axis_references_the_image_it_was_measured_on(brain, findings, seg, tmp_path: Path) -> None:
    ds = _write(brain, findings, seg, tmp_path / "sr.dcm")
    group = next(item for item in _items(ds) if item.ConceptNameCodeSequence[0].CodeValue == "125007")
    long_axis = next(item for item in group.ContentSequence if item.get("ValueType") == "NUM"
                     and item.ConceptNameCodeSequence[0].CodeValue == "103339001")
    source = next(item for item in long_axis.ContentSequence if item.ValueType == "IMAGE")
    frame = brain.frames[findings[0].extra["axial_slice"]]
    assert source.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == frame.sop_instance_uid


def test_report_identity_and_context(brain, findings, seg, tmp_path: Path) -> None:
    ds = _write(brain, findings, seg, tmp_path / "sr.dcm")

    assert ds.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
    assert ds.Modality == "SR" and ds.SeriesNumber == 9003
    assert ds.SeriesDescription == "AI Test lesion segmentation measurements"
    assert ds.Manufacturer == MANUFACTURER and ds.ManufacturerModelName == MODEL.id
    assert "test-lesion-seg 2.0.1" in ds.SoftwareVersions and f"orthanc-ai {__version__}" in ds.SoftwareVersions
    assert (ds.CompletionFlag, ds.VerificationFlag, ds.PreliminaryFlag) == ("COMPLETE", "UNVERIFIED", "PRELIMINARY")
    source = brain.datasets[0]
    for keyword in ("PatientID", "PatientName", "PatientBirthDate", "StudyInstanceUID", "StudyID", "AccessionNumber"):
        assert ds.get(keyword) == source.get(keyword), keyword
    ours = [item for item in ds.ContributingEquipmentSequence if item.Manufacturer == MANUFACTURER]
    assert len(ours) == 1 and ours[0].PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
    assert ours[0].ManufacturerModelName == MODEL.id and ours[0].SoftwareVersions == MODEL.version
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"

    evidence = {
        item.ReferencedSOPInstanceUID
        for study in ds.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert seg.SOPInstanceUID in evidence and {f.sop_instance_uid for f in brain.frames} <= evidence

    by_name = {item.ConceptNameCodeSequence[0].CodeMeaning: item for item in ds.ContentSequence}
    assert by_name["Procedure reported"].ConceptCodeSequence[0].CodeValue == "25056-3"  # MRI unspecified body region
    assert by_name["Language of Content Item and Descendants"].ConceptCodeSequence[0].CodeValue == "en-US"
    assert by_name["Device Observer Name"].TextValue == MODEL.id
    assert by_name["Device Observer Manufacturer"].TextValue == MANUFACTURER
    algorithm_names = {item.TextValue for item in _items(ds) if item.ConceptNameCodeSequence[0].CodeValue == "111001"}
    assert algorithm_names == {MODEL.name}
    assert "Model accuracy: Dice 0.71 on an internal test set." in _texts(ds)


def test_demonstration_model_says_so(brain, findings, seg, tmp_path: Path) -> None:
    demo = dataclasses.replace(MODEL, demonstration=True)
    ds = _write(brain, findings, seg, tmp_path / "sr.dcm", model=demo, series_description="Lesions")
    assert ds.SeriesDescription == "AI DEMO Lesions"
    assert "Demonstration model, not for diagnosis." in _texts(ds)
    ours = next(item for item in ds.ContributingEquipmentSequence if item.Manufacturer == MANUFACTURER)
    assert "not for diagnosis" in ours.ContributionDescription


def test_report_without_findings_says_none_was_found(brain, tmp_path: Path) -> None:
    ds = _write(brain, [], None, tmp_path / "sr.dcm")

    assert read_measurement_report(ds) == []
    assert not any(item.ConceptNameCodeSequence[0].CodeValue == "126010" for item in ds.ContentSequence)
    evaluations = next(item for item in ds.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "C0034375")
    absent = [(item.ConceptNameCodeSequence[0].CodeMeaning, item.ConceptCodeSequence[0].CodeValue)
              for item in evaluations.ContentSequence if item.ValueType == "CODE"]
    assert absent == [("Edema", "272519000"), ("Lesion", "272519000")]  # SCT "Absent"
    assert any(text.startswith("No finding:") for text in _texts(ds))
    assert hd.sr.srread(tmp_path / "sr.dcm").SOPInstanceUID == ds.SOPInstanceUID
    if shutil.which("dciodvfy"):
        result = _tool_output("dciodvfy", tmp_path / "sr.dcm")
        assert [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")] == []
    if shutil.which("dsrdump"):
        result = _tool_output("dsrdump", tmp_path / "sr.dcm")
        assert result.returncode == 0 and "Qualitative Evaluations" in result.stdout


def test_intensity_unit_and_procedure_follow_the_modality(brain, findings, seg, tmp_path: Path) -> None:
    ct = dataclasses.replace(brain, modality="CT")  # the values are then read as HU
    ds = _write(ct, findings, seg, tmp_path / "sr.dcm")
    assert read_measurement_report(ds)[0]["measurements"]["Mean"][1] == "[hnsf'U]"
    procedure = next(item for item in ds.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "121058")
    assert procedure.ConceptCodeSequence[0].CodeValue == "25045-6"  # CT unspecified body region


def test_findings_need_their_seg(brain, findings, seg) -> None:
    uids = {"series_instance_uid": derived_uid("x", "1"), "sop_instance_uid": derived_uid("x", "2")}
    with pytest.raises(ValueError, match="SEG"):
        write_measurement_report(brain, findings, None, MODEL, **uids)
    renamed = [dataclasses.replace(findings[0], segment_name="Necrosis")]
    with pytest.raises(ValueError, match="Necrosis"):
        write_measurement_report(brain, renamed, seg, MODEL, **uids)


def test_report_passes_dciodvfy(brain, findings, seg, tmp_path: Path) -> None:
    result = _tool_output("dciodvfy", _write(brain, findings, seg, tmp_path / "sr.dcm").filename)
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
    assert errors == []


def test_report_renders_with_dsrdump(brain, findings, seg, tmp_path: Path) -> None:
    result = _tool_output("dsrdump", _write(brain, findings, seg, tmp_path / "sr.dcm").filename)
    assert result.returncode == 0, result.stderr
    assert "Imaging Measurement Report" in result.stdout and findings[0].tracking_id in result.stdout


def test_reads_other_tools_reports(shared_data: Path) -> None:
    single = read_measurement_report(pydicom.dcmread(shared_data / "sr" / "highdicom_sr_tid1500.dcm"))
    assert single and single[0]["measurements"]["Area of defined region"] == (pytest.approx(1.7), "cm2")
    assert single[0]["finding_site"] is not None

    groups = read_measurement_report(pydicom.dcmread(shared_data / "sr" / "highdicom_sr_tid1500_multiple_groups.dcm"))
    assert len(groups) >= 2 and all(group["tracking_uid"] for group in groups)
    assert any(group["finding"] and group["finding"][2] == "Nodule" for group in groups)

    with pytest.raises(ValueError, match="not a TID 1500"):
        read_measurement_report(pydicom.dcmread(shared_data / "sr" / "dcmtk_test-SR.dcm"))
    with pytest.raises(ValueError, match="not a structured report"):
        read_measurement_report(pydicom.dcmread(shared_data / "mr_brain" / "siemens_t1_fl2d_sag_HFS" / sorted(
            p.name for p in (shared_data / "mr_brain" / "siemens_t1_fl2d_sag_HFS").glob("*.dcm"))[0]))


def test_comparison_sentences_are_stored_as_comments(brain, findings, seg, tmp_path: Path) -> None:
    from inference.pipeline import comparison_sentences
    answer = {"prior": {"date": "20250101", "study_instance_uid": "1.2.3"},
              "comparison": [{"tracking_id": "Lesion 1", "status": "increased", "prior_volume_ml": 1.2,
                              "current_volume_ml": 2.4, "change_percent": 100.0}],
              "response": {"text": "Progressive disease (computed, to be confirmed by the physician)"},
              "sum_of_longest_diameters": {"prior_mm": 20.0, "current_mm": 26.0, "change_percent": 30.0}}
    sentences = comparison_sentences(answer)
    assert sentences[0].startswith("Comparison with the study of 20250101")
    assert "Lesion 1: increased, volume 1.2 → 2.4 ml (+100 %)." in sentences
    assert sentences[-1].startswith("Progressive disease")
    assert sentences[-1].endswith("Sum of longest diameters 20.0 → 26.0 mm (+30 %).")
    assert comparison_sentences(None) == []
    ds = _write(brain, findings, seg, tmp_path / "sr.dcm", comparison=sentences)
    texts = [item.TextValue for item in _items(ds) if "TextValue" in item]
    assert any(t.startswith("Progressive disease") for t in texts), texts
