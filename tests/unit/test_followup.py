"""Longitudinal follow-up without a server: TID 1500 parsing (pydicom only), store, matching, response, CSV, routes."""

from __future__ import annotations

import ast
import csv
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from orthanc_plugin import followup as F
from orthanc_plugin.followup_routes import routes
from orthanc_plugin.routes import RawBody, Request

REPO = Path(__file__).resolve().parents[2]
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
pytestmark = pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent:UserWarning")


# --- building TID 1500 reports like other tools do (highdicom), for the tests -------------------------------------


@dataclass
class Lesion:
    """A lesion as a report states it: centre (patient mm), volume and diameters."""

    centre: tuple[float, float, float] | None
    volume_ml: float | None = None
    long_axis_mm: float | None = None
    short_axis_mm: float | None = None
    tracking_uid: str = field(default_factory=generate_uid)
    tracking_id: str = "Lesion"
    anatomical: bool = False
    centre_as: str = "center of mass"  # or "volume surface"


def source_image(patient_id: str, study_uid: str, study_date: str, frame_of_reference_uid: str,
                 series_uid: str | None = None) -> pydicom.Dataset:
    """The header of one source image, enough for highdicom's evidence and the study attributes."""
    ds = pydicom.Dataset()
    ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = patient_id, "Follow^Up", "19600101", "F"
    ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime = study_uid, study_date, "101500"
    ds.AccessionNumber, ds.StudyID, ds.ReferringPhysicianName = f"ACC{study_date}", "1", ""
    ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SOPClassUID = series_uid or generate_uid(), generate_uid(), MR_IMAGE
    ds.Modality, ds.FrameOfReferenceUID = "MR", frame_of_reference_uid
    return ds


def build_report(patient_id: str, study_uid: str, study_date: str, lesions: list[Lesion], *,
                 frame_of_reference_uid: str | None = None, source: pydicom.Dataset | None = None,
                 sop_uid: str | None = None, length_unit: str = "mm") -> pydicom.Dataset:
    """A Comprehensive 3D SR, TID 1500, one TID 1411 group per lesion; centres as SCOORD3D points."""
    for_uid = frame_of_reference_uid or generate_uid()
    source = source or source_image(patient_id, study_uid, study_date, for_uid)
    unit = hd.sr.CodedConcept(length_unit, "UCUM", length_unit)
    scale = {"mm": 1.0, "cm": 0.1}[length_unit]
    seg = source.copy()  # the SEG the groups point into, as evidence
    seg.SeriesInstanceUID, seg.SOPInstanceUID = generate_uid(), generate_uid()
    seg.SOPClassUID, seg.Modality = "1.2.840.10008.5.1.4.1.1.66.4", "SEG"
    groups = []
    for lesion in lesions:
        measurements = []
        if lesion.volume_ml is not None:
            measurements.append(hd.sr.Measurement(codes.SCT.Volume, lesion.volume_ml * 1000.0,
                                                  hd.sr.CodedConcept("mm3", "UCUM", "cubic millimeter")))
        if lesion.long_axis_mm is not None:
            measurements.append(hd.sr.Measurement(codes.SCT.LongAxis, lesion.long_axis_mm * scale, unit))
        if lesion.short_axis_mm is not None:
            measurements.append(hd.sr.Measurement(codes.SCT.ShortAxis, lesion.short_axis_mm * scale, unit))
        surface = None
        if lesion.centre is not None and lesion.centre_as == "volume surface":
            surface = hd.sr.VolumeSurface(graphic_type="POINT", graphic_data=np.array([lesion.centre]),
                                          frame_of_reference_uid=for_uid,
                                          source_series=hd.sr.SourceSeriesForSegmentation(source.SeriesInstanceUID))
        kind = codes.SCT.AnatomicalStructure if lesion.anatomical else codes.SCT.MorphologicallyAbnormalStructure
        group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=lesion.tracking_uid, identifier=lesion.tracking_id),
            referenced_volume_surface=surface,
            referenced_segment=None if surface is not None else hd.sr.ReferencedSegment(
                sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID, segment_number=1,
                source_series=hd.sr.SourceSeriesForSegmentation(source.SeriesInstanceUID)),
            finding_type=codes.SCT.Lesion, finding_category=kind, measurements=measurements)
        if lesion.centre is not None and lesion.centre_as == "center of mass":
            group[0].ContentSequence.append(hd.sr.Scoord3DContentItem(
                name=codes.DCM.CenterOfMass, graphic_type="POINT", graphic_data=np.array([lesion.centre]),
                frame_of_reference_uid=for_uid, relationship_type="CONTAINS"))
        groups.append(group)
    observer = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(uid=generate_uid(), name="tool"))
    root = hd.sr.MeasurementReport(observation_context=hd.sr.ObservationContext(observer_device_context=observer),
                                   procedure_reported=codes.cid100.MRIUnspecifiedBodyRegion,
                                   imaging_measurements=groups)
    sr = hd.sr.Comprehensive3DSR(evidence=[source, seg], content=root[0], series_instance_uid=generate_uid(),
                                 series_number=99, sop_instance_uid=sop_uid or generate_uid(), instance_number=1,
                                 manufacturer="Another Tool")
    return _round_trip(sr)


def _round_trip(ds: pydicom.Dataset) -> pydicom.Dataset:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


def dicom_bytes(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


# --- a fake Orthanc REST API and dispatcher --------------------------------------------------------------------


class FakeRest:
    """Instances by Orthanc id, each in a series of a study; lookups by UID; image geometry by tags."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.parents: dict[str, tuple[str, str]] = {}  # instance → (series id, study id)
        self.uids: dict[str, tuple[str, str]] = {}     # UID → (type, Orthanc id)
        self.tags: dict[str, dict] = {}
        self.series_instances: dict[str, list[str]] = {}
        self.studies: dict[str, dict] = {}
        self.patient_studies: dict[str, list[str]] = {}
        self.calls: list[str] = []

    def add(self, ds: pydicom.Dataset, *, tags: dict | None = None) -> str:
        instance = "i-" + ds.SOPInstanceUID[-20:]
        series, study = "s-" + ds.SeriesInstanceUID[-20:], "st-" + ds.StudyInstanceUID[-20:]
        self.files[instance] = dicom_bytes(ds) if "PixelData" in ds or "ContentSequence" in ds else b""
        self.parents[instance] = (series, study)
        self.uids[ds.SOPInstanceUID] = ("Instance", instance)
        self.uids[ds.SeriesInstanceUID] = ("Series", series)
        self.uids[ds.StudyInstanceUID] = ("Study", study)
        self.series_instances.setdefault(series, []).append(instance)
        self.tags[instance] = {"SOPClassUID": ds.SOPClassUID, **(tags or {})}
        return instance

    def delete(self, instance: str) -> None:
        self.files.pop(instance, None)
        self.uids = {k: v for k, v in self.uids.items() if v[1] != instance}
        for instances in self.series_instances.values():
            if instance in instances:
                instances.remove(instance)

    def get_bytes(self, uri: str) -> bytes:
        self.calls.append(uri)
        parts = uri.strip("/").split("/")
        if parts[0] == "instances" and parts[1] in self.files:
            if parts[2:] == ["metadata", "SopClassUid"]:
                return self.tags[parts[1]]["SOPClassUID"].encode()
            if parts[2:] == ["file"]:
                return self.files[parts[1]]
        raise KeyError(uri)

    def get_json(self, uri: str):
        self.calls.append(uri)
        parts = uri.strip("/").split("/")
        if parts[0] == "instances" and parts[1] in self.parents:
            if len(parts) == 2:
                return {"ParentSeries": self.parents[parts[1]][0]}
            if parts[2] == "simplified-tags":
                return self.tags[parts[1]]
        if parts[0] == "series" and parts[1] in self.series_instances:
            first = self.series_instances[parts[1]][0]
            return {"ParentStudy": self.parents[first][1], "Instances": self.series_instances[parts[1]]}
        if parts[0] == "studies" and parts[1] in self.studies:
            return self.studies[parts[1]]
        if parts[0] == "patients" and parts[2:] == ["studies"]:
            return [self.studies[s] for s in self.patient_studies[parts[1]]]
        raise KeyError(uri)

    def post(self, uri: str, body: str):
        self.calls.append(uri)
        if uri == "/tools/lookup":
            hit = self.uids.get(body)
            return [{"Type": hit[0], "ID": hit[1]}] if hit else []
        if uri == "/tools/find":
            return [{"ID": s, "Instances": list(i)} for s, i in self.series_instances.items()
                    if any(self.tags[x]["SOPClassUID"] in F.MEASUREMENT_SR_CLASSES for x in i)]
        raise KeyError(uri)


@dataclass
class SeriesInfo:
    tags: dict


class FakeDispatcher:
    def __init__(self, routable: set[str]) -> None:
        self.routable = routable
        self.requested: list[str] = []

    def study_series(self, orthanc_study_id: str) -> list[SeriesInfo]:
        return [SeriesInfo({"Modality": "MR" if orthanc_study_id in self.routable else "CT"})]

    def plan(self, tags: dict) -> list:
        return [("brain", 0, ())] if tags["Modality"] == "MR" else []

    def request_segmentation(self, study_uid: str, *, model_id, force, user):
        self.requested.append(study_uid)
        return [{"id": f"job-{len(self.requested)}"}]


class FakeJobs:
    def __init__(self, studies: set[str]) -> None:
        self.studies = studies

    def list(self, *, study_instance_uid: str, limit: int = 100):
        return [{"id": "x", "state": "queued"}] if study_instance_uid in self.studies else []


@pytest.fixture
def rest() -> FakeRest:
    return FakeRest()


@pytest.fixture
def service(tmp_path: Path, rest: FakeRest) -> F.FollowUp:
    store = F.FollowUpStore(tmp_path / "followup.sqlite")
    yield F.FollowUp(store, rest)
    store.close()


def ingest(service: F.FollowUp, rest: FakeRest, ds: pydicom.Dataset) -> tuple[str, str]:
    instance = rest.add(ds)
    return instance, service.ingest_instance(instance)


# --- parsing -------------------------------------------------------------------------------------------------------


def test_highdicom_reports_are_ingested(shared_data: Path, service: F.FollowUp, rest: FakeRest) -> None:
    single = pydicom.dcmread(shared_data / "sr" / "highdicom_sr_tid1500.dcm")
    multiple = pydicom.dcmread(shared_data / "sr" / "highdicom_sr_tid1500_multiple_groups.dcm")
    # the image the planar ROI is drawn on, so that its 2D circle centre can be placed in patient space
    image = source_image("1CT1", single.StudyInstanceUID, "20040119", "1.2.3.4")
    image.SOPInstanceUID = "1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322"
    rest.add(image, tags={"ImagePositionPatient": "-100\\-100\\50", "ImageOrientationPatient": "1\\0\\0\\0\\1\\0",
                          "PixelSpacing": "0.5\\0.8", "Rows": "512", "Columns": "512",
                          "FrameOfReferenceUID": "1.2.3.4"})

    assert ingest(service, rest, single)[1] == "ingested"
    assert ingest(service, rest, multiple)[1] == "ingested"

    (patient,) = service.store.patients()[1]
    assert patient["patient_id"] == "1CT1" and patient["study_count"] == 1
    (tp,) = service.store.timepoints("1CT1")
    by_id = {lesion.tracking_id: lesion for lesion in tp.lesions}
    assert set(by_id) == {"Planar ROI Measurements", "Image0001", "LungNodule0001", "Aorta0001", "Vertebra0001"}
    assert by_id["Planar ROI Measurements"].quantity("area_mm2") == pytest.approx(170.0)  # 1.7 cm2
    # circle centre (58, 52) in (column, row): 57.5 columns of 0.8 mm, 51.5 rows of 0.5 mm
    assert by_id["Planar ROI Measurements"].centroid == pytest.approx((-100 + 57.5 * 0.8, -100 + 51.5 * 0.5, 50))
    assert by_id["Vertebra0001"].volume_ml == pytest.approx(0.2)  # 200 mm3
    assert by_id["Vertebra0001"].centroid == pytest.approx((123.5, 234.1, -23.7), abs=1e-4)
    assert by_id["LungNodule0001"].longest_diameter_mm == 10.0 and by_id["LungNodule0001"].is_lesion
    assert not by_id["Aorta0001"].is_lesion  # coded as an anatomical structure
    assert not by_id["Image0001"].region  # TID 1501: a whole-image measurement, not tracked
    view = service.lesions("1CT1")
    labels = [lesion["tracking_id"] for lesion in view["timepoints"][0]["lesions"]]
    assert "Image0001" not in labels and len(labels) == 4


def test_an_sr_without_tid1500_is_skipped_with_its_reason(shared_data: Path, service: F.FollowUp, rest: FakeRest,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    ds = pydicom.dcmread(shared_data / "sr" / "dcmtk_test-SR.dcm")
    with caplog.at_level(logging.WARNING, logger="orthanc_ai.followup"):
        instance, outcome = ingest(service, rest, ds)
    assert outcome.startswith("skipped: ") and "not a TID 1500 measurement report" in outcome
    assert "Diagnosis" in outcome and "template none" in outcome
    assert any("not a TID 1500" in r.getMessage() for r in caplog.records)
    (skipped,) = service.store.skipped()
    assert skipped["orthanc_instance_id"] == instance and "TID 1500" in skipped["reason"]
    assert service.store.patients() == (0, [])


def test_measurements_without_units_are_dropped_and_a_report_left_empty_is_skipped(
        shared_data: Path, service: F.FollowUp, rest: FakeRest) -> None:
    ds = pydicom.dcmread(shared_data / "sr" / "highdicom_sr_tid1500_multiple_groups.dcm")
    for container in ds.ContentSequence:
        for group in container.get("ContentSequence", []):
            for item in group.get("ContentSequence", []):
                if item.ValueType == "NUM":
                    del item.MeasuredValueSequence[0].MeasurementUnitsCodeSequence
    outcome = ingest(service, rest, ds)[1]
    assert outcome.startswith("skipped: ") and "no usable measurement group" in outcome
    assert 'measurement "Diameter" has no units' in outcome
    assert service.store.patients()[0] == 0

    with pytest.raises(F.ReportSkipped, match="no units"):
        F.parse_measurement_report(ds)
    report = build_report("P", generate_uid(), "20240101", [Lesion((0, 0, 0), 1.0, 12.0), Lesion((9, 9, 9), 2.0, 15.0)])
    del _nums(report)[0].MeasuredValueSequence[0].MeasurementUnitsCodeSequence  # one Volume loses its units
    parsed = F.parse_measurement_report(report)
    assert [lesion.volume_ml for lesion in parsed.lesions] == [None, 2.0]
    assert parsed.lesions[0].longest_diameter_mm == 12.0
    assert len(parsed.notes) == 1 and 'measurement "Volume" has no units' in parsed.notes[0]


def _nums(ds: pydicom.Dataset) -> list[pydicom.Dataset]:
    out = []

    def walk(items):
        for item in items:
            if item.ValueType == "NUM":
                out.append(item)
            walk(item.get("ContentSequence", []))
    walk(ds.ContentSequence)
    return out


def test_other_instances_are_not_read(service: F.FollowUp, rest: FakeRest) -> None:
    instance = rest.add(source_image("P", generate_uid(), "20240101", generate_uid()))
    assert service.ingest_instance(instance) == "not a measurement SR"
    assert not any(call.endswith("/file") for call in rest.calls)
    assert service.ingest_instance("unknown") == "gone"


def test_our_own_report_reads_the_same_as_with_highdicom(shared_data: Path) -> None:
    """The plugin's pydicom reader agrees with the worker's highdicom-based reader on our SR."""
    from inference.models.base import Code, ModelInfo, SegmentDescription
    from inference.results.measurements import measure_findings
    from inference.results.seg import write_segmentation
    from inference.results.sr import read_measurement_report, write_measurement_report
    from inference.volume import volume_from_files

    volume = volume_from_files(sorted((shared_data / "mr_brain" / "siemens_t1_fl2d_sag_HFS").glob("*.dcm")))
    segment = SegmentDescription(label=1, name="Lesion", category=Code("49755003", "SCT", "Morphologically "
                                 "abnormal structure"), type=Code("52988006", "SCT", "Lesion"), color=(255, 0, 0))
    model = ModelInfo(id="t", name="t", version="1", task="segmentation", modality="MR", segments=(segment,))
    k, j, i = np.meshgrid(*(np.arange(n) for n in volume.shape), indexing="ij")
    points = np.stack([i, j, k, np.ones_like(i)], axis=-1).astype(np.float64) @ volume.affine.T
    labels = np.zeros(volume.shape, dtype=np.uint8)
    for centre, radius in (((0.0, -10.0, 20.0), 9.0), ((-20.0, 20.0, 40.0), 7.0)):
        labels[np.linalg.norm(points[..., :3] - np.array(centre), axis=-1) <= radius] = 1
    findings = measure_findings(volume, labels, (segment,), uid_parts=("followup-test",))
    seg = write_segmentation(volume, labels, (segment,), model, series_instance_uid=generate_uid(),
                             sop_instance_uid=generate_uid())
    sr = _round_trip(write_measurement_report(volume, findings, seg, model, series_instance_uid=generate_uid(),
                                              sop_instance_uid=generate_uid()))

    ours = F.parse_measurement_report(sr)
    theirs = read_measurement_report(sr)
    assert [lesion.tracking_uid for lesion in ours.lesions] == [g["tracking_uid"] for g in theirs]
    assert ours.source_series_uids[0] == volume.series_instance_uid and not ours.notes
    for lesion, group, finding in zip(ours.lesions, theirs, findings, strict=True):
        assert lesion.volume_ml == pytest.approx(finding.volume_ml)
        assert lesion.longest_diameter_mm == pytest.approx(finding.longest_axial_diameter_mm)
        assert lesion.short_axis_mm == pytest.approx(finding.perpendicular_axial_diameter_mm)
        assert lesion.max_3d_diameter_mm == pytest.approx(finding.max_3d_diameter_mm)
        assert lesion.mean_intensity[0] == pytest.approx(finding.mean_intensity)
        assert lesion.referenced_segment == group["referenced_segment"]
        assert lesion.finding == group["finding"]
        if lesion.centroid is not None:  # once the SR carries the centre (issue 6 proposal)
            assert lesion.centroid == pytest.approx(finding.centroid_mm, abs=0.5)


# --- store: replace, delete, reconcile ----------------------------------------------------------------------------


def test_reprocessing_replaces_and_deleting_removes(service: F.FollowUp, rest: FakeRest) -> None:
    study = generate_uid()
    sop = generate_uid()
    first = build_report("P1", study, "20240101", [Lesion((0, 0, 0), 1.0, 12.0)], sop_uid=sop)
    instance, outcome = ingest(service, rest, first)
    assert outcome == "ingested"
    again = build_report("P1", study, "20240101", [Lesion((0, 0, 0), 1.5, 14.0), Lesion((40, 0, 0), 0.5, 10.0)],
                         sop_uid=sop)  # a re-run: same SOP Instance UID, new content
    rest.files[instance] = dicom_bytes(again)
    assert service.ingest_instance(instance) == "ingested"
    (tp,) = service.store.timepoints("P1")
    assert sorted(lesion.volume_ml for lesion in tp.lesions) == [0.5, 1.5]  # replaced, not added

    other = build_report("P1", generate_uid(), "20240301", [Lesion((0, 0, 0), 2.0, 16.0)])
    other_instance = ingest(service, rest, other)[0]
    assert len(service.store.timepoints("P1")) == 2
    series_id, study_id = rest.parents[other_instance]
    service.on_change("DELETED", "STUDY", study_id)  # Orthanc deleted the second study
    service.drain()
    assert [tp.date for tp in service.store.timepoints("P1")] == ["20240101"]
    service.forget("INSTANCE", instance)
    assert service.store.timepoints("P1") == [] and service.store.patients() == (0, [])


def test_reconcile_drops_what_orthanc_lost_and_ingests_what_it_missed(service: F.FollowUp, rest: FakeRest) -> None:
    kept = ingest(service, rest, build_report("P2", generate_uid(), "20240101", [Lesion((0, 0, 0), 1.0, 12.0)]))[0]
    lost = ingest(service, rest, build_report("P2", generate_uid(), "20240201", [Lesion((0, 0, 0), 1.0, 12.0)]))[0]
    rest.delete(lost)  # deleted while the plugin was not listening
    missed = rest.add(build_report("P2", generate_uid(), "20240301", [Lesion((0, 0, 0), 1.0, 12.0)]))
    rest.add(source_image("P2", generate_uid(), "20240301", generate_uid()))  # an image: never read

    assert service.reconcile() == {"removed": 1, "ingested": 1}
    assert [tp.date for tp in service.store.timepoints("P2")] == ["20240101", "20240301"]
    assert kept in service.store.known_instances() and missed in service.store.known_instances()
    assert service.reconcile() == {"removed": 0, "ingested": 0}


def test_callbacks_only_enqueue(service: F.FollowUp, rest: FakeRest) -> None:
    instance = rest.add(build_report("P3", generate_uid(), "20240101", [Lesion((0, 0, 0), 1.0, 12.0)]))
    seen = []
    on_change = service.chain(lambda *args: seen.append(args))
    rest.calls.clear()
    on_change("NEW_INSTANCE", "INSTANCE", instance)
    assert seen == [("NEW_INSTANCE", "INSTANCE", instance)] and rest.calls == []  # nothing read yet
    service.drain()
    assert len(service.store.timepoints("P3")) == 1


def test_the_module_stays_light() -> None:
    """orthanc_plugin/ runs inside Orthanc: no numpy, highdicom, torch, scipy or skimage."""
    heavy = {"numpy", "highdicom", "torch", "scipy", "skimage", "monai"}
    for name in ("followup.py", "followup_routes.py"):
        tree = ast.parse((REPO / "orthanc_plugin" / name).read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module}
        assert not imported & heavy, (name, imported & heavy)


# --- matching ------------------------------------------------------------------------------------------------------


def observation(centre, diameter=12.0, *, uid=None, for_="FOR", volume_centre=None, volume=None,
                anatomical=False) -> F.LesionObservation:
    measurements = [F.Measurement(("103339001", "SCT", "Long axis"), None, diameter, "mm", "long_axis_mm", diameter)]
    if volume is not None:
        measurements.append(F.Measurement(("118565006", "SCT", "Volume"), None, volume, "ml", "volume_ml", volume))
    return F.LesionObservation(
        tracking_uid=uid or generate_uid(), tracking_id="Lesion", centroid=centre, frame_of_reference_uid=for_,
        volume_centre=volume_centre, measurements=measurements,
        finding_category=("91723000", "SCT", "Anatomical structure") if anatomical else None)


def timepoints(*lesion_lists, dates=None) -> list[F.Timepoint]:
    return [F.Timepoint(f"1.2.{i}", (dates or [f"2024{i + 1:02d}01" for i in range(len(lesion_lists))])[i],
                        lesions=list(lesions)) for i, lesions in enumerate(lesion_lists)]


def statuses(tracked: list[F.TrackedLesion]) -> list[tuple[str, str]]:
    return [(t.label, t.status) for t in tracked]


def test_same_tracking_uid_matches_whatever_the_distance() -> None:
    uid = generate_uid()
    tracked = F.track_lesions(timepoints([observation((0, 0, 0), uid=uid)], [observation((300, 0, 0), uid=uid)]))
    assert statuses(tracked[1]) == [("Lesion 1", "persisting")] and tracked[1][0].matched_by == "tracking_uid"


def test_centres_match_within_a_tolerance_scaled_by_size() -> None:
    # a 12 mm lesion: tolerance max(10, 12) = 12 mm
    near = F.track_lesions(timepoints([observation((0, 0, 0), 12.0)], [observation((11, 0, 0), 12.0)]))
    assert statuses(near[1]) == [("Lesion 1", "persisting")] and near[1][0].distance_mm == pytest.approx(11.0)
    far = F.track_lesions(timepoints([observation((0, 0, 0), 12.0)], [observation((13, 0, 0), 12.0)]))
    assert statuses(far[1]) == [("Lesion 1", "disappeared"), ("Lesion 2", "new")]
    # a 40 mm mass whose centre moved 25 mm is still itself; a 5 mm nodule that far away is not
    big = F.track_lesions(timepoints([observation((0, 0, 0), 40.0)], [observation((25, 0, 0), 30.0)]))
    assert statuses(big[1]) == [("Lesion 1", "persisting")]
    small = F.track_lesions(timepoints([observation((0, 0, 0), 5.0)], [observation((25, 0, 0), 5.0)]))
    assert statuses(small[1]) == [("Lesion 1", "disappeared"), ("Lesion 2", "new")]
    assert F.match_tolerance_mm(observation((0, 0, 0), 4.0), observation((0, 0, 0), 6.0)) == 10.0


def test_other_frames_of_reference_are_aligned_by_the_imaged_volume_centres() -> None:
    shift = (50.0, -20.0, 5.0)
    before = observation((10, 10, 10), for_="A", volume_centre=(0.0, 0.0, 0.0))
    after = observation((60, -10, 15), for_="B", volume_centre=shift)
    tracked = F.track_lesions(timepoints([before], [after]))
    assert statuses(tracked[1]) == [("Lesion 1", "persisting")] and tracked[1][0].distance_mm == pytest.approx(0.0)
    # the same Frame of Reference needs no alignment, even when the imaged volumes differ
    same = observation((60, -10, 15), for_="A", volume_centre=shift)
    assert statuses(F.track_lesions(timepoints([before], [same]))[1])[0][1] == "disappeared"
    # without the volume centres nothing can be aligned: positions are compared as they are
    unknown = observation((60, -10, 15), for_="B")
    assert statuses(F.track_lesions(timepoints([before], [unknown]))[1])[0][1] == "disappeared"


def test_matching_is_one_to_one_nearest_first() -> None:
    first = [observation((0, 0, 0), 12.0), observation((14, 0, 0), 12.0)]
    second = [observation((13, 0, 0), 12.0), observation((3, 0, 0), 12.0)]
    tracked = F.track_lesions(timepoints(first, second))
    pairs = {t.label: t.observation.centroid for t in tracked[1]}
    assert pairs == {"Lesion 1": (3, 0, 0), "Lesion 2": (13, 0, 0)}


def test_new_disappeared_and_reappeared_lesions_are_labelled() -> None:
    a, b = (0, 0, 0), (50, 0, 0)
    tracked = F.track_lesions(timepoints([observation(a, volume=2.0)],
                                         [observation(a, volume=2.5), observation(b, volume=1.0)],
                                         [observation(b, volume=1.0)],
                                         [observation(a, volume=0.5), observation(b, volume=1.0)]))
    assert statuses(tracked[0]) == [("Lesion 1", "new")]
    assert statuses(tracked[1]) == [("Lesion 1", "persisting"), ("Lesion 2", "new")]
    assert statuses(tracked[2]) == [("Lesion 1", "disappeared"), ("Lesion 2", "persisting")]
    assert statuses(tracked[3]) == [("Lesion 1", "new"), ("Lesion 2", "persisting")]
    assert tracked[3][0].reappeared and tracked[3][0].lesion_uid == tracked[0][0].lesion_uid


# --- response --------------------------------------------------------------------------------------------------


def response(*diameter_lists, extra=None) -> list[dict]:
    """Responses of time points whose lesions lie 100 mm apart with the given longest diameters (None: absent)."""
    lists = []
    for diameters in diameter_lists:
        lists.append([observation((100.0 * i, 0, 0), d) for i, d in enumerate(diameters) if d is not None])
    if extra:
        for index, obs in extra:
            lists[index].append(obs)
    tracked = F.track_lesions(timepoints(*lists))
    return [F.assess_response(tracked, i) for i in range(len(lists))]


def test_response_categories() -> None:
    base = response([30.0, 20.0])[0]
    assert base["category"] == "baseline" and base["sum_of_longest_diameters_mm"] == 50.0
    assert base["text"] == f"Baseline: 2 target lesion(s), SLD 50.0 mm; {F.CONFIRMATION}"
    assert base["target_lesions"] == ["Lesion 1", "Lesion 2"]
    assert response([30.0, 20.0], [21.0, 14.0])[1]["category"] == "PR"  # 35 mm: −30 %
    assert response([30.0, 20.0], [21.0, 14.5])[1]["category"] == "SD"  # −29 %
    pd = response([30.0, 20.0], [36.0, 24.0])[1]  # +20 % and +10 mm
    assert pd["category"] == "PD" and pd["change_from_nadir_percent"] == 20.0 and pd["change_from_nadir_mm"] == 10.0
    assert response([12.0, 10.0], [15.0, 12.0])[1]["category"] == "PD"  # 22 → 27 mm: +23 % and +5 mm
    assert response([12.0, 10.0], [14.5, 12.0])[1]["category"] == "SD"  # +20 % but +4.5 mm: below the 5 mm floor
    cr = response([30.0, 20.0], [None, None])[1]
    assert cr["category"] == "CR" and cr["sum_of_longest_diameters_mm"] == 0.0
    ne = response([8.0], [9.0])[1]  # nothing measurable (≥ 10 mm) at baseline
    assert ne["category"] == "NE" and ne["target_lesions"] == []


def test_progression_is_measured_from_the_nadir_and_new_lesions_are_progression() -> None:
    out = response([30.0, 20.0], [20.0, 10.0], [25.0, 12.0])  # 50 → 30 (PR) → 37: +23 % and +7 mm over the nadir
    assert [r["category"] for r in out] == ["baseline", "PR", "PD"]
    assert out[2]["nadir_sum_mm"] == 30.0 and out[2]["change_from_baseline_percent"] == -26.0
    new = response([30.0], [29.0], extra=[(1, observation((0, 300, 0), 6.0))])[1]
    assert new["category"] == "PD" and new["new_lesions"] == ["Lesion 2"] and "new lesion" in new["text"]
    assert new["status"] == F.CONFIRMATION and new["text"].endswith(F.CONFIRMATION)
    # a new finding coded as an anatomical structure is no new lesion
    anatomy = response([30.0], [29.0], extra=[(1, observation((0, 300, 0), 6.0, anatomical=True))])[1]
    assert anatomy["category"] == "SD" and anatomy["new_lesions"] == []


def test_at_most_five_targets_of_at_least_ten_mm() -> None:
    base = response([11.0, 12.0, 13.0, 14.0, 15.0, 16.0, 9.0])[0]
    assert len(base["target_lesions"]) == 5 and base["sum_of_longest_diameters_mm"] == 70.0  # 16+15+14+13+12


# --- comparison for the worker's report, CSV and routes ---------------------------------------------------------


def test_comparison_with_the_previous_study(tmp_path: Path, service: F.FollowUp, rest: FakeRest) -> None:
    for_ = generate_uid()
    first, second = generate_uid(), generate_uid()
    ingest(service, rest, build_report("P4", first, "20240101", [Lesion((0, 0, 0), 2.0, 20.0, 12.0, tracking_id="A"),
                                                                  Lesion((80, 0, 0), 1.0, 14.0, tracking_id="B")],
                                       frame_of_reference_uid=for_))
    ingest(service, rest, build_report("P4", second, "20240401",
                                       [Lesion((1, 0, 0), 3.0, 25.0, tracking_id="A2", centre_as="volume surface"),
                                        Lesion((0, 90, 0), 0.4, 9.0, tracking_id="C")],
                                       frame_of_reference_uid=for_, length_unit="cm"))
    out = service.comparison(second)
    assert out["prior"] == {"study_instance_uid": first, "date": "2024-01-01"} and out["date"] == "2024-04-01"
    items = {item["label"]: item for item in out["comparison"]}
    assert items["Lesion 1"]["tracking_id"] == "A2" and items["Lesion 1"]["status"] == "increased"  # 20 → 25 mm
    assert items["Lesion 1"]["prior_volume_ml"] == 2.0 and items["Lesion 1"]["current_volume_ml"] == 3.0
    assert items["Lesion 1"]["change_percent"] == 50.0 and items["Lesion 1"]["current_longest_diameter_mm"] == 25.0
    assert items["Lesion 2"]["status"] == "resolved" and items["Lesion 2"]["tracking_id"] == "prior B"
    assert items["Lesion 2"]["change_percent"] == -100.0
    assert items["Lesion 3"]["status"] == "new" and items["Lesion 3"]["prior_volume_ml"] is None
    assert out["response"]["category"] == "PD" and out["sum_of_longest_diameters"] == {
        "prior_mm": 34.0, "current_mm": 25.0, "change_percent": -26.5}
    assert service.comparison(first)["prior"] is None  # the baseline has nothing to compare with
    assert service.comparison("1.2.3") is None

    # the worker asks before its SR exists: its findings stand for the study (a re-run replaces the stored ones)
    body = {"patient_id": "P4", "study_date": "20240401", "frame_of_reference_uid": for_,
            "findings": [{"tracking_uid": "9.9", "tracking_id": "Lesion 1", "volume_ml": 1.0,
                          "longest_diameter_mm": 13.0, "centroid_mm": [0.5, 0.0, 0.0]},
                         {"tracking_uid": "9.8", "tracking_id": "Lesion 2", "volume_ml": 0.7,
                          "longest_diameter_mm": 8.0, "centroid_mm": [80.0, 1.0, 0.0]}]}
    out = service.comparison(second, body)
    assert [(i["label"], i["status"]) for i in out["comparison"]] == [("Lesion 1", "decreased"),
                                                                     ("Lesion 2", "decreased")]
    assert out["response"]["category"] == "PR"  # 34 → 21 mm: −38 %
    third = service.comparison("1.2.826.0.1.99", {**body, "study_date": "20240801"})
    assert third["prior"]["study_instance_uid"] == second  # the stored second study, not the worker's body


def test_lesions_view_and_csv(service: F.FollowUp, rest: FakeRest) -> None:
    for_ = generate_uid()
    ingest(service, rest, build_report("=cmd|P5", generate_uid(), "20240101", [Lesion((0, 0, 0), 2.0, 20.0, 12.0)],
                                       frame_of_reference_uid=for_))
    ingest(service, rest, build_report("=cmd|P5", generate_uid(), "20240301", [Lesion((2, 0, 0), 2.2, 21.0, 13.0),
                                                                              Lesion((50, 0, 0), 0.4, 10.0)],
                                       frame_of_reference_uid=for_))
    view = service.lesions("=cmd|P5")
    assert [tp["date"] for tp in view["timepoints"]] == ["2024-01-01", "2024-03-01"]
    lesion = view["timepoints"][1]["lesions"][0]
    assert {k: lesion[k] for k in ("label", "status", "volume_ml", "longest_diameter_mm", "short_axis_mm")} == {
        "label": "Lesion 1", "status": "persisting", "volume_ml": 2.2, "longest_diameter_mm": 21.0,
        "short_axis_mm": 13.0}
    assert lesion["volume_change_percent"] == 10.0 and lesion["matched_by"] == "centroid"
    first_seen = view["timepoints"][0]["lesions"][0]
    assert lesion["tracking_uid"] == first_seen["tracking_uid"] == first_seen["sr_tracking_uid"]  # one identity
    assert lesion["sr_tracking_uid"] != lesion["tracking_uid"]  # … while each SR has its own
    assert view["timepoints"][1]["response"]["category"] == "PD"

    data = F.lesions_csv(view)
    rows = list(csv.DictReader(io.StringIO(data.decode("utf-8"))))
    assert [(r["study_date"], r["label"], r["status"]) for r in rows] == [
        ("2024-01-01", "Lesion 1", "new"), ("2024-03-01", "Lesion 1", "persisting"), ("2024-03-01", "Lesion 2", "new")]
    assert rows[0]["patient_id"] == "'=cmd|P5"  # a spreadsheet formula stays text
    assert float(rows[1]["volume_ml"]) == 2.2 and rows[1]["response"] == "PD" and data.count(b"\r\n") == 4


@pytest.fixture
def api(service: F.FollowUp, rest: FakeRest):
    from orthanc_plugin.routes import Api

    for i, date in enumerate(("20240101", "20240601")):
        ingest(service, rest, build_report("PAT-1", generate_uid(), date, [Lesion((0, 0, 0), 1.0 + i, 12.0 + i)],
                                           frame_of_reference_uid="1.2.3"))
    ingest(service, rest, build_report("OTHER", generate_uid(), "20240101", [Lesion((0, 0, 0), 1.0, 12.0)]))
    api = Api(None, None, version="t", health=dict, models=dict, reload_models=dict, lease_seconds=30)
    api.add_routes(routes(service))
    return lambda method, path, body=None, **query: api.handle(Request(
        method, path, {k: str(v) for k, v in query.items()}, json.dumps(body).encode() if body else b"", {}))


def test_routes(api) -> None:
    status, body = api("GET", "patients", query="pat")
    assert status == 200 and body["total"] == 1 and body["patients"][0]["patient_id"] == "PAT-1"
    assert body["patients"][0]["study_count"] == 2 and body["patients"][0]["last_study_date"] == "20240601"
    status, body = api("GET", "patients", limit=1, offset=1)
    assert status == 200 and body["total"] == 2 and [p["patient_id"] for p in body["patients"]] == ["PAT-1"]
    assert api("GET", "patients", limit=0)[0] == 400

    status, body = api("GET", "patients/PAT-1/lesions")
    assert status == 200 and body["patient_id"] == "PAT-1" and len(body["timepoints"]) == 2
    assert set(body["timepoints"][0]) >= {"study_instance_uid", "date", "lesions"}
    assert set(body["timepoints"][1]["lesions"][0]) >= {"tracking_uid", "label", "status", "volume_ml",
                                                        "longest_diameter_mm", "short_axis_mm"}
    status, body = api("GET", "patients/PAT-1/lesions.csv")
    assert status == 200 and isinstance(body, RawBody) and body.mime.startswith("text/csv")
    assert body.data.startswith(b"patient_id,study_instance_uid,")
    status, body = api("GET", "patients/PAT-1/report")
    assert status == 200 and body["current_response"]["category"] == "SD" and body["status"] == F.CONFIRMATION
    assert api("GET", "patients/NOBODY/lesions")[0] == 404
    assert api("GET", "patients/NOBODY/lesions.csv")[0] == 404

    study = body["timepoints"][1]["study_instance_uid"]
    status, body = api("GET", f"studies/{study}/comparison")
    assert status == 200 and body["comparison"][0]["status"] == "stable" and body["response"]["category"] == "SD"
    assert api("GET", "studies/1.2.3.4/comparison")[0] == 404
    assert api("POST", f"studies/{study}/comparison", {"patient_id": "PAT-1"})[0] == 400
    bad = {"patient_id": "PAT-1", "findings": [{"volume_ml": "big"}]}
    assert api("POST", f"studies/{study}/comparison", bad)[0] == 400
    good = {"patient_id": "PAT-1", "findings": [{"volume_ml": 4.0, "longest_diameter_mm": 30.0,
                                                 "centroid_mm": [0, 0, 0]}]}
    status, body = api("POST", f"studies/{study}/comparison", good)
    assert status == 200 and body["response"]["category"] == "PD"  # 12 → 30 mm


# --- priors --------------------------------------------------------------------------------------------------------


def test_unmeasured_earlier_studies_are_queued_oldest_first(service: F.FollowUp, rest: FakeRest) -> None:
    def study(orthanc_id: str, uid: str, date: str) -> dict:
        return {"ID": orthanc_id, "ParentPatient": "pat", "PatientMainDicomTags": {"PatientID": "P9"},
                "MainDicomTags": {"StudyInstanceUID": uid, "StudyDate": date, "StudyTime": "1200"}}

    rest.studies = {"new": study("new", "1.9.5", "20240601"), "a": study("a", "1.9.1", "20230101"),
                    "b": study("b", "1.9.2", "20220101"), "measured": study("measured", "1.9.3", "20230601"),
                    "jobbed": study("jobbed", "1.9.4", "20230301"), "later": study("later", "1.9.6", "20250101"),
                    "undated": study("undated", "1.9.7", "")}
    rest.patient_studies = {"pat": list(rest.studies)}
    ingest(service, rest, build_report("P9", "1.9.3", "20230601", [Lesion((0, 0, 0), 1.0, 12.0)]))
    service.dispatcher = FakeDispatcher(routable={"new"})
    service.jobs = FakeJobs({"1.9.4"})

    assert service.queue_priors("new") == ["1.9.2", "1.9.1"]
    assert service.dispatcher.requested == ["1.9.2", "1.9.1"]
    assert service.store.pending_priors("P9") == ["1.9.2", "1.9.1"]
    assert service.pending_priors("P9") == []  # their jobs are not active in FakeJobs
    service.jobs.studies |= {"1.9.2"}
    assert service.pending_priors("P9") == ["1.9.2"]
    assert service.queue_priors("new") == []  # asked once only
    assert service.queue_priors("a") == []  # a study no rule routes brings no priors


def test_a_report_written_while_its_prior_was_measured_is_redone_once(service: F.FollowUp, rest: FakeRest) -> None:
    """Two workers: the new study's report asked for its comparison while the prior's job still ran."""
    prior, new = generate_uid(), generate_uid()
    service.dispatcher = FakeDispatcher(routable=set())
    service.jobs = FakeJobs({prior, new})  # both jobs under way
    service.store.record_prior_request(prior, new, "P-RACE", ["job-prior"])
    rest.uids[prior] = ("Study", "st-prior")
    rest.studies["st-prior"] = {"MainDicomTags": {"StudyInstanceUID": prior, "StudyDate": "20240101"}}
    findings = {"patient_id": "P-RACE", "study_date": "20240601",
                "findings": [{"volume_ml": 1.0, "longest_diameter_mm": 12.0, "centroid_mm": [0, 0, 0]}]}
    assert service.comparison(prior, {**findings, "study_date": "20240101"})["pending_priors"] == []  # not itself
    assert service.comparison(new, {**findings, "study_date": "20231201"})["pending_priors"] == [prior]
    assert service.store.stale_comparisons("P-RACE") == []  # a later prior: no comparison to miss
    assert service.comparison(new, findings)["pending_priors"] == [prior]
    assert service.store.stale_comparisons("P-RACE") == [new]

    ingest(service, rest, build_report("P-RACE", new, "20240601", [Lesion((0, 0, 0), 1.0, 12.0)]))
    assert service.dispatcher.requested == []  # the prior is still pending
    service.jobs.studies = {new}
    ingest(service, rest, build_report("P-RACE", prior, "20240101", [Lesion((0, 0, 0), 0.5, 9.0)]))
    assert service.dispatcher.requested == []  # the new study's own job has not ended yet
    service.jobs.studies = set()
    service.job_finished({"study_instance_uid": new})
    service.drain()
    assert service.dispatcher.requested == [new]  # redone, now that the prior is measured
    assert service.store.stale_comparisons("P-RACE") == []
    service.job_finished({"study_instance_uid": new})
    service.drain()
    assert service.dispatcher.requested == [new]  # once
    assert "pending_priors" in service.comparison(new, findings) and service.store.stale_comparisons("P-RACE") == []


# --- the worker's side of the contract ------------------------------------------------------------------------


def test_the_worker_asks_for_the_comparison_before_writing_its_report(service: F.FollowUp, rest: FakeRest) -> None:
    from types import SimpleNamespace

    from inference.pipeline import request_comparison
    from inference.results.findings import Finding
    from orthanc_plugin.routes import Api

    prior = generate_uid()
    ingest(service, rest, build_report("PAT-W", prior, "20240101", [Lesion((0, 0, 0), 1.0, 12.0)],
                                       frame_of_reference_uid="1.2.9"))
    api = Api(None, None, version="t", health=dict, models=dict, reload_models=dict, lease_seconds=30)
    api.add_routes(routes(service))

    class Client:  # the worker's OrthancClient, answered by the plugin's routes
        def post_json(self, uri: str, body: dict, *, timeout: float | None = None):
            status, answer = api.handle(Request("POST", uri.removeprefix("/ai/"), {}, json.dumps(body).encode(), {}))
            return SimpleNamespace(status_code=status, json=lambda: answer, text=json.dumps(answer))

    header = pydicom.Dataset()
    header.PatientID, header.StudyDate = "PAT-W", "20240601"
    volume = SimpleNamespace(datasets=[header], shape=(10, 20, 20), affine=np.eye(4), frame_of_reference_uid="1.2.9",
                             study_instance_uid=generate_uid())
    finding = Finding(number=1, segment_label=1, segment_name="Lesion", tracking_uid=generate_uid(),
                      tracking_id="Lesion 1", voxel_count=100, volume_ml=2.5, max_3d_diameter_mm=21.0,
                      longest_axial_diameter_mm=20.0, perpendicular_axial_diameter_mm=15.0, mean_intensity=1.0,
                      centroid_mm=(1.0, 0.0, 0.0), centroid_index=(0.0, 0.0, 0.0), key_slice=0)

    out = request_comparison(Client(), volume, [finding])
    assert out["prior"]["study_instance_uid"] == prior
    (item,) = out["comparison"]
    assert item["tracking_id"] == "Lesion 1" and item["status"] == "increased"
    assert item["prior_volume_ml"] == 1.0 and item["current_volume_ml"] == 2.5 and item["change_percent"] == 150.0
    assert out["response"]["category"] == "PD" and out["response"]["text"].endswith(F.CONFIRMATION)
    header.PatientID = "NEW-PATIENT"  # nothing earlier to compare with
    assert request_comparison(Client(), volume, [finding]) is None
