"""Longitudinal follow-up: every TID 1500 measurement SR in Orthanc, lesions tracked across a patient's studies.

Runs inside Orthanc's embedded Python, so it reads SRs with pydicom only (no highdicom, no numpy).

* **Ingestion.** Orthanc's change callback only enqueues (new instance, deletion, stable study); the
  ``ai-followup`` thread reads each new SR through the REST API and parses its TID 1500 content tree
  (Imaging Measurements → Measurement Group (TID 1410/1411/1501) → tracking identifier and UID, finding,
  finding site, NUM items with their units, and a 3D centre when the report gives one). Reports are keyed by
  SOP Instance UID: a re-run that replaces an SR replaces its rows, so nothing is counted twice. An SR that is
  not a TID 1500 report, or whose measurements lack units, is skipped with a logged reason. Deleting an
  instance, series, study or patient in Orthanc removes what came from it; a periodic reconcile catches what
  a missed event would leave behind and ingests SRs stored while the plugin was down.
* **Matching** (:func:`track_lesions`), time points in study date order. An observation joins a lesion track
  (1) when it has the same Tracking Unique Identifier as an earlier observation of that track, else (2) when
  its centre lies within ``max(10 mm, 1 × the larger longest diameter of the two)`` of the track's last
  centre, in patient coordinates, once aligned: the same Frame of Reference needs no alignment; otherwise the
  two studies are aligned by the centres of the imaged volumes of their source series (no registration);
  pairs are taken nearest first, one to one. Unmatched observations start new tracks (status ``new``);
  tracks seen before but not now are ``disappeared``; the others are ``persisting``.
* **Response** (:func:`assess_response`), RECIST 1.1-style on the sum of longest diameters (SLD), see
  :data:`RESPONSE_RULES`; always labelled "computed, to be confirmed by the physician".
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence

import pydicom
import sqlite_utils
from pydicom.multival import MultiValue

from orthanc_plugin.events import chain_changes

log = logging.getLogger("orthanc_ai.followup")

CONFIRMATION = "computed, to be confirmed by the physician"

#: SR storage classes whose IODs can hold a TID 1500 report (NUM and CONTAINER items).
MEASUREMENT_SR_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.88.22": "Enhanced SR",
    "1.2.840.10008.5.1.4.1.1.88.33": "Comprehensive SR",
    "1.2.840.10008.5.1.4.1.1.88.34": "Comprehensive 3D SR",
    "1.2.840.10008.5.1.4.1.1.88.35": "Extensible SR",
}

# Concepts, as (code value, coding scheme); legacy SNOMED-RT (SRT) codes are translated to SCT first.
_REPORT_TITLES = {("126000", "DCM"), ("126001", "DCM"), ("126002", "DCM"), ("126003", "DCM")}  # CID 7021
_IMAGING_MEASUREMENTS = ("126010", "DCM")
_QUALITATIVE_EVALUATIONS = ("C0034375", "UMLS")
_MEASUREMENT_GROUP = ("125007", "DCM")
_TRACKING_IDENTIFIER = ("112039", "DCM")
_TRACKING_UID = ("112040", "DCM")
_FINDING = ("121071", "DCM")
_FINDING_SITE = ("363698007", "SCT")
_FINDING_CATEGORY = ("276214006", "SCT")
_DERIVATION = ("121401", "DCM")
_REFERENCED_SEGMENT = {("121191", "DCM"), ("121214", "DCM")}  # Referenced Segment, Referenced Segmentation Frame
_VOLUME_SURFACE = ("121231", "DCM")
_CENTRES = {("128138", "DCM"), ("111010", "DCM"), ("122475", "DCM"), ("128137", "DCM")}  # centre of mass…
_ABSENT = ("272519000", "SCT")
_ANATOMICAL_STRUCTURE = ("91723000", "SCT")
_MAXIMUM = ("56851009", "SCT")

#: NUM concept → quantity name; the unit table converts to the quantity's canonical unit.
_QUANTITIES = {
    ("118565006", "SCT"): "volume",      # Volume
    ("81827009", "SCT"): "diameter",     # Diameter (with Derivation "Maximum": the maximum 3D diameter)
    ("410668003", "SCT"): "diameter",    # Length (OHIF / dcmjs length tool)
    ("L0JK", "IBSI"): "max_3d_diameter",  # Maximum 3D diameter (IBSI, dcmqi / pyradiomics)
    ("103339001", "SCT"): "long_axis",   # Long axis
    ("103340004", "SCT"): "short_axis",  # Short axis
    ("373098007", "SCT"): "mean",        # Mean (intensity, any unit)
    ("42798000", "SCT"): "area",         # Area
    ("131184002", "SCT"): "area",        # Area of defined region
}
_LENGTH_MM = {"mm": 1.0, "cm": 10.0, "m": 1000.0, "um": 0.001}
_UNITS = {
    "volume": ("volume_ml", {"ml": 1.0, "mL": 1.0, "cm3": 1.0, "mm3": 0.001, "l": 1000.0, "L": 1000.0,
                             "ul": 0.001, "uL": 0.001}),
    "diameter": ("diameter_mm", _LENGTH_MM),
    "max_3d_diameter": ("max_3d_diameter_mm", _LENGTH_MM),
    "long_axis": ("long_axis_mm", _LENGTH_MM),
    "short_axis": ("short_axis_mm", _LENGTH_MM),
    "area": ("area_mm2", {"mm2": 1.0, "cm2": 100.0}),
    "mean": ("mean_intensity", None),  # kept in its own unit
}

MIN_TOLERANCE_MM = 10.0
TOLERANCE_FACTOR = 1.0
MEASURABLE_MM = 10.0
MAX_TARGETS = 5

RESPONSE_NAMES = {"CR": "Complete response", "PR": "Partial response", "SD": "Stable disease",
                  "PD": "Progressive disease", "NE": "Not evaluable", "baseline": "Baseline"}
RESPONSE_RULES = (
    "Target lesions: up to 5 lesions of the first (baseline) time point with a longest diameter of at least "
    "10 mm, largest first; the sum of their longest diameters (SLD) is taken at every time point, a target "
    "that disappeared counting 0 mm.",
    "Longest diameter: the long axis in the acquisition plane when reported, else the reported diameter, else "
    "the maximum 3D diameter.",
    "PD (progressive disease): a new lesion (or one that had disappeared and is seen again), or an SLD at "
    "least 20 % and at least 5 mm above the smallest SLD of the earlier time points (nadir).",
    "CR (complete response): every lesion seen before has disappeared and none is new.",
    "PR (partial response): an SLD at least 30 % below the baseline SLD.",
    "SD (stable disease): none of the above.",
    "NE (not evaluable): no measurable target lesion at baseline, or a target lesion without a diameter.",
    "Findings coded as an anatomical structure (not a lesion) take no part in the response.",
    "Computed from the stored measurements, to be confirmed by the physician.",
)


class ReportSkipped(ValueError):
    """The SR is not something the follow-up can use; the message says why (it is logged and stored)."""


# --- parsing (pydicom only) ---------------------------------------------------------------------------------


@dataclass
class Measurement:
    """One NUM item: its concept, derivation, value and UCUM unit, and the canonical quantity it gives."""

    concept: tuple[str, str, str]  # (code value, scheme, meaning)
    derivation: str | None
    value: float
    unit: str
    quantity: str | None = None  # volume_ml, diameter_mm, long_axis_mm, … (None: not a quantity we compare)
    canonical_value: float | None = None

    def to_json(self) -> dict:
        return {"name": self.concept[2], "code": list(self.concept[:2]), "derivation": self.derivation,
                "value": self.value, "unit": self.unit, "quantity": self.quantity}


@dataclass
class LesionObservation:
    """One measurement group of one report: a lesion (or other finding) as measured in one study."""

    tracking_uid: str | None = None
    tracking_id: str | None = None
    template: str | None = None
    finding: tuple[str, str, str] | None = None
    finding_site: tuple[str, str, str] | None = None
    finding_category: tuple[str, str, str] | None = None
    region: bool = True  # False for TID 1501 (measurements of a whole image, not of a region)
    centroid: tuple[float, float, float] | None = None
    centroid_source: str | None = None
    frame_of_reference_uid: str | None = None
    referenced_segment: tuple[str, int] | None = None
    image_point: tuple[str, int | None, tuple[float, float]] | None = None  # (SOP UID, frame, (col, row))
    measurements: list[Measurement] = field(default_factory=list)
    # set when read back from the store
    sop_instance_uid: str | None = None
    volume_centre: tuple[float, float, float] | None = None

    def quantity(self, name: str) -> float | None:
        for m in self.measurements:
            if m.quantity == name and m.canonical_value is not None:
                return m.canonical_value
        return None

    @property
    def volume_ml(self) -> float | None:
        return self.quantity("volume_ml")

    @property
    def short_axis_mm(self) -> float | None:
        return self.quantity("short_axis_mm")

    @property
    def max_3d_diameter_mm(self) -> float | None:
        return self.quantity("max_3d_diameter_mm")

    @property
    def longest_diameter_mm(self) -> float | None:
        """RECIST's longest diameter: the in-plane long axis, else a diameter, else the maximum 3D diameter."""
        for name in ("long_axis_mm", "diameter_mm", "max_3d_diameter_mm"):
            value = self.quantity(name)
            if value is not None:
                return value
        return None

    @property
    def size_mm(self) -> float | None:
        """The lesion's extent for the matching tolerance: its largest diameter, or that of a sphere of its volume."""
        sizes = [v for v in (self.quantity(n) for n in ("long_axis_mm", "diameter_mm", "max_3d_diameter_mm"))
                 if v is not None]
        if sizes:
            return max(sizes)
        volume = self.volume_ml
        return (6000.0 * volume / math.pi) ** (1 / 3) if volume else None

    @property
    def is_lesion(self) -> bool:
        return self.region and (self.finding_category is None or self.finding_category[:2] != _ANATOMICAL_STRUCTURE)

    @property
    def mean_intensity(self) -> tuple[float | None, str | None]:
        for m in self.measurements:
            if m.quantity == "mean_intensity":
                return m.value, m.unit
        return None, None


@dataclass
class MeasurementReport:
    """What the follow-up keeps of one TID 1500 SR."""

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    study_instance_uid: str
    patient_id: str
    patient_name: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    study_date: str = ""
    study_time: str = ""
    accession_number: str = ""
    study_description: str = ""
    content_date: str = ""
    content_time: str = ""
    manufacturer: str = ""
    model_name: str = ""
    source_series_uids: list[str] = field(default_factory=list)
    lesions: list[LesionObservation] = field(default_factory=list)
    states_absence: bool = False  # "Absent" in the qualitative evaluations: measured, nothing found
    notes: list[str] = field(default_factory=list)  # what was dropped, and why


def _key(code: pydicom.Dataset) -> tuple[str, str]:
    value = str(code.get("CodeValue") or code.get("LongCodeValue") or code.get("URNCodeValue") or "")
    scheme = str(code.get("CodingSchemeDesignator", ""))
    if scheme == "SRT":  # SNOMED-RT codes of older writers: the SNOMED CT code they stand for
        translated = _srt_to_sct().get(value)
        if translated:
            return translated, "SCT"
    return value, scheme


_SRT: dict[str, str] | None = None


def _srt_to_sct() -> dict[str, str]:
    global _SRT
    if _SRT is None:
        try:
            from pydicom.sr._snomed_dict import mapping
            _SRT = dict(mapping.get("SRT", {}))
        except Exception:  # a pydicom without the table: legacy codes stay unknown
            _SRT = {}
    return _SRT


def _triple(code: pydicom.Dataset) -> tuple[str, str, str]:
    value, scheme = _key(code)
    return value, scheme, str(code.get("CodeMeaning", ""))


def _name(item: pydicom.Dataset) -> tuple[str, str] | None:
    names = item.get("ConceptNameCodeSequence")
    return _key(names[0]) if names else None


def _template(item: pydicom.Dataset) -> str | None:
    templates = item.get("ContentTemplateSequence")
    return str(templates[0].get("TemplateIdentifier", "")) or None if templates else None


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def parse_measurement_report(ds: pydicom.Dataset) -> MeasurementReport:
    """The measurement groups of a TID 1500 SR (ours or another tool's), with canonical quantities.

    Raises :class:`ReportSkipped` saying why when the SR is not a TID 1500 report, or when none of its groups
    has a measurement that can be used (for instance every NUM lacks its units). A measurement without units
    or value is dropped with a note; so is a group left without measurements.
    """
    sop_uid = _text(ds, "SOPInstanceUID") or "(no SOP Instance UID)"
    sop_class = _text(ds, "SOPClassUID")
    if sop_class not in MEASUREMENT_SR_CLASSES:
        raise ReportSkipped(f"SR {sop_uid}: SOP class {sop_class or 'none'} cannot hold a TID 1500 report")
    if ds.get("ValueType") != "CONTAINER" or not ds.get("ConceptNameCodeSequence") or "ContentSequence" not in ds:
        raise ReportSkipped(f"SR {sop_uid} has no root container with a content tree")
    template = _template(ds)
    title = ds.ConceptNameCodeSequence[0]
    if template != "1500" and _key(title) not in _REPORT_TITLES:
        raise ReportSkipped(
            f'SR {sop_uid} is not a TID 1500 measurement report: its root is "{title.get("CodeMeaning", "")}" '
            f"with template {template or 'none'}")
    if not _text(ds, "PatientID"):
        raise ReportSkipped(f"SR {sop_uid} has no Patient ID: it cannot join a patient's follow-up")
    report = MeasurementReport(
        sop_instance_uid=sop_uid, sop_class_uid=sop_class,
        series_instance_uid=_text(ds, "SeriesInstanceUID"), study_instance_uid=_text(ds, "StudyInstanceUID"),
        patient_id=_text(ds, "PatientID"), patient_name=_text(ds, "PatientName"),
        patient_birth_date=_text(ds, "PatientBirthDate"), patient_sex=_text(ds, "PatientSex"),
        study_date=_text(ds, "StudyDate"), study_time=_text(ds, "StudyTime"),
        accession_number=_text(ds, "AccessionNumber"), study_description=_text(ds, "StudyDescription"),
        content_date=_text(ds, "ContentDate"), content_time=_text(ds, "ContentTime"),
        manufacturer=_text(ds, "Manufacturer"), model_name=_text(ds, "ManufacturerModelName"),
        source_series_uids=_source_series(ds))
    groups = 0
    for container in ds.ContentSequence:
        name = _name(container)
        if container.get("ValueType") != "CONTAINER":
            continue
        if name == _IMAGING_MEASUREMENTS:
            for item in container.get("ContentSequence", []):
                if item.get("ValueType") == "CONTAINER" and _name(item) == _MEASUREMENT_GROUP:
                    groups += 1
                    lesion = _read_group(item, groups, report.notes)
                    if lesion is not None:
                        report.lesions.append(lesion)
        elif name == _QUALITATIVE_EVALUATIONS:
            report.states_absence |= any(
                item.get("ValueType") == "CODE" and item.get("ConceptCodeSequence")
                and _key(item.ConceptCodeSequence[0]) == _ABSENT for item in container.get("ContentSequence", []))
    if not report.lesions:
        if groups:
            raise ReportSkipped(f"SR {sop_uid}: no usable measurement group ({'; '.join(report.notes)})")
        if not report.states_absence:
            raise ReportSkipped(f"SR {sop_uid} is a TID 1500 report without measurement groups "
                                "and without a statement that nothing was found")
    return report


def _source_series(ds: pydicom.Dataset) -> list[str]:
    """Series the report was made from (its evidence), image series first, SEG and SR last."""
    images, others = [], []
    for study in ds.get("CurrentRequestedProcedureEvidenceSequence", []):
        for series in study.get("ReferencedSeriesSequence", []):
            uid = _text(series, "SeriesInstanceUID")
            classes = {_text(i, "ReferencedSOPClassUID") for i in series.get("ReferencedSOPSequence", [])}
            derived = any(c.startswith("1.2.840.10008.5.1.4.1.1.66") or c.startswith("1.2.840.10008.5.1.4.1.1.88")
                          for c in classes)
            if uid and uid not in images + others:
                (others if derived else images).append(uid)
    return images + others


def _read_group(group: pydicom.Dataset, number: int, notes: list[str]) -> LesionObservation | None:
    lesion = LesionObservation(template=_template(group))
    lesion.region = lesion.template != "1501"
    centres: list[tuple[int, tuple[float, float, float], str, str | None]] = []  # (rank, point, source, FoR)
    for item in group.get("ContentSequence", []):
        value_type, name = item.get("ValueType"), _name(item)
        if value_type == "TEXT" and name == _TRACKING_IDENTIFIER:
            lesion.tracking_id = str(item.TextValue)
        elif value_type == "UIDREF" and name == _TRACKING_UID:
            lesion.tracking_uid = str(item.UID)
        elif value_type == "CODE" and item.get("ConceptCodeSequence"):
            code = _triple(item.ConceptCodeSequence[0])
            if name == _FINDING:
                lesion.finding = code
            elif name == _FINDING_SITE:
                lesion.finding_site = code
            elif name == _FINDING_CATEGORY:
                lesion.finding_category = code
        elif value_type == "IMAGE" and name in _REFERENCED_SEGMENT and item.get("ReferencedSOPSequence"):
            ref = item.ReferencedSOPSequence[0]
            numbers = ref.get("ReferencedSegmentNumber")
            number_ = numbers[0] if isinstance(numbers, (list, MultiValue)) else numbers
            lesion.referenced_segment = (_text(ref, "ReferencedSOPInstanceUID"), int(number_ or 0))
        elif value_type == "SCOORD3D":
            point = _scoord3d_centre(item)
            if point is not None:
                rank = 0 if name in _CENTRES else 1 if name == _VOLUME_SURFACE else 2
                centres.append((rank, point, f"SCOORD3D {item.get('GraphicType', '')}",
                                _text(item, "ReferencedFrameOfReferenceUID") or None))
        elif value_type == "SCOORD" and lesion.image_point is None:
            lesion.image_point = _scoord_point(item)
        elif value_type == "NUM":
            measurement = _read_num(item, number, lesion, notes)
            if measurement is not None:
                lesion.measurements.append(measurement)
            for child in item.get("ContentSequence", []):  # TID 300: measurement INFERRED FROM coordinates
                if child.get("ValueType") == "SCOORD3D":
                    point = _scoord3d_centre(child)
                    if point is not None:
                        centres.append((3, point, "SCOORD3D of a measurement",
                                        _text(child, "ReferencedFrameOfReferenceUID") or None))
                elif child.get("ValueType") == "SCOORD" and lesion.image_point is None:
                    lesion.image_point = _scoord_point(child)
    if centres:
        _, lesion.centroid, lesion.centroid_source, lesion.frame_of_reference_uid = min(centres, key=lambda c: c[0])
    if not lesion.measurements:
        notes.append(f"group {number} ({lesion.tracking_id or 'no tracking identifier'}) has no usable "
                     "measurement and was dropped")
        return None
    return lesion


def _read_num(item: pydicom.Dataset, number: int, lesion: LesionObservation, notes: list[str]) -> Measurement | None:
    names = item.get("ConceptNameCodeSequence")
    if not names:
        notes.append(f"group {number}: a NUM item without a concept name was dropped")
        return None
    concept = _triple(names[0])
    derivation = None
    for modifier in item.get("ContentSequence", []):
        if modifier.get("ValueType") == "CODE" and _name(modifier) == _DERIVATION and modifier.get("ConceptCodeSequence"):
            derivation = _triple(modifier.ConceptCodeSequence[0])
    what = f"group {number} ({lesion.tracking_id or 'no tracking identifier'}): measurement \"{concept[2]}\""
    measured = item.get("MeasuredValueSequence")
    if not measured:
        notes.append(f"{what} has no value (Numeric Value Qualifier instead) and was dropped")
        return None
    value_item = measured[0]
    units = value_item.get("MeasurementUnitsCodeSequence")
    if not units:
        notes.append(f"{what} has no units (MeasurementUnitsCodeSequence missing) and was dropped")
        return None
    try:
        raw = value_item.get("FloatingPointValue")
        value = float(raw if raw is not None else value_item.NumericValue)
    except (AttributeError, TypeError, ValueError):
        notes.append(f"{what} has no readable numeric value and was dropped")
        return None
    if not math.isfinite(value):
        notes.append(f"{what} is not a finite number and was dropped")
        return None
    unit = str(units[0].get("CodeValue", ""))
    measurement = Measurement(concept=concept, derivation=derivation[2] if derivation else None, value=value,
                              unit=unit)
    kind = _QUANTITIES.get(concept[:2])
    if kind == "diameter" and derivation is not None and derivation[:2] == _MAXIMUM:
        kind = "max_3d_diameter"
    if kind is not None:
        quantity, factors = _UNITS[kind]
        if factors is None:
            measurement.quantity, measurement.canonical_value = quantity, value
        elif unit in factors:
            measurement.quantity, measurement.canonical_value = quantity, value * factors[unit]
        else:
            notes.append(f"{what} is in unit \"{unit}\", which is not a unit of {kind.replace('_', ' ')}; "
                         "kept but not compared")
    return measurement


def _points(item: pydicom.Dataset, dimensions: int) -> list[tuple[float, ...]]:
    data = [float(v) for v in (item.get("GraphicData") or [])]
    points = [tuple(data[i:i + dimensions]) for i in range(0, len(data) - dimensions + 1, dimensions)]
    if len(points) > 2 and points[0] == points[-1]:  # a closed polygon repeats its first vertex
        points = points[:-1]
    return points


def _mean(points: Sequence[Sequence[float]]) -> tuple[float, ...]:
    return tuple(sum(p[i] for p in points) / len(points) for i in range(len(points[0])))


def _scoord3d_centre(item: pydicom.Dataset) -> tuple[float, float, float] | None:
    """Centre of a 3D spatial coordinate: the point itself, or the mean of the vertices (an ellipsoid's six
    axis end points average to its centre)."""
    points = _points(item, 3)
    if not points:
        return None
    centre = points[0] if str(item.get("GraphicType", "")) == "POINT" else _mean(points)
    return float(centre[0]), float(centre[1]), float(centre[2])


def _scoord_point(item: pydicom.Dataset) -> tuple[str, int | None, tuple[float, float]] | None:
    """(referenced SOP Instance UID, frame, (column, row)) of a 2D coordinate's centre: a circle's first point,
    else the mean of the points. Converted to patient coordinates later, with the image's geometry."""
    points = _points(item, 2)
    if not points:
        return None
    centre = points[0] if str(item.get("GraphicType", "")) in ("POINT", "CIRCLE") else _mean(points)
    for child in item.get("ContentSequence", []):
        if child.get("ValueType") == "IMAGE" and child.get("ReferencedSOPSequence"):
            ref = child.ReferencedSOPSequence[0]
            frames = ref.get("ReferencedFrameNumber")
            frame = None
            if frames not in (None, ""):
                frame = int(frames[0] if isinstance(frames, (list, MultiValue)) else frames)
            return _text(ref, "ReferencedSOPInstanceUID"), frame, (float(centre[0]), float(centre[1]))
    return None


# --- image geometry (for 2D coordinates and for aligning studies) -------------------------------------------


@dataclass(frozen=True)
class ImagePlane:
    """Where one single-frame image lies in patient coordinates (mm, LPS)."""

    position: tuple[float, float, float]
    row_direction: tuple[float, float, float]     # along a row: increasing column index
    column_direction: tuple[float, float, float]  # along a column: increasing row index
    pixel_spacing: tuple[float, float]            # (between rows, between columns)
    rows: int
    columns: int
    frame_of_reference_uid: str | None = None

    @classmethod
    def from_tags(cls, tags: dict) -> "ImagePlane | None":
        """From Orthanc's simplified tags (strings like "x\\y\\z"); None for images without a plane."""
        try:
            position = [float(v) for v in str(tags["ImagePositionPatient"]).split("\\")]
            orientation = [float(v) for v in str(tags["ImageOrientationPatient"]).split("\\")]
            spacing = [float(v) for v in str(tags["PixelSpacing"]).split("\\")]
            rows, columns = int(tags["Rows"]), int(tags["Columns"])
        except (KeyError, TypeError, ValueError):
            return None
        if len(position) != 3 or len(orientation) != 6 or len(spacing) != 2:
            return None
        return cls(tuple(position), tuple(orientation[:3]), tuple(orientation[3:]), (spacing[0], spacing[1]),  # type: ignore[arg-type]
                   rows, columns, str(tags.get("FrameOfReferenceUID") or "") or None)

    def to_patient(self, column: float, row: float) -> tuple[float, float, float]:
        """An SR image coordinate (column, row; (0, 0) is the outer corner of the first pixel) in patient mm."""
        c, r = (column - 0.5) * self.pixel_spacing[1], (row - 0.5) * self.pixel_spacing[0]
        return tuple(p + c * a + r * b for p, a, b in zip(self.position, self.row_direction,  # type: ignore[return-value]
                                                           self.column_direction))

    def centre(self) -> tuple[float, float, float]:
        return self.to_patient(self.columns / 2.0, self.rows / 2.0)


def volume_centre(planes: Iterable[ImagePlane]) -> tuple[float, float, float] | None:
    """Centre of an imaged volume: the mean of its image centres."""
    centres = [p.centre() for p in planes]
    return tuple(_mean(centres)) if centres else None  # type: ignore[return-value]


# --- matching across time points -----------------------------------------------------------------------------


@dataclass
class Timepoint:
    """One study of a patient with the lesions measured in it."""

    study_instance_uid: str
    date: str = ""  # DICOM DA, YYYYMMDD
    time: str = ""
    accession_number: str = ""
    study_description: str = ""
    lesions: list[LesionObservation] = field(default_factory=list)
    reports: list[str] = field(default_factory=list)

    @property
    def sort_key(self) -> tuple[str, str, str]:
        return (self.date or "99999999", self.time or "", self.study_instance_uid)

    @property
    def iso_date(self) -> str | None:
        d = self.date
        return f"{d[:4]}-{d[4:6]}-{d[6:8]}" if len(d) == 8 and d.isdigit() else (d or None)


@dataclass
class TrackedLesion:
    """A lesion track at one time point: its observation there (None when disappeared) and how it was matched."""

    track: int
    label: str
    status: str  # new | persisting | disappeared
    observation: LesionObservation | None
    previous: LesionObservation | None = None  # the track's observation at the previous time point, if any
    last_seen: LesionObservation | None = None  # the track's latest observation before this time point
    matched_by: str | None = None  # tracking_uid | centroid
    distance_mm: float | None = None
    reappeared: bool = False
    lesion_uid: str = ""  # the lesion's identity across time points (see track_lesions)


def alignment_offset(earlier: LesionObservation, later: LesionObservation) -> tuple[float, float, float]:
    """What to add to a position in ``earlier``'s study to compare it with one in ``later``'s study: nothing on
    the same Frame of Reference, else the shift between the centres of the two imaged volumes (nothing when
    one of them is unknown: the patient is assumed to lie the same way)."""
    if earlier.frame_of_reference_uid and earlier.frame_of_reference_uid == later.frame_of_reference_uid:
        return (0.0, 0.0, 0.0)
    if earlier.volume_centre is not None and later.volume_centre is not None:
        return tuple(b - a for a, b in zip(earlier.volume_centre, later.volume_centre))  # type: ignore[return-value]
    return (0.0, 0.0, 0.0)


def match_tolerance_mm(a: LesionObservation, b: LesionObservation, *, minimum: float = MIN_TOLERANCE_MM,
                       factor: float = TOLERANCE_FACTOR) -> float:
    """How far apart two centres may be and still be one lesion: ``max(minimum, factor × larger size)``."""
    sizes = [s for s in (a.size_mm, b.size_mm) if s is not None]
    return max(minimum, factor * max(sizes)) if sizes else minimum


def track_lesions(timepoints: Sequence[Timepoint], *, minimum_mm: float = MIN_TOLERANCE_MM,
                  factor: float = TOLERANCE_FACTOR) -> list[list[TrackedLesion]]:
    """Lesion tracks over ``timepoints`` (already in date order), as one list per time point.

    Rules (see the module docstring): same Tracking Unique Identifier first, then nearest aligned centres
    within :func:`match_tolerance_mm`, one to one, nearest first. Only region groups take part (TID 1501
    whole-image groups do not). Tracks are labelled "Lesion 1", "Lesion 2"… in order of first appearance,
    larger first within a time point. A track's ``lesion_uid`` is the Tracking Unique Identifier of its first
    observation (derived from the study when that has none): it names the lesion at every time point.
    """
    tracks: list[dict] = []  # {"uids": set, "last": observation, "last_index": int, "label": str, "id": str}
    result: list[list[TrackedLesion]] = []
    for index, tp in enumerate(timepoints):
        observations = [o for o in tp.lesions if o.region]
        pairs: dict[int, tuple[int, str, float | None]] = {}  # observation index → (track, how, distance)
        taken: set[int] = set()
        for oi, obs in enumerate(observations):  # 1. the same tracking UID
            if not obs.tracking_uid:
                continue
            for ti, track in enumerate(tracks):
                if ti not in taken and obs.tracking_uid in track["uids"]:
                    pairs[oi] = (ti, "tracking_uid", None)
                    taken.add(ti)
                    break
        candidates = []  # 2. nearest aligned centres within the tolerance
        for oi, obs in enumerate(observations):
            if oi in pairs or obs.centroid is None:
                continue
            for ti, track in enumerate(tracks):
                last = track["last"]
                if ti in taken or last.centroid is None:
                    continue
                shift = alignment_offset(last, obs)
                distance = math.dist(obs.centroid, tuple(c + s for c, s in zip(last.centroid, shift)))
                if distance <= match_tolerance_mm(last, obs, minimum=minimum_mm, factor=factor):
                    candidates.append((distance, oi, ti))
        for distance, oi, ti in sorted(candidates):
            if oi not in pairs and ti not in taken:
                pairs[oi] = (ti, "centroid", distance)
                taken.add(ti)
        current: list[TrackedLesion] = []
        for ti, track in enumerate(tracks):
            seen_before = track["last_index"] == index - 1
            matched = [(oi, how, d) for oi, (t, how, d) in pairs.items() if t == ti]
            if matched:
                oi, how, distance = matched[0]
                current.append(TrackedLesion(ti, track["label"], "persisting" if seen_before else "new",
                                             observations[oi], track["last"] if seen_before else None,
                                             track["last"], how, distance, reappeared=not seen_before,
                                             lesion_uid=track["id"]))
            else:
                current.append(TrackedLesion(ti, track["label"], "disappeared", None,
                                             track["last"] if seen_before else None, track["last"],
                                             lesion_uid=track["id"]))
        fresh = sorted((oi for oi in range(len(observations)) if oi not in pairs),
                       key=lambda oi: (-(observations[oi].volume_ml or 0.0), -(observations[oi].size_mm or 0.0), oi))
        for oi in fresh:
            obs = observations[oi]
            ti = len(tracks)
            tracks.append({"uids": set(), "last": obs, "last_index": index, "label": f"Lesion {ti + 1}",
                           "id": obs.tracking_uid or _uid_from(tp.study_instance_uid, str(oi + 1))})
            current.append(TrackedLesion(ti, tracks[ti]["label"], "new", obs, lesion_uid=tracks[ti]["id"]))
        for tracked in current:  # the tracks' state after this time point
            if tracked.observation is not None:
                track = tracks[tracked.track]
                track["last"], track["last_index"] = tracked.observation, index
                if tracked.observation.tracking_uid:
                    track["uids"].add(tracked.observation.tracking_uid)
        result.append(sorted(current, key=lambda t: t.track))
    return result


def _uid_from(*parts: str) -> str:
    """A UID (2.25 form) derived from ``parts``: the same parts give the same UID."""
    import uuid

    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, '/'.join(parts)).int}"


# --- response --------------------------------------------------------------------------------------------------


def _percent(new: float | None, old: float | None) -> float | None:
    if new is None or old is None or old == 0:
        return None
    return round(100.0 * (new - old) / old, 1)


def _sld(tracked: Sequence[TrackedLesion], targets: Sequence[int]) -> float | None:
    by_track = {t.track: t for t in tracked}
    total = 0.0
    for track in targets:
        t = by_track.get(track)
        if t is None:
            return None
        if t.status == "disappeared":
            continue
        diameter = t.observation.longest_diameter_mm if t.observation else None
        if diameter is None:
            return None
        total += diameter
    return round(total, 2)


def target_tracks(tracked: Sequence[Sequence[TrackedLesion]]) -> list[int]:
    """Up to :data:`MAX_TARGETS` lesions of the baseline with a longest diameter ≥ :data:`MEASURABLE_MM`."""
    if not tracked:
        return []
    measurable = [(t.observation.longest_diameter_mm, t.track) for t in tracked[0]
                  if t.observation is not None and t.observation.is_lesion
                  and (t.observation.longest_diameter_mm or 0.0) >= MEASURABLE_MM]
    return [track for _, track in sorted(measurable, key=lambda x: (-x[0], x[1]))[:MAX_TARGETS]]


def assess_response(tracked: Sequence[Sequence[TrackedLesion]], index: int) -> dict:
    """The response category at time point ``index`` against the baseline and the nadir (:data:`RESPONSE_RULES`)."""
    targets = target_tracks(tracked)
    sums = [_sld(tracked[i], targets) if targets else None for i in range(index + 1)]
    current = tracked[index]
    labels = {t.track: t.label for t in current}
    out: dict[str, Any] = {
        "category": None, "name": None, "reasons": [], "target_lesions": [labels[t] for t in targets],
        "new_lesions": [], "sum_of_longest_diameters_mm": sums[index],
        "baseline_sum_mm": sums[0], "previous_sum_mm": sums[index - 1] if index else None,
        "nadir_sum_mm": None, "change_from_baseline_percent": None, "change_from_nadir_percent": None,
        "change_from_nadir_mm": None, "change_from_previous_percent": None, "status": CONFIRMATION,
    }
    if index == 0:
        out.update(category="baseline", name=RESPONSE_NAMES["baseline"],
                   reasons=[f"{len(targets)} target lesion(s), SLD {_mm(sums[0])}" if targets
                            else "no measurable lesion (≥ 10 mm)"])
        return _with_text(out)
    earlier = [s for s in sums[:index] if s is not None]
    nadir = min(earlier) if earlier else None
    sld = sums[index]
    out.update(nadir_sum_mm=nadir, change_from_baseline_percent=_percent(sld, sums[0]),
               change_from_nadir_percent=_percent(sld, nadir),
               change_from_nadir_mm=round(sld - nadir, 2) if sld is not None and nadir is not None else None,
               change_from_previous_percent=_percent(sld, sums[index - 1]))
    lesions = [t for t in current if (t.observation or t.last_seen) is not None
               and (t.observation or t.last_seen).is_lesion]
    new = [t.label for t in lesions if t.status == "new"]
    out["new_lesions"] = new
    if new:
        reappeared = [t.label for t in lesions if t.status == "new" and t.reappeared]
        out["reasons"].append(f"new lesion(s): {', '.join(new)}"
                              + (f" (seen again after disappearing: {', '.join(reappeared)})" if reappeared else ""))
    if sld is not None and nadir is not None and sld - nadir >= 5.0 and sld - nadir >= 0.2 * nadir:
        out["reasons"].append(f"SLD {_mm(sld)} is {_mm(sld - nadir)} "
                              f"({_percent(sld, nadir) if nadir else '∞'} %) above the nadir {_mm(nadir)}")
    if out["reasons"]:
        out.update(category="PD")
    elif lesions and all(t.status == "disappeared" for t in lesions):
        out.update(category="CR", reasons=["every lesion seen before has disappeared; no new lesion"])
    elif not targets:
        out.update(category="NE", reasons=["no measurable target lesion (≥ 10 mm) at baseline"])
    elif sld is None:
        out.update(category="NE", reasons=["a target lesion has no diameter at this time point"])
    elif sums[0] and sld <= 0.7 * sums[0]:
        out.update(category="PR", reasons=[f"SLD {_mm(sld)} is {abs(_percent(sld, sums[0]) or 0)} % below "
                                           f"the baseline {_mm(sums[0])}"])
    else:
        out.update(category="SD", reasons=[f"SLD {_mm(sld)} against baseline {_mm(sums[0])} and nadir "
                                           f"{_mm(nadir)}: neither 30 % smaller nor 20 % and 5 mm larger"])
    out["name"] = RESPONSE_NAMES[out["category"]]
    return _with_text(out)


def _mm(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} mm"


def _with_text(out: dict) -> dict:
    name = out["name"] if out["category"] == "baseline" else f"{out['name']} ({out['category']})"
    out["text"] = f"{name}: {'; '.join(out['reasons'])}; {CONFIRMATION}"
    return out


def lesion_change_status(prior: LesionObservation | None, current: LesionObservation | None) -> str:
    """The PDF report's per-lesion status: new, resolved, increased (≥ 20 % longest diameter, or ≥ 73 % volume
    without a diameter), decreased (≤ −30 %, or ≤ −66 % volume) or stable."""
    if prior is None:
        return "new"
    if current is None:
        return "resolved"
    change = _percent(current.longest_diameter_mm, prior.longest_diameter_mm)
    up, down = 20.0, -30.0
    if change is None:
        change, up, down = _percent(current.volume_ml, prior.volume_ml), 72.8, -65.7  # 1.2³ and 0.7³
    if change is None:
        return "stable"
    return "increased" if change >= up else "decreased" if change <= down else "stable"


def comparison(timepoints: Sequence[Timepoint], study_instance_uid: str) -> dict:
    """Per-lesion comparison of a study with the patient's previous study, and the response at that study.

    Later studies are left out, so a report written today reads the same after more studies arrive.
    """
    ordered = sorted(timepoints, key=lambda tp: tp.sort_key)
    index = next(i for i, tp in enumerate(ordered) if tp.study_instance_uid == study_instance_uid)
    ordered = ordered[:index + 1]
    tracked = track_lesions(ordered)
    items = []
    for t in tracked[index]:
        prior = t.previous
        if t.observation is None and prior is None:
            continue  # gone before the previous study
        current = t.observation
        items.append({
            "tracking_id": current.tracking_id if current is not None and current.tracking_id
            else f"prior {prior.tracking_id or t.label}" if prior is not None else t.label,
            "label": t.label, "tracking_uid": t.lesion_uid,
            "current_tracking_uid": current.tracking_uid if current else None,
            "prior_tracking_uid": prior.tracking_uid if prior else None,
            "prior_volume_ml": _round(prior.volume_ml if prior else None, 3),
            "current_volume_ml": _round(current.volume_ml if current else None, 3),
            "change_percent": _percent(current.volume_ml if current else 0.0, prior.volume_ml if prior else None),
            "prior_longest_diameter_mm": _round(prior.longest_diameter_mm if prior else None, 2),
            "current_longest_diameter_mm": _round(current.longest_diameter_mm if current else None, 2),
            "diameter_change_percent": _percent(current.longest_diameter_mm if current else 0.0,
                                                prior.longest_diameter_mm if prior else None),
            "status": lesion_change_status(prior, current), "track_status": t.status,
            "matched_by": t.matched_by,
        })
    response = assess_response(tracked, index)
    previous = ordered[index - 1] if index else None
    return {
        "study_instance_uid": study_instance_uid, "date": ordered[index].iso_date,
        "prior": {"study_instance_uid": previous.study_instance_uid, "date": previous.iso_date} if previous else None,
        "comparison": items if previous else [],
        "sum_of_longest_diameters": {"prior_mm": response["previous_sum_mm"],
                                     "current_mm": response["sum_of_longest_diameters_mm"],
                                     "change_percent": response["change_from_previous_percent"]},
        "response": response, "rules": list(RESPONSE_RULES),
    }


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


# --- store -------------------------------------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class FollowUpStore:
    """Patients, studies, reports (SR documents), lesions (measurement groups) and measurements, in SQLite (WAL).

    Thread-safe: one connection behind a lock. The store can be rebuilt from Orthanc at any time (delete
    the file: the reconcile ingests every SR again).
    """

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        self._lock = threading.RLock()
        conn = sqlite3.connect(self.path, check_same_thread=False, timeout=30, isolation_level=None)
        self.db = sqlite_utils.Database(conn)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    def _migrate(self) -> None:
        with self._lock:
            names = set(self.db.table_names())
            if "patients" not in names:
                self.db["patients"].create({"patient_id": str, "patient_name": str, "birth_date": str, "sex": str,
                                            "updated_at": str}, pk="patient_id")
            if "studies" not in names:
                self.db["studies"].create({"study_instance_uid": str, "patient_id": str, "orthanc_study_id": str,
                                           "study_date": str, "study_time": str, "accession_number": str,
                                           "study_description": str, "updated_at": str},
                                          pk="study_instance_uid", foreign_keys=[("patient_id", "patients")])
                self.db["studies"].create_index(["patient_id"])
            if "reports" not in names:
                self.db["reports"].create({
                    "sop_instance_uid": str, "study_instance_uid": str, "series_instance_uid": str,
                    "orthanc_instance_id": str, "orthanc_series_id": str, "orthanc_study_id": str,
                    "sop_class_uid": str, "manufacturer": str, "model_name": str, "content_date": str,
                    "content_time": str, "source_series_uid": str, "frame_of_reference_uid": str,
                    "volume_centre": str, "states_absence": int, "notes": str, "ingested_at": str},
                    pk="sop_instance_uid", foreign_keys=[("study_instance_uid", "studies")])
                self.db["reports"].create_index(["study_instance_uid"])
                self.db["reports"].create_index(["orthanc_instance_id"])
            if "lesions" not in names:
                self.db["lesions"].create({
                    "id": int, "sop_instance_uid": str, "study_instance_uid": str, "group_number": int,
                    "tracking_uid": str, "tracking_id": str, "template": str, "region": int,
                    "finding": str, "finding_site": str, "finding_category": str,
                    "centroid_x": float, "centroid_y": float, "centroid_z": float, "centroid_source": str,
                    "frame_of_reference_uid": str, "referenced_segment": str},
                    pk="id", foreign_keys=[("sop_instance_uid", "reports")])
                self.db["lesions"].create_index(["sop_instance_uid"])
                self.db["lesions"].create_index(["study_instance_uid"])
            if "measurements" not in names:
                self.db["measurements"].create({
                    "id": int, "lesion_id": int, "concept_value": str, "concept_scheme": str,
                    "concept_meaning": str, "derivation": str, "value": float, "unit": str, "quantity": str,
                    "canonical_value": float}, pk="id", foreign_keys=[("lesion_id", "lesions")])
                self.db["measurements"].create_index(["lesion_id"])
            if "skipped" not in names:
                self.db["skipped"].create({"orthanc_instance_id": str, "sop_instance_uid": str,
                                           "study_instance_uid": str, "reason": str, "at": str},
                                          pk="orthanc_instance_id")
            if "prior_requests" not in names:
                self.db["prior_requests"].create({"study_instance_uid": str, "for_study_instance_uid": str,
                                                  "patient_id": str, "jobs": str, "at": str},
                                                 pk="study_instance_uid")
            if "stale_comparisons" not in names:  # reports written while a prior was still being measured
                self.db["stale_comparisons"].create({"study_instance_uid": str, "patient_id": str, "at": str},
                                                    pk="study_instance_uid")
            if "series_geometry" not in names:
                self.db["series_geometry"].create({"series_instance_uid": str, "frame_of_reference_uid": str,
                                                   "volume_centre": str, "at": str}, pk="series_instance_uid")

    def _transaction(self):
        store = self

        class _Tx:
            def __enter__(self):
                store._lock.acquire()
                store.db.execute("BEGIN IMMEDIATE")

            def __exit__(self, kind, exc, tb):
                try:
                    store.db.execute("ROLLBACK" if kind else "COMMIT")
                finally:
                    store._lock.release()
                return False

        return _Tx()

    # -- writing -----------------------------------------------------------------------------------------------
    def put_report(self, report: MeasurementReport, *, orthanc_instance_id: str = "", orthanc_series_id: str = "",
                   orthanc_study_id: str = "", source_series_uid: str | None = None,
                   frame_of_reference_uid: str | None = None,
                   volume_centre: tuple[float, float, float] | None = None) -> None:
        """Insert or replace one report (keyed by SOP Instance UID) with its lesions and measurements."""
        now = _now()
        ex = self.db.execute
        with self._transaction():
            self._delete_reports(["?"], [report.sop_instance_uid], "sop_instance_uid")
            ex("insert into patients (patient_id, patient_name, birth_date, sex, updated_at) values (?, ?, ?, ?, ?) "
               "on conflict(patient_id) do update set patient_name = excluded.patient_name, "
               "birth_date = excluded.birth_date, sex = excluded.sex, updated_at = excluded.updated_at",
               [report.patient_id, report.patient_name, report.patient_birth_date, report.patient_sex, now])
            ex("insert into studies (study_instance_uid, patient_id, orthanc_study_id, study_date, study_time, "
               "accession_number, study_description, updated_at) values (?, ?, ?, ?, ?, ?, ?, ?) "
               "on conflict(study_instance_uid) do update set patient_id = excluded.patient_id, "
               "orthanc_study_id = coalesce(nullif(excluded.orthanc_study_id, ''), studies.orthanc_study_id), "
               "study_date = excluded.study_date, study_time = excluded.study_time, "
               "accession_number = excluded.accession_number, study_description = excluded.study_description, "
               "updated_at = excluded.updated_at",
               [report.study_instance_uid, report.patient_id, orthanc_study_id, report.study_date,
                report.study_time, report.accession_number, report.study_description, now])
            ex("insert into reports (sop_instance_uid, study_instance_uid, series_instance_uid, orthanc_instance_id, "
               "orthanc_series_id, orthanc_study_id, sop_class_uid, manufacturer, model_name, content_date, "
               "content_time, source_series_uid, frame_of_reference_uid, volume_centre, states_absence, notes, "
               "ingested_at) values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
               [report.sop_instance_uid, report.study_instance_uid, report.series_instance_uid, orthanc_instance_id,
                orthanc_series_id, orthanc_study_id, report.sop_class_uid, report.manufacturer, report.model_name,
                report.content_date, report.content_time, source_series_uid or "", frame_of_reference_uid or "",
                json.dumps(list(volume_centre)) if volume_centre else "", int(report.states_absence),
                json.dumps(report.notes), now])
            for number, lesion in enumerate(report.lesions, start=1):
                centroid = lesion.centroid or (None, None, None)
                cursor = ex(
                    "insert into lesions (sop_instance_uid, study_instance_uid, group_number, tracking_uid, "
                    "tracking_id, template, region, finding, finding_site, finding_category, centroid_x, centroid_y, "
                    "centroid_z, centroid_source, frame_of_reference_uid, referenced_segment) "
                    "values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [report.sop_instance_uid, report.study_instance_uid, number, lesion.tracking_uid or "",
                     lesion.tracking_id or "", lesion.template or "", int(lesion.region), _dump(lesion.finding),
                     _dump(lesion.finding_site), _dump(lesion.finding_category), *centroid,
                     lesion.centroid_source or "", lesion.frame_of_reference_uid or frame_of_reference_uid or "",
                     _dump(lesion.referenced_segment)])
                lesion_id = cursor.lastrowid
                self.db.conn.executemany(
                    "insert into measurements (lesion_id, concept_value, concept_scheme, concept_meaning, derivation, "
                    "value, unit, quantity, canonical_value) values (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [(lesion_id, *m.concept, m.derivation, m.value, m.unit, m.quantity, m.canonical_value)
                     for m in lesion.measurements])
            if orthanc_instance_id:
                ex("delete from skipped where orthanc_instance_id = ?", [orthanc_instance_id])

    def record_skip(self, orthanc_instance_id: str, reason: str, *, sop_instance_uid: str = "",
                    study_instance_uid: str = "") -> None:
        with self._lock:
            self.db.execute("insert or replace into skipped values (?, ?, ?, ?, ?)",
                            [orthanc_instance_id, sop_instance_uid, study_instance_uid, reason[:2000], _now()])

    def _delete_reports(self, placeholders: list[str], values: list[str], column: str) -> int:
        """Delete reports where ``column`` is one of ``values`` (inside a transaction), then orphans."""
        ex = self.db.execute
        where = f"{column} in ({', '.join(placeholders)})"
        doomed = [r[0] for r in ex(f"select sop_instance_uid from reports where {where}", values).fetchall()]
        if not doomed:
            return 0
        marks = ", ".join("?" * len(doomed))
        ex(f"delete from measurements where lesion_id in (select id from lesions where sop_instance_uid in ({marks}))",
           doomed)
        ex(f"delete from lesions where sop_instance_uid in ({marks})", doomed)
        ex(f"delete from reports where sop_instance_uid in ({marks})", doomed)
        ex("delete from studies where study_instance_uid not in (select study_instance_uid from reports)")
        ex("delete from patients where patient_id not in (select patient_id from studies)")
        return len(doomed)

    def forget(self, orthanc_id: str) -> int:
        """Remove what came from an Orthanc instance, series or study (whichever ``orthanc_id`` names)."""
        with self._transaction():
            removed = 0
            for column in ("orthanc_instance_id", "orthanc_series_id", "orthanc_study_id"):
                removed += self._delete_reports(["?"], [orthanc_id], column)
            self.db.execute("delete from skipped where orthanc_instance_id = ?", [orthanc_id])
            return removed

    def remove_report(self, sop_instance_uid: str) -> int:
        with self._transaction():
            return self._delete_reports(["?"], [sop_instance_uid], "sop_instance_uid")

    def record_prior_request(self, study_uid: str, for_study_uid: str, patient_id: str, jobs: list[str]) -> None:
        with self._lock:
            self.db.execute("insert or replace into prior_requests values (?, ?, ?, ?, ?)",
                            [study_uid, for_study_uid, patient_id, json.dumps(jobs), _now()])

    def mark_stale_comparison(self, study_uid: str, patient_id: str) -> None:
        with self._lock:
            self.db.execute("insert or replace into stale_comparisons values (?, ?, ?)", [study_uid, patient_id, _now()])

    def stale_comparisons(self, patient_id: str) -> list[str]:
        with self._lock:
            return [r[0] for r in self.db.execute("select study_instance_uid from stale_comparisons where "
                                                  "patient_id = ? order by at", [patient_id]).fetchall()]

    def clear_stale_comparison(self, study_uid: str) -> None:
        with self._lock:
            self.db.execute("delete from stale_comparisons where study_instance_uid = ?", [study_uid])

    def put_series_geometry(self, series_uid: str, frame_of_reference_uid: str | None,
                            centre: tuple[float, float, float] | None) -> None:
        with self._lock:
            self.db.execute("insert or replace into series_geometry values (?, ?, ?, ?)",
                            [series_uid, frame_of_reference_uid or "", json.dumps(list(centre)) if centre else "",
                             _now()])

    # -- reading -----------------------------------------------------------------------------------------------
    def series_geometry(self, series_uid: str) -> tuple[str | None, tuple[float, float, float] | None] | None:
        with self._lock:
            row = self.db.execute("select frame_of_reference_uid, volume_centre from series_geometry "
                                  "where series_instance_uid = ?", [series_uid]).fetchone()
        if row is None:
            return None
        return (row[0] or None, tuple(json.loads(row[1])) if row[1] else None)

    def known_instances(self) -> dict[str, str]:
        """Orthanc instance id → 'report' or 'skipped', for everything already looked at."""
        with self._lock:
            out = {r[0]: "report" for r in self.db.execute(
                "select orthanc_instance_id from reports where orthanc_instance_id != ''").fetchall()}
            out.update({r[0]: "skipped" for r in self.db.execute("select orthanc_instance_id from skipped").fetchall()})
        return out

    def skipped(self, limit: int = 100) -> list[dict]:
        with self._lock:
            return [dict(r) for r in self.db["skipped"].rows_where(order_by="at desc", limit=limit)]

    def report_ids(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self.db.execute("select sop_instance_uid from reports").fetchall()]

    def has_measurements(self, study_uid: str) -> bool:
        with self._lock:
            return self.db.execute("select 1 from reports where study_instance_uid = ? limit 1",
                                   [study_uid]).fetchone() is not None

    def prior_requested(self, study_uid: str) -> bool:
        with self._lock:
            return self.db.execute("select 1 from prior_requests where study_instance_uid = ?",
                                   [study_uid]).fetchone() is not None

    def pending_priors(self, patient_id: str) -> list[str]:
        """Studies queued as priors for this patient whose measurements have not arrived yet."""
        with self._lock:
            return [r[0] for r in self.db.execute(
                "select study_instance_uid from prior_requests where patient_id = ? and study_instance_uid not in "
                "(select study_instance_uid from reports) order by at", [patient_id]).fetchall()]

    def patient(self, patient_id: str) -> dict | None:
        with self._lock:
            row = self.db.execute("select patient_id, patient_name, birth_date, sex from patients "
                                  "where patient_id = ?", [patient_id]).fetchone()
        return dict(zip(("patient_id", "patient_name", "birth_date", "sex"), row)) if row else None

    def study_patient(self, study_uid: str) -> str | None:
        with self._lock:
            row = self.db.execute("select patient_id from studies where study_instance_uid = ?", [study_uid]).fetchone()
        return row[0] if row else None

    def patients(self, query: str = "", *, limit: int = 50, offset: int = 0) -> tuple[int, list[dict]]:
        """Patients whose ID or name contains ``query`` (case-insensitive), with study and lesion counts."""
        where, params = "", []
        if query:
            where = "where p.patient_id like ? escape '\\' or p.patient_name like ? escape '\\'"
            pattern = "%" + query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            params = [pattern, pattern]
        with self._lock:
            (total,) = self.db.execute(f"select count(*) from patients p {where}", params).fetchone()
            rows = self.db.execute(
                "select p.patient_id, p.patient_name, p.birth_date, p.sex, "
                "(select count(*) from studies s where s.patient_id = p.patient_id), "
                "(select max(s.study_date) from studies s where s.patient_id = p.patient_id), "
                "(select min(s.study_date) from studies s where s.patient_id = p.patient_id) "
                f"from patients p {where} order by p.patient_id limit ? offset ?", [*params, limit, offset]).fetchall()
        keys = ("patient_id", "patient_name", "birth_date", "sex", "study_count", "last_study_date",
                "first_study_date")
        return int(total), [dict(zip(keys, r)) for r in rows]

    def timepoints(self, patient_id: str) -> list[Timepoint]:
        """Every study of the patient with its lesions, in date order."""
        with self._lock:
            studies = self.db.execute(
                "select study_instance_uid, study_date, study_time, accession_number, study_description "
                "from studies where patient_id = ?", [patient_id]).fetchall()
            reports = self.db.execute(
                "select r.sop_instance_uid, r.study_instance_uid, r.frame_of_reference_uid, r.volume_centre "
                "from reports r join studies s using (study_instance_uid) where s.patient_id = ? "
                "order by r.content_date, r.content_time, r.ingested_at", [patient_id]).fetchall()
            lesions = self.db.execute(
                "select l.id, l.sop_instance_uid, l.study_instance_uid, l.tracking_uid, l.tracking_id, l.template, "
                "l.region, l.finding, l.finding_site, l.finding_category, l.centroid_x, l.centroid_y, l.centroid_z, "
                "l.centroid_source, l.frame_of_reference_uid, l.referenced_segment from lesions l "
                "join studies s using (study_instance_uid) where s.patient_id = ? order by l.id",
                [patient_id]).fetchall()
            measurements = self.db.execute(
                "select m.lesion_id, m.concept_value, m.concept_scheme, m.concept_meaning, m.derivation, m.value, "
                "m.unit, m.quantity, m.canonical_value from measurements m join lesions l on l.id = m.lesion_id "
                "join studies s on s.study_instance_uid = l.study_instance_uid where s.patient_id = ? order by m.id",
                [patient_id]).fetchall()
        by_lesion: dict[int, list[Measurement]] = {}
        for row in measurements:
            by_lesion.setdefault(row[0], []).append(Measurement((row[1], row[2], row[3]), row[4], row[5], row[6],
                                                                row[7], row[8]))
        report_info = {r[0]: (r[2] or None, tuple(json.loads(r[3])) if r[3] else None) for r in reports}
        timepoints = {s[0]: Timepoint(s[0], s[1] or "", s[2] or "", s[3] or "", s[4] or "") for s in studies}
        for r in reports:
            timepoints[r[1]].reports.append(r[0])
        seen: dict[tuple[str, str], LesionObservation] = {}
        for row in lesions:
            for_, centre = report_info.get(row[1], (None, None))
            lesion = LesionObservation(
                tracking_uid=row[3] or None, tracking_id=row[4] or None, template=row[5] or None, region=bool(row[6]),
                finding=_load(row[7]), finding_site=_load(row[8]), finding_category=_load(row[9]),
                centroid=(row[10], row[11], row[12]) if row[10] is not None else None, centroid_source=row[13] or None,
                frame_of_reference_uid=row[14] or for_, referenced_segment=_load(row[15]),
                measurements=by_lesion.get(row[0], []), sop_instance_uid=row[1], volume_centre=centre)
            key = (row[2], lesion.tracking_uid or f"#{row[0]}")
            if key in seen:  # one lesion in two reports of a study (same tracking UID): the last ingested wins
                timepoints[row[2]].lesions.remove(seen[key])
            seen[key] = lesion
            timepoints[row[2]].lesions.append(lesion)
        return sorted(timepoints.values(), key=lambda tp: tp.sort_key)

    def close(self) -> None:
        with self._lock:
            self.db.conn.close()


def _dump(value: Any) -> str:
    return json.dumps(list(value)) if value else ""


def _load(text: str | None) -> Any:
    return tuple(json.loads(text)) if text else None


# --- views (what the routes answer) ------------------------------------------------------------------------------


def _code_json(code: tuple[str, str, str] | None) -> dict | None:
    return {"code": code[0], "scheme": code[1], "meaning": code[2]} if code else None


def lesion_json(t: TrackedLesion) -> dict:
    """One lesion at one time point, as the follow-up panel reads it."""
    obs = t.observation
    ref = obs or t.last_seen
    mean, mean_unit = obs.mean_intensity if obs else (None, None)
    previous = t.previous
    out = {
        "tracking_uid": t.lesion_uid, "label": t.label, "status": t.status,
        "sr_tracking_uid": obs.tracking_uid if obs else None, "tracking_id": ref.tracking_id if ref else None,
        "volume_ml": _round(obs.volume_ml, 4) if obs else None,
        "longest_diameter_mm": _round(obs.longest_diameter_mm, 2) if obs else None,
        "short_axis_mm": _round(obs.short_axis_mm, 2) if obs else None,
        "max_3d_diameter_mm": _round(obs.max_3d_diameter_mm, 2) if obs else None,
        "mean_intensity": _round(mean, 3), "mean_intensity_unit": mean_unit,
        "volume_change_percent": _percent(obs.volume_ml if obs else 0.0, previous.volume_ml if previous else None),
        "diameter_change_percent": _percent(obs.longest_diameter_mm if obs else 0.0,
                                            previous.longest_diameter_mm if previous else None),
        "centroid_mm": [round(v, 2) for v in obs.centroid] if obs and obs.centroid else None,
        "frame_of_reference_uid": obs.frame_of_reference_uid if obs else None,
        "finding": _code_json(ref.finding) if ref else None,
        "finding_site": _code_json(ref.finding_site) if ref else None,
        "is_lesion": ref.is_lesion if ref else True,
        "matched_by": t.matched_by, "match_distance_mm": _round(t.distance_mm, 2), "reappeared": t.reappeared,
        "sr_sop_instance_uid": obs.sop_instance_uid if obs else None,
        "referenced_segment": {"sop_instance_uid": obs.referenced_segment[0],
                               "segment_number": obs.referenced_segment[1]} if obs and obs.referenced_segment else None,
        "measurements": [m.to_json() for m in obs.measurements] if obs else [],
    }
    return out


def lesions_view(patient_id: str, timepoints: Sequence[Timepoint]) -> dict:
    tracked = track_lesions(timepoints)
    return {
        "patient_id": patient_id,
        "timepoints": [{
            "study_instance_uid": tp.study_instance_uid, "date": tp.iso_date, "time": tp.time or None,
            "accession_number": tp.accession_number or None, "study_description": tp.study_description or None,
            "reports": tp.reports, "lesions": [lesion_json(t) for t in tracked[i]],
            "response": assess_response(tracked, i),
        } for i, tp in enumerate(timepoints)],
        "rules": {"matching": MATCHING_RULE, "response": list(RESPONSE_RULES)},
    }


MATCHING_RULE = (
    "Same Tracking Unique Identifier; otherwise nearest centres in patient coordinates within max(10 mm, 1 x the "
    "larger longest diameter), on the same Frame of Reference or after aligning the centres of the two imaged "
    "volumes; one to one, nearest first.")

CSV_COLUMNS = ("patient_id", "study_instance_uid", "study_date", "accession_number", "label", "status",
               "tracking_uid", "sr_tracking_uid", "tracking_id", "finding", "finding_site", "volume_ml", "longest_diameter_mm",
               "short_axis_mm", "max_3d_diameter_mm", "mean_intensity", "mean_intensity_unit",
               "volume_change_percent", "centroid_x_mm", "centroid_y_mm", "centroid_z_mm", "matched_by",
               "sr_sop_instance_uid", "response", "sum_of_longest_diameters_mm")


def _cell(value: Any) -> Any:
    """A CSV cell; text starting like a spreadsheet formula is quoted so that it stays text."""
    if value is None:
        return ""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def lesions_csv(view: dict) -> bytes:
    """One row per lesion per time point (UTF-8, RFC 4180 line ends)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for tp in view["timepoints"]:
        for lesion in tp["lesions"]:
            centroid = lesion["centroid_mm"] or [None, None, None]
            row = (view["patient_id"], tp["study_instance_uid"], tp["date"], tp["accession_number"], lesion["label"],
                   lesion["status"], lesion["tracking_uid"], lesion["sr_tracking_uid"], lesion["tracking_id"],
                   (lesion["finding"] or {}).get("meaning"), (lesion["finding_site"] or {}).get("meaning"),
                   lesion["volume_ml"], lesion["longest_diameter_mm"], lesion["short_axis_mm"],
                   lesion["max_3d_diameter_mm"], lesion["mean_intensity"], lesion["mean_intensity_unit"],
                   lesion["volume_change_percent"], *centroid, lesion["matched_by"], lesion["sr_sop_instance_uid"],
                   tp["response"]["category"], tp["response"]["sum_of_longest_diameters_mm"])
            writer.writerow([_cell(v) for v in row])
    return out.getvalue().encode("utf-8")


def report_view(patient: dict, view: dict, pending_priors: list[str]) -> dict:
    """The patient's follow-up in short: per time point the counts, SLD and response; the latest response."""
    rows = []
    for tp in view["timepoints"]:
        lesions = tp["lesions"]
        rows.append({"study_instance_uid": tp["study_instance_uid"], "date": tp["date"],
                     "accession_number": tp["accession_number"],
                     "lesions": sum(1 for l in lesions if l["status"] != "disappeared"),
                     "new": [l["label"] for l in lesions if l["status"] == "new"],
                     "disappeared": [l["label"] for l in lesions if l["status"] == "disappeared"],
                     "total_volume_ml": round(sum(l["volume_ml"] or 0.0 for l in lesions if l["is_lesion"]), 4),
                     "sum_of_longest_diameters_mm": tp["response"]["sum_of_longest_diameters_mm"],
                     "response": tp["response"]})
    return {"patient": patient, "timepoints": rows, "current_response": rows[-1]["response"] if rows else None,
            "pending_priors": pending_priors, "rules": view["rules"], "status": CONFIRMATION}


# --- the service inside Orthanc -------------------------------------------------------------------------------


class Rest(Protocol):
    """The part of Orthanc's REST API the follow-up uses (a fake one serves the unit tests)."""

    def get_json(self, uri: str) -> Any: ...

    def get_bytes(self, uri: str) -> bytes: ...

    def post(self, uri: str, body: str) -> Any: ...


class PluginRest:
    """:class:`Rest` through the plugin SDK (``orthanc.RestApiGet``/``RestApiPost``), from our own thread."""

    def __init__(self, orthanc_module: Any) -> None:
        self._orthanc = orthanc_module

    def get_json(self, uri: str) -> Any:
        return json.loads(self._orthanc.RestApiGet(uri))

    def get_bytes(self, uri: str) -> bytes:
        data = self._orthanc.RestApiGet(uri)
        return data if isinstance(data, bytes) else bytes(data, "latin-1")

    def post(self, uri: str, body: str) -> Any:
        return json.loads(self._orthanc.RestApiPost(uri, body))


class FollowUp:
    """Ingests SRs, forgets deleted ones and queues unmeasured priors, on one thread fed by Orthanc's changes."""

    def __init__(self, store: FollowUpStore, rest: Rest, *, dispatcher: Any = None, jobs: Any = None,
                 auto_priors: bool = True, reconcile_seconds: float = 600.0) -> None:
        self.store = store
        self.rest = rest
        self.dispatcher = dispatcher  # events.Dispatcher: plan(), study_series(), request_segmentation()
        self.jobs = jobs              # jobs.JobStore: list(study_instance_uid=…)
        self.auto_priors = auto_priors
        self.reconcile_seconds = reconcile_seconds
        self._queue: queue.Queue[tuple | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._planes: dict[str, ImagePlane | None] = {}
        self.change_types: dict[Any, str] = {}
        self.levels: dict[Any, str] = {}

    # -- callback side: enqueue only -------------------------------------------------------------------------
    def use_orthanc_enums(self, orthanc_module: Any) -> "FollowUp":
        """Learn the SDK's change type and resource type values (the SDK is not importable in unit tests)."""
        for name in ("NEW_INSTANCE", "DELETED", "STABLE_STUDY", "ORTHANC_STARTED", "ORTHANC_STOPPED"):
            self.change_types[getattr(orthanc_module.ChangeType, name)] = name
        for name in ("PATIENT", "STUDY", "SERIES", "INSTANCE"):
            self.levels[getattr(orthanc_module.ResourceType, name)] = name
        return self

    def on_change(self, change_type: Any, level: Any, resource_id: str) -> None:
        kind = self.change_types.get(change_type, change_type)
        if kind == "NEW_INSTANCE":
            self._queue.put(("instance", resource_id))
        elif kind == "DELETED":
            self._queue.put(("deleted", self.levels.get(level, level), resource_id))
        elif kind == "STABLE_STUDY":
            if self.auto_priors and self.dispatcher is not None:
                self._queue.put(("stable", resource_id))
        elif kind == "ORTHANC_STARTED":
            self.start()
        elif kind == "ORTHANC_STOPPED":
            self.stop()

    def chain(self, inner: Callable[[Any, Any, str], None]) -> Callable[[Any, Any, str], None]:
        """An on-change callback that calls ``inner`` and then ours (Orthanc takes one change callback)."""
        return chain_changes(inner, self.on_change)

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="ai-followup", daemon=True)
            self._thread.start()
            self._queue.put(("reconcile",))

    def stop(self) -> None:
        self._queue.put(None)

    def drain(self) -> None:
        """Process everything queued, on the calling thread (unit tests)."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                self._handle(item)

    def _run(self) -> None:
        next_reconcile = time.monotonic() + self.reconcile_seconds
        while True:
            try:
                item = self._queue.get(timeout=max(1.0, next_reconcile - time.monotonic()))
            except queue.Empty:
                item = ("reconcile",)
            if item is None:
                return
            if item[0] == "reconcile":
                next_reconcile = time.monotonic() + self.reconcile_seconds
            try:
                self._handle(item)
            except Exception:  # one bad SR or study must not stop the follow-up
                log.exception("follow-up: could not handle %s", item)

    def _handle(self, item: tuple) -> None:
        kind = item[0]
        if kind == "instance":
            self.ingest_instance(item[1])
        elif kind == "deleted":
            self.forget(item[1], item[2])
        elif kind == "stable":
            self.queue_priors(item[1])
        elif kind == "job":
            patient_id = self.store.study_patient(item[1])
            if patient_id:
                self.refresh_comparisons(patient_id)
        elif kind == "reconcile":
            self.reconcile()

    # -- work ---------------------------------------------------------------------------------------------------
    def ingest_instance(self, orthanc_instance_id: str) -> str:
        """Read one new instance; if it is a measurement SR, put it in the store. Returns what happened."""
        try:
            sop_class = self.rest.get_bytes(f"/instances/{orthanc_instance_id}/metadata/SopClassUid").decode().strip()
        except Exception:
            return "gone"
        if sop_class not in MEASUREMENT_SR_CLASSES:
            return "not a measurement SR"
        try:
            ds = pydicom.dcmread(io.BytesIO(self.rest.get_bytes(f"/instances/{orthanc_instance_id}/file")), force=True)
            info = self.rest.get_json(f"/instances/{orthanc_instance_id}")
            orthanc_series_id = info.get("ParentSeries", "")
            orthanc_study_id = self.rest.get_json(f"/series/{orthanc_series_id}").get("ParentStudy", "")
        except Exception as exc:
            log.info("follow-up: instance %s could not be read (%s); deleted since?", orthanc_instance_id, exc)
            return "gone"
        try:
            report = parse_measurement_report(ds)
        except ReportSkipped as exc:
            log.warning("follow-up: SR skipped: %s", exc)
            self.store.record_skip(orthanc_instance_id, str(exc), sop_instance_uid=_text(ds, "SOPInstanceUID"),
                                   study_instance_uid=_text(ds, "StudyInstanceUID"))
            return f"skipped: {exc}"
        except Exception as exc:  # a malformed tree pydicom reads but we cannot walk
            reason = f"SR {_text(ds, 'SOPInstanceUID')} could not be parsed ({type(exc).__name__}: {exc})"
            log.warning("follow-up: SR skipped: %s", reason)
            self.store.record_skip(orthanc_instance_id, reason, sop_instance_uid=_text(ds, "SOPInstanceUID"),
                                   study_instance_uid=_text(ds, "StudyInstanceUID"))
            return f"skipped: {reason}"
        for note in report.notes:
            log.warning("follow-up: SR %s: %s", report.sop_instance_uid, note)
        self._locate(report)
        source, for_, centre = self._source_geometry(report)
        self.store.put_report(report, orthanc_instance_id=orthanc_instance_id, orthanc_series_id=orthanc_series_id,
                              orthanc_study_id=orthanc_study_id, source_series_uid=source,
                              frame_of_reference_uid=for_, volume_centre=centre)
        log.info("follow-up: SR %s of study %s: %d lesion(s)", report.sop_instance_uid,  # no PatientID: PHI
                 report.study_instance_uid, len(report.lesions))
        patient_id = self.store.study_patient(report.study_instance_uid)
        if patient_id:
            self.refresh_comparisons(patient_id)
        return "ingested"

    def _lookup(self, uid: str, level: str) -> str | None:
        try:
            hits = self.rest.post("/tools/lookup", uid)
        except Exception:
            return None
        return next((h["ID"] for h in hits if h.get("Type") == level), None)

    def _plane(self, sop_instance_uid: str) -> ImagePlane | None:
        if sop_instance_uid not in self._planes:
            plane = None
            instance = self._lookup(sop_instance_uid, "Instance")
            if instance:
                try:
                    plane = ImagePlane.from_tags(self.rest.get_json(f"/instances/{instance}/simplified-tags"))
                except Exception:
                    plane = None
            if len(self._planes) > 10_000:
                self._planes.clear()
            self._planes[sop_instance_uid] = plane
        return self._planes[sop_instance_uid]

    def _locate(self, report: MeasurementReport) -> None:
        """Centres of groups that only have 2D image coordinates, from the referenced image's geometry."""
        for lesion in report.lesions:
            if lesion.centroid is None and lesion.image_point is not None:
                sop_uid, _, (column, row) = lesion.image_point
                plane = self._plane(sop_uid)
                if plane is not None:
                    lesion.centroid = plane.to_patient(column, row)
                    lesion.centroid_source = "SCOORD on a referenced image"
                    lesion.frame_of_reference_uid = plane.frame_of_reference_uid

    def _source_geometry(self, report: MeasurementReport) -> tuple[str | None, str | None, tuple | None]:
        """(source series UID, its Frame of Reference, the centre of its imaged volume), cached per series."""
        for series_uid in report.source_series_uids:
            cached = self.store.series_geometry(series_uid)
            if cached is not None:
                return series_uid, cached[0], cached[1]
            series_id = self._lookup(series_uid, "Series")
            if series_id is None:
                continue
            try:
                instances = self.rest.get_json(f"/series/{series_id}")["Instances"]
                step = max(1, len(instances) // 500)  # a big series: a sample of its images is enough
                planes = [p for p in (self._instance_plane(i) for i in instances[::step]) if p is not None]
            except Exception:
                continue
            if not planes:
                continue
            centre = volume_centre(planes)
            self.store.put_series_geometry(series_uid, planes[0].frame_of_reference_uid, centre)
            return series_uid, planes[0].frame_of_reference_uid, centre
        return (report.source_series_uids[0] if report.source_series_uids else None), None, None

    def _instance_plane(self, orthanc_instance_id: str) -> ImagePlane | None:
        try:
            return ImagePlane.from_tags(self.rest.get_json(f"/instances/{orthanc_instance_id}/simplified-tags"))
        except Exception:
            return None

    def forget(self, level: str, orthanc_id: str) -> int:
        """Orthanc deleted a resource: remove the reports that came from it."""
        if level == "PATIENT":  # our rows do not hold Orthanc patient ids: check every report instead
            return self.reconcile(ingest=False)["removed"]
        removed = self.store.forget(orthanc_id)
        if removed:
            log.info("follow-up: %s %s deleted in Orthanc: %d report(s) removed", level.lower(), orthanc_id, removed)
        return removed

    def reconcile(self, *, ingest: bool = True) -> dict:
        """Drop reports whose SR is no longer in Orthanc; ingest SRs that are in Orthanc but not here."""
        removed = 0
        for sop_uid in self.store.report_ids():
            if self._lookup(sop_uid, "Instance") is None:
                removed += self.store.remove_report(sop_uid)
        added = 0
        if ingest:
            known = self.store.known_instances()
            try:
                series = self.rest.post("/tools/find", json.dumps({"Level": "Series", "Query": {"Modality": "SR"},
                                                                   "Expand": True}))
            except Exception:
                log.exception("follow-up: could not list the SR series in Orthanc")
                series = []
            for s in series:
                for instance in s.get("Instances", []):
                    if instance not in known and self.ingest_instance(instance) == "ingested":
                        added += 1
        if removed or added:
            log.warning("follow-up reconciled with Orthanc: %d report(s) removed, %d ingested", removed, added)
        return {"removed": removed, "ingested": added}

    def job_finished(self, job: dict) -> None:
        """A job ended (any final state): a report it left without its prior's comparison may be redone now."""
        if job.get("study_instance_uid"):
            self._queue.put(("job", job["study_instance_uid"]))

    def refresh_comparisons(self, patient_id: str) -> list[str]:
        """Redo the studies whose report was written while one of the patient's priors was still being
        measured (several workers: the prior and the new study ran side by side), once no prior is pending and
        the study itself has no job under way. The new results replace the first ones (same UIDs)."""
        if self.dispatcher is None or not patient_id:
            return []
        stale = self.store.stale_comparisons(patient_id)
        if not stale or self.pending_priors(patient_id):
            return []
        redone = []
        for uid in stale:
            if self.jobs is not None and any(j["state"] in ("pending", "queued", "running")
                                             for j in self.jobs.list(study_instance_uid=uid, limit=50)):
                continue  # its job is still running: asked again when it ends
            self.store.clear_stale_comparison(uid)
            try:
                self.dispatcher.request_segmentation(uid, model_id=None, force=True, user="follow-up")
            except Exception as exc:  # deleted since, or no longer routed: nothing to redo
                log.info("follow-up: study %s not redone: %s", uid, exc)
                continue
            redone.append(uid)
        if redone:
            log.warning("follow-up: %d report(s) written before a prior was measured are being redone with the "
                        "comparison", len(redone))
        return redone

    def queue_priors(self, orthanc_study_id: str) -> list[str]:
        """A study became stable: queue the patient's earlier, unmeasured studies, oldest first."""
        if self.dispatcher is None:
            return []
        try:
            study = self.rest.get_json(f"/studies/{orthanc_study_id}")
        except Exception:
            return []
        tags = study.get("MainDicomTags", {})
        date = tags.get("StudyDate", "")
        if not date or not self._routable(orthanc_study_id):
            return []
        try:
            others = self.rest.get_json(f"/patients/{study['ParentPatient']}/studies")
        except Exception:
            return []
        patient_id = study.get("PatientMainDicomTags", {}).get("PatientID", "")
        # only stable priors: one still arriving (a C-MOVE in progress) is routed when it becomes stable,
        # and queuing it now would create a second job once its last instances land
        earlier = sorted((o for o in others if o["ID"] != orthanc_study_id and o.get("IsStable", True)
                          and (o.get("MainDicomTags", {}).get("StudyDate") or "99999999") < date),
                         key=lambda o: (o["MainDicomTags"].get("StudyDate", ""), o["MainDicomTags"].get("StudyTime", "")))
        queued = []
        for prior in earlier:
            uid = prior["MainDicomTags"].get("StudyInstanceUID", "")
            if not uid or self.store.has_measurements(uid) or self.store.prior_requested(uid) or self._has_jobs(uid):
                continue
            try:
                jobs = self.dispatcher.request_segmentation(uid, model_id=None, force=False, user="follow-up")
            except Exception as exc:  # nothing routes, or done already: nothing to queue
                log.info("follow-up: prior study %s not queued: %s", uid, exc)
                self.store.record_prior_request(uid, tags.get("StudyInstanceUID", ""), patient_id, [])
                continue
            self.store.record_prior_request(uid, tags.get("StudyInstanceUID", ""), patient_id,
                                            [j["id"] for j in jobs])
            queued.append(uid)
        if queued:
            log.warning("follow-up: %d earlier unmeasured stud(y/ies) of the patient queued, oldest first",
                        len(queued))
        return queued

    def _routable(self, orthanc_study_id: str) -> bool:
        try:
            return any(self.dispatcher.plan(s.tags) for s in self.dispatcher.study_series(orthanc_study_id))
        except Exception:
            return False

    def _has_jobs(self, study_uid: str) -> bool:
        if self.jobs is None:
            return False
        return bool(self.jobs.list(study_instance_uid=study_uid, limit=1))

    def pending_priors(self, patient_id: str) -> list[str]:
        """Priors queued for this patient that have no SR yet and a job still to finish."""
        pending = self.store.pending_priors(patient_id)
        if self.jobs is None:
            return pending
        active = ("pending", "queued", "running")
        return [uid for uid in pending
                if any(j["state"] in active for j in self.jobs.list(study_instance_uid=uid, limit=20))]

    # -- views ----------------------------------------------------------------------------------------------------
    def lesions(self, patient_id: str) -> dict | None:
        timepoints = self.store.timepoints(patient_id)
        return lesions_view(patient_id, timepoints) if timepoints else None

    def report(self, patient_id: str) -> dict | None:
        view = self.lesions(patient_id)
        if view is None:
            return None
        return report_view(self.store.patient(patient_id) or {"patient_id": patient_id}, view,
                           self.pending_priors(patient_id))

    def comparison(self, study_uid: str, current: dict | None = None) -> dict | None:
        """The study's comparison with the patient's previous study. ``current`` (the worker's findings, before
        its SR exists) replaces what the store holds for the study."""
        patient_id = (current or {}).get("patient_id") or self.store.study_patient(study_uid)
        if not patient_id:
            return None
        timepoints = [tp for tp in self.store.timepoints(patient_id) if tp.study_instance_uid != study_uid or not current]
        if current is not None:
            timepoints.append(timepoint_from_findings(study_uid, current))
        if not any(tp.study_instance_uid == study_uid for tp in timepoints):
            return None
        out = comparison(timepoints, study_uid)
        out["patient_id"] = patient_id
        out["pending_priors"] = [uid for uid in self.pending_priors(patient_id) if uid != study_uid]
        date = str((current or {}).get("study_date") or "")
        if current is not None and any(self._earlier(uid, date) for uid in out["pending_priors"]):
            self.store.mark_stale_comparison(study_uid, patient_id)  # the worker writes its report without them
        return out

    def _earlier(self, study_uid: str, date: str) -> bool:
        """Whether the study was made before ``date`` (YYYYMMDD); unknown dates count as earlier."""
        if not date:
            return True
        orthanc_id = self._lookup(study_uid, "Study")
        if orthanc_id is None:
            return False  # deleted: nothing to wait for
        try:
            other = self.rest.get_json(f"/studies/{orthanc_id}").get("MainDicomTags", {}).get("StudyDate", "")
        except Exception:
            return True
        return not other or other < date


def timepoint_from_findings(study_uid: str, body: dict) -> Timepoint:
    """A time point from the worker's findings (``POST /ai/studies/{uid}/comparison``), not yet in any SR."""
    centre = body.get("volume_centre_mm")
    for_ = body.get("frame_of_reference_uid") or None
    lesions = []
    for f in body.get("findings", []):
        measurements = []
        for quantity, key, unit in (("volume_ml", "volume_ml", "ml"), ("long_axis_mm", "longest_diameter_mm", "mm"),
                                    ("short_axis_mm", "short_axis_mm", "mm"),
                                    ("max_3d_diameter_mm", "max_3d_diameter_mm", "mm")):
            if f.get(key) is not None:
                value = float(f[key])
                measurements.append(Measurement((quantity, "worker", quantity), None, value, unit, quantity, value))
        centroid = f.get("centroid_mm")
        lesions.append(LesionObservation(
            tracking_uid=f.get("tracking_uid"), tracking_id=f.get("tracking_id"),
            centroid=tuple(float(v) for v in centroid) if centroid else None,  # type: ignore[arg-type]
            frame_of_reference_uid=f.get("frame_of_reference_uid") or for_, measurements=measurements,
            volume_centre=tuple(float(v) for v in centre) if centre else None))  # type: ignore[arg-type]
    return Timepoint(study_uid, str(body.get("study_date") or ""), str(body.get("study_time") or ""),
                     lesions=lesions)


def register(orthanc_module: Any, api: Any, path: Path | str, *, dispatcher: Any = None, jobs: Any = None,
             auto_priors: bool = True) -> FollowUp:
    """Wire the follow-up into the plugin: its store beside the job store, its routes, its change handling.

    Returns the service; chain its ``on_change`` into Orthanc's single change callback with :meth:`FollowUp.chain`.
    """
    from orthanc_plugin.followup_routes import routes

    service = FollowUp(FollowUpStore(path), PluginRest(orthanc_module), dispatcher=dispatcher, jobs=jobs,
                       auto_priors=auto_priors).use_orthanc_enums(orthanc_module)
    api.add_routes(routes(service))
    return service
