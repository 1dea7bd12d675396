"""TID 1500 Measurement Report (Comprehensive 3D SR, highdicom; each lesion's centre as a SCOORD3D point) of findings, and a reader for TID 1500 reports.

One Measurement Group (TID 1411, Volumetric ROI) per finding, pointing at its segment in the SEG. Enhanced
SR is enough: the content holds codes, numbers, text, UIDs and image references but no 3D coordinates,
and it is the SR class the most readers understand.

Report-level statements go in TID 1500's "Qualitative Evaluations" container (row 12, (C0034375, UMLS)):
the demonstration-model warning, the model's stated accuracy, and, when there is no finding, one
"<segment type>: Absent" item per segment the model looks for (SCT 272519000 "Absent", as in CID 240)
with a plain-text comment. "Absent" is scoped to what the model searched for; a coded "No abnormality
detected" would claim more than a segmentation model can know. Such a report has no "Imaging
Measurements" container, which TID 1500 allows when the Qualitative Evaluations container is present.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
import pydicom
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code as PydicomCode

from inference import __version__
from inference.models.base import Code, ModelInfo
from inference.results.findings import Finding
from inference.results.identity import (
    contributing_equipment,
    DEVICE_SERIAL_NUMBER,
    MANUFACTURER,
    derived_uid,
    series_description as _series_description,
)
from inference.volume import Volume

__all__ = ["read_measurement_report", "write_measurement_report"]

CodedConcept = hd.sr.CodedConcept

REPORT_TITLE = codes.cid7021.ImagingMeasurementReport  # (126000, DCM)
QUALITATIVE_EVALUATIONS = CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")  # TID 1500 row 12
ENGLISH = CodedConcept("en-US", "RFC5646", "English (United States)")
LESION = codes.SCT.Lesion  # (52988006, SCT) finding type when the segment says nothing better
ABSENT = codes.SCT.Absent  # (272519000, SCT)
COMMENT = codes.DCM.Comment  # (121106, DCM)

VOLUME = codes.SCT.Volume  # (118565006, SCT)
DIAMETER = codes.SCT.Diameter  # (81827009, SCT), with Derivation "Maximum": the maximum 3D diameter
MAXIMUM = codes.SCT.Maximum  # (56851009, SCT)
LONG_AXIS = codes.SCT.LongAxis  # (103339001, SCT)
SHORT_AXIS = codes.SCT.ShortAxis  # (103340004, SCT), the longest chord perpendicular to the long axis
MEAN = codes.SCT.Mean  # (373098007, SCT)
CENTER_OF_MASS = codes.DCM.CenterOfMass  # (128138, DCM): the finding's centroid, a SCOORD3D POINT

MILLILITER = CodedConcept("ml", "UCUM", "milliliter")
MILLIMETER = codes.UCUM.Millimeter  # (mm, UCUM)

# Procedure Reported (TID 1500 row 4, CID 100) by source modality.
_PROCEDURES: dict[str, PydicomCode] = {
    "CT": codes.cid100.CTUnspecifiedBodyRegion,  # (25045-6, LN)
    "MR": codes.cid100.MRIUnspecifiedBodyRegion,  # (25056-3, LN)
    "PT": codes.cid100.PETUnspecifiedBodyRegion,  # (44136-0, LN)
    "NM": codes.cid100.NMUnspecifiedBodyRegion,  # (49118-3, LN)
}
IMAGING_PROCEDURE = codes.cid100.ImagingProcedure  # (363679005, SCT) for any other modality

# Concepts the reader looks for, as (code value, coding scheme) pairs, with legacy SNOMED-RT aliases.
_IMAGING_MEASUREMENTS = {("126010", "DCM")}
_MEASUREMENT_GROUP = {("125007", "DCM")}
_TRACKING_IDENTIFIER = {("112039", "DCM")}
_TRACKING_UID = {("112040", "DCM")}
_FINDING = {("121071", "DCM")}
_FINDING_SITE = {("363698007", "SCT"), ("G-C0E3", "SRT")}
_REFERENCED_SEGMENT = {("121191", "DCM")}
_DERIVATION = {("121401", "DCM")}
_REPORT_TITLES = {(c.value, c.scheme_designator) for c in (getattr(codes.cid7021, n) for n in codes.cid7021.dir())}


def write_measurement_report(
    volume: Volume,
    findings: Sequence[Finding],
    seg: pydicom.Dataset | None,
    model: ModelInfo,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int = 9003,
    series_description: str | None = None,
    comparison: Sequence[str] = (),
) -> pydicom.Dataset:
    """A TID 1500 Comprehensive 3D SR with one measurement group per finding, each referencing its SEG segment.

    ``comparison``: sentences comparing this study with the patient's previous one (per-lesion change and the
    computed response), written as comments in the report's Qualitative Evaluations.

    ``seg`` is the SEG the findings were measured on (None only when there are no findings). Without
    findings the report states, per segment of the model, that none was found.
    """
    if findings and seg is None:
        raise ValueError("Findings reference their segments in a SEG; pass the SEG written for them (seg is None).")
    algorithm = hd.sr.AlgorithmIdentification(name=_lo(model.name), version=_lo(model.version))
    intensity_unit = _intensity_unit(volume)
    groups = [_measurement_group(volume, finding, seg, model, algorithm, intensity_unit) for finding in findings]
    evaluations = _report_evaluations(findings, model) + [
        hd.sr.TextContentItem(name=COMMENT, value=text[:1024], relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
        for text in comparison if text]
    root = _report_root(volume, model, groups, evaluations)

    evidence = list(volume.datasets) + ([seg] if seg is not None else [])
    return hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=root,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,  # PRELIMINARY and UNVERIFIED: nobody accountable has reviewed an AI result yet
        is_verified=False,
        series_description=_series_description(
            series_description or f"{model.name} measurements", demonstration=model.demonstration
        ),
        manufacturer_model_name=_lo(model.id),
        software_versions=[_lo(f"{model.id} {model.version}"), _lo(f"orthanc-ai {__version__}")],
        device_serial_number=DEVICE_SERIAL_NUMBER,
        contributing_equipment=[contributing_equipment(model, "Measurements of findings segmented")],
    )


def read_measurement_report(ds: pydicom.Dataset) -> list[dict]:
    """The measurement groups of a TID 1500 report (ours or another tool's), one dict per group.

    Keys: ``tracking_uid``, ``tracking_id``, ``finding`` and ``finding_site`` ((value, scheme, meaning) or
    None), ``measurements`` ({concept meaning: (value, UCUM unit code)}; a Derivation modifier is
    appended as "Diameter (Maximum)"), ``referenced_segment`` ((SEG SOP Instance UID, segment number) or
    None). Raises ``ValueError`` saying why when ``ds`` is not a TID 1500 report.
    """
    if "ContentSequence" not in ds or ds.get("ValueType") != "CONTAINER" or not ds.get("ConceptNameCodeSequence"):
        raise ValueError(
            f"Instance {ds.get('SOPInstanceUID', '(no SOP Instance UID)')} is not a structured report "
            "(no root container with a content tree)."
        )
    templates = [str(item.get("TemplateIdentifier", "")) for item in ds.get("ContentTemplateSequence", [])]
    title = ds.ConceptNameCodeSequence[0]
    if "1500" not in templates and _key(title) not in _REPORT_TITLES:
        raise ValueError(
            f'SR document {ds.get("SOPInstanceUID", "")} is not a TID 1500 Measurement Report: its root is '
            f'"{title.get("CodeMeaning", "")}" with template {", ".join(templates) if templates else "none"}.'
        )
    groups = []
    for container in ds.ContentSequence:
        if container.get("ValueType") == "CONTAINER" and _named(container, _IMAGING_MEASUREMENTS):
            for item in container.get("ContentSequence", []):
                if item.get("ValueType") == "CONTAINER" and _named(item, _MEASUREMENT_GROUP):
                    groups.append(_read_group(item))
    return groups


# --- writing ------------------------------------------------------------------------------------


def _report_root(
    volume: Volume,
    model: ModelInfo,
    groups: list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations],
    evaluations: list[hd.sr.ContentItem],
) -> hd.sr.ContainerContentItem:
    """TID 1500 root: language, device observer, procedure, measurements and/or qualitative evaluations."""
    observer = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derived_uid("device observer", model.id, model.version),
            name=_lo(model.id),
            manufacturer_name=MANUFACTURER,
            model_name=_lo(model.name),
            serial_number=DEVICE_SERIAL_NUMBER,
        ),
    )
    context = hd.sr.ObservationContext(observer_device_context=observer)
    language = hd.sr.LanguageOfContentItemAndDescendants(ENGLISH)
    procedure = _PROCEDURES.get(volume.modality.upper(), IMAGING_PROCEDURE)
    if groups:
        root = hd.sr.MeasurementReport(
            observation_context=context,
            procedure_reported=procedure,
            imaging_measurements=groups,
            title=REPORT_TITLE,
            language_of_content_item_and_descendants=language,
        )[0]
    else:  # highdicom's MeasurementReport requires measurements; build the same rows without them
        root = hd.sr.ContainerContentItem(name=REPORT_TITLE, template_id="1500")
        root.ContentSequence = hd.sr.ContentSequence(
            [
                *language,
                *context,
                hd.sr.CodeContentItem(
                    name=codes.DCM.ProcedureReported,
                    value=procedure,
                    relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
                ),
            ]
        )
    if evaluations:
        container = hd.sr.ContainerContentItem(
            name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
        )
        container.ContentSequence = hd.sr.ContentSequence(evaluations)
        root.ContentSequence.append(container)
    return root


def _report_evaluations(findings: Sequence[Finding], model: ModelInfo) -> list[hd.sr.ContentItem]:
    """Items of the report's Qualitative Evaluations: the no-finding statement and the model's caveats."""
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    items: list[hd.sr.ContentItem] = []
    if not findings:
        searched = list(model.segments)
        for segment in searched or [None]:
            name = _coded(segment.type) if segment is not None else LESION
            items.append(hd.sr.CodeContentItem(name=name, value=ABSENT, relationship_type=contains))
        names = ", ".join(segment.name for segment in searched) or "finding"
        items.append(
            hd.sr.TextContentItem(
                name=COMMENT,
                value=f"No finding: {model.name} {model.version} found no {names} in this series.",
                relationship_type=contains,
            )
        )
    if model.demonstration:
        items.append(
            hd.sr.TextContentItem(
                name=COMMENT, value="Demonstration model, not for diagnosis.", relationship_type=contains
            )
        )
    if model.accuracy.strip():
        items.append(
            hd.sr.TextContentItem(
                name=COMMENT, value=f"Model accuracy: {model.accuracy.strip()}", relationship_type=contains
            )
        )
    return items


def _measurement_group(
    volume: Volume,
    finding: Finding,
    seg: pydicom.Dataset,
    model: ModelInfo,
    algorithm: hd.sr.AlgorithmIdentification,
    intensity_unit: CodedConcept,
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """TID 1411 group of one finding: tracking, referenced segment, finding type and five measurements."""
    segment_number = _segment_number(finding, seg)
    segment_item = next(item for item in seg.SegmentSequence if int(item.SegmentNumber) == segment_number)
    finding_type, finding_category = _finding_codes(finding, segment_item, model)
    slice_index = int(finding.extra.get("axial_slice", finding.key_slice))
    frame = volume.frames[slice_index]
    axial_source = [
        hd.sr.SourceImageForMeasurement(
            referenced_sop_class_uid=frame.sop_class_uid,
            referenced_sop_instance_uid=frame.sop_instance_uid,
            referenced_frame_numbers=None if frame.frame_number is None else [frame.frame_number],
        )
    ]
    measurements = [
        hd.sr.Measurement(name=VOLUME, value=finding.volume_ml, unit=MILLILITER, algorithm_id=algorithm),
        hd.sr.Measurement(
            name=DIAMETER, value=finding.max_3d_diameter_mm, unit=MILLIMETER, derivation=MAXIMUM, algorithm_id=algorithm
        ),
        hd.sr.Measurement(
            name=LONG_AXIS,
            value=finding.longest_axial_diameter_mm,
            unit=MILLIMETER,
            algorithm_id=algorithm,
            referenced_images=axial_source,
        ),
        hd.sr.Measurement(
            name=SHORT_AXIS,
            value=finding.perpendicular_axial_diameter_mm,
            unit=MILLIMETER,
            algorithm_id=algorithm,
            referenced_images=axial_source,
        ),
        hd.sr.Measurement(name=MEAN, value=finding.mean_intensity, unit=intensity_unit, algorithm_id=algorithm),
    ]
    site = finding.extra.get("finding_site")
    group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=finding.tracking_uid, identifier=finding.tracking_id),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=str(seg.SOPClassUID),
            sop_instance_uid=str(seg.SOPInstanceUID),
            segment_number=segment_number,
            source_series=hd.sr.SourceSeriesForSegmentation(volume.series_instance_uid),
        ),
        finding_type=finding_type,
        finding_category=finding_category,
        algorithm_id=algorithm,
        finding_sites=[hd.sr.FindingSite(_coded(site))] if finding.location and isinstance(site, Code) else None,
        measurements=measurements,
    )
    if volume.frame_of_reference_uid:  # where the lesion is, so that later studies can find it again
        group[0].ContentSequence.append(
            hd.sr.Scoord3DContentItem(
                name=CENTER_OF_MASS,
                graphic_type=hd.sr.GraphicTypeValues3D.POINT,
                graphic_data=np.array([finding.centroid_mm], dtype=np.float64),
                frame_of_reference_uid=volume.frame_of_reference_uid,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    return group


def _segment_number(finding: Finding, seg: pydicom.Dataset) -> int:
    """SEG segment number of the finding's segment, checked against the SEG's segment labels."""
    by_number = {int(item.SegmentNumber): str(item.SegmentLabel) for item in seg.SegmentSequence}
    name = _lo(finding.segment_name)
    number = int(finding.extra.get("segment_number", finding.segment_label))
    if by_number.get(number) == name:
        return number
    matches = [n for n, label in by_number.items() if label == name]
    if len(matches) == 1:
        return matches[0]
    raise ValueError(
        f'{finding.tracking_id} belongs to segment "{finding.segment_name}", which SEG {seg.SOPInstanceUID} '
        f"does not hold as segment {number}; pass the SEG written from the same segment list."
    )


def _finding_codes(
    finding: Finding, segment_item: pydicom.Dataset, model: ModelInfo
) -> tuple[CodedConcept, CodedConcept | None]:
    """Finding type and category: the SEG segment's property type and category (the model's as fallback)."""
    if segment_item.get("SegmentedPropertyTypeCodeSequence"):
        category = segment_item.get("SegmentedPropertyCategoryCodeSequence")
        return (
            CodedConcept.from_dataset(segment_item.SegmentedPropertyTypeCodeSequence[0]),
            CodedConcept.from_dataset(category[0]) if category else None,
        )
    for segment in model.segments:
        if segment.label == finding.segment_label:
            return _coded(segment.type), _coded(segment.category)
    return CodedConcept.from_code(LESION), None


def _intensity_unit(volume: Volume) -> CodedConcept:
    """UCUM unit of voxel values: HU for CT, Bq/ml for PET in BQML, else arbitrary units (MR signal...)."""
    source = volume.datasets[0] if volume.datasets else pydicom.Dataset()
    modality = volume.modality.upper()
    if modality == "CT" and str(source.get("RescaleType", "HU") or "HU").upper() == "HU":
        return CodedConcept.from_code(codes.UCUM.HounsfieldUnit)  # ([hnsf'U], UCUM)
    if modality == "PT" and str(source.get("Units", "")).upper() == "BQML":
        return CodedConcept.from_code(codes.UCUM.BecquerelsPerMilliliter)  # (Bq/ml, UCUM)
    return CodedConcept.from_code(codes.UCUM.ArbitraryUnit)  # ([arb'U], UCUM): MR and other relative scales


def _coded(code: Code) -> CodedConcept:
    return CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=_lo(code.meaning))


def _lo(text: str) -> str:
    """A value fit for a LO-like string: one line, at most 64 characters."""
    return " ".join(str(text).split())[:64]


# --- reading ------------------------------------------------------------------------------------


def _read_group(group: pydicom.Dataset) -> dict:
    """One TID 1501/1410/1411 measurement group as a plain dict (see ``read_measurement_report``)."""
    result: dict = {
        "tracking_uid": None,
        "tracking_id": None,
        "finding": None,
        "finding_site": None,
        "measurements": {},
        "referenced_segment": None,
    }
    for item in group.get("ContentSequence", []):
        value_type = item.get("ValueType")
        if value_type == "TEXT" and _named(item, _TRACKING_IDENTIFIER):
            result["tracking_id"] = str(item.TextValue)
        elif value_type == "UIDREF" and _named(item, _TRACKING_UID):
            result["tracking_uid"] = str(item.UID)
        elif value_type == "CODE" and _named(item, _FINDING):
            result["finding"] = _triple(item.ConceptCodeSequence[0])
        elif value_type == "CODE" and _named(item, _FINDING_SITE):
            result["finding_site"] = _triple(item.ConceptCodeSequence[0])
        elif value_type == "IMAGE" and _named(item, _REFERENCED_SEGMENT):
            reference = item.ReferencedSOPSequence[0]
            numbers = reference.get("ReferencedSegmentNumber")
            number = int(numbers[0]) if isinstance(numbers, (list, tuple, MultiValue)) else int(numbers)
            result["referenced_segment"] = (str(reference.ReferencedSOPInstanceUID), number)
        elif value_type == "NUM":
            name, value = _read_num(item)
            key, copy = name, 2
            while key in result["measurements"]:  # two measurements of one concept stay apart
                key, copy = f"{name} #{copy}", copy + 1
            result["measurements"][key] = value
    return result


def _read_num(item: pydicom.Dataset) -> tuple[str, tuple[float | None, str | None]]:
    """(concept meaning with its derivation, (value, UCUM unit code)) of a NUM content item."""
    name = str(item.ConceptNameCodeSequence[0].get("CodeMeaning", ""))
    for modifier in item.get("ContentSequence", []):
        if modifier.get("ValueType") == "CODE" and _named(modifier, _DERIVATION):
            name = f"{name} ({modifier.ConceptCodeSequence[0].get('CodeMeaning', '')})"
    measured = item.get("MeasuredValueSequence")
    if not measured:  # a NUM without a value carries a Numeric Value Qualifier instead
        return name, (None, None)
    value_item = measured[0]
    value = value_item.get("FloatingPointValue")
    value = float(value if value is not None else value_item.NumericValue)
    unit = value_item.get("MeasurementUnitsCodeSequence")
    return name, (value, str(unit[0].CodeValue) if unit else None)


def _key(code: pydicom.Dataset) -> tuple[str, str]:
    value = code.get("CodeValue") or code.get("LongCodeValue") or code.get("URNCodeValue") or ""
    return str(value), str(code.get("CodingSchemeDesignator", ""))


def _named(item: pydicom.Dataset, concepts: set[tuple[str, str]]) -> bool:
    names = item.get("ConceptNameCodeSequence")
    return bool(names) and _key(names[0]) in concepts


def _triple(code: pydicom.Dataset) -> tuple[str, str, str]:
    value, scheme = _key(code)
    return value, scheme, str(code.get("CodeMeaning", ""))
