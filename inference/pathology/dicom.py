"""Slide results as DICOM, stored in the slide's study: a Comprehensive SR with the QC figures, nuclei counts,
densities and hotspots; the density heatmap as a Secondary Capture; and, when the slide is DICOM, the nuclei
as Microscopy Bulk Simple Annotations (highdicom) on its level-0 image.

The SR is a Comprehensive SR titled "Pathology study" (LOINC 11526-1), not a TID 1500 measurement report:
its figures describe a whole slide, not lesions, and the follow-up module reads every TID 1500 report as
lesion measurements. Concepts without a standard code use the private coding scheme ``99OAI``, declared in
the Coding Scheme Identification Sequence. UIDs derive from (slide, model id, version, kind), so a re-run
replaces its results instead of duplicating them. A vendor file has no DICOM study: its results go to the
study named at upload (``study_instance_uid``) or to a new study derived from the file's SHA-256.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Iterable

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from inference import __version__
from inference.pathology.store import NucleusStore
from inference.results.identity import DEVICE_SERIAL_NUMBER, MANUFACTURER, derived_uid, series_description

__all__ = ["StudyContext", "complete_source", "heatmap_image", "nuclei_annotations", "result_uids", "slide_report_sr"]

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
PRIVATE_SCHEME = "99OAI"
NUCLEUS = Code("84640000", "SCT", "Nucleus")
PATHOLOGY_STUDY = hd.sr.CodedConcept("11526-1", "LN", "Pathology study")
ENGLISH = hd.sr.CodedConcept("en-US", "RFC5646", "English (United States)")
COMMENT = codes.DCM.Comment


def _concept(value: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value, PRIVATE_SCHEME, meaning)


def _lo(text: str) -> str:
    return " ".join(str(text).split())[:64]


@dataclass(frozen=True)
class StudyContext:
    """Patient and study for the results of a vendor file (taken from the upload, or from Orthanc)."""

    study_instance_uid: str
    patient_id: str = ""
    patient_name: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    accession_number: str = ""
    study_id: str = ""
    study_date: str = ""
    study_time: str = ""
    study_description: str = ""
    referring_physician_name: str = ""

    @classmethod
    def from_json(cls, data: dict) -> "StudyContext":
        return cls(**{k: str(v or "") for k, v in data.items() if k in cls.__dataclass_fields__})


def complete_source(source: Dataset, container_identifier: str, slide_key: str) -> Dataset:
    """A copy of the slide's level-0 header with the patient/study (type 2) and specimen (type 1) attributes
    that some converters leave out, so that derived objects inherit valid values (empty where unknown)."""
    ds = Dataset()
    ds.update(source)
    for keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                    "AccessionNumber", "StudyID", "ReferringPhysicianName"):
        if keyword not in ds:
            setattr(ds, keyword, "")
    if not ds.get("ContainerIdentifier"):
        ds.ContainerIdentifier = _lo(container_identifier)
    if not ds.get("IssuerOfTheContainerIdentifierSequence"):
        ds.IssuerOfTheContainerIdentifierSequence = []
    if not ds.get("SpecimenDescriptionSequence"):
        ds.SpecimenDescriptionSequence = [hd.SpecimenDescription(
            specimen_id=_lo(ds.ContainerIdentifier), specimen_uid=derived_uid("specimen", slide_key))]
    return ds


def result_uids(slide_key: str, detector: dict, kind: str) -> tuple[str, str]:
    """(Series Instance UID, SOP Instance UID) determined by the slide, the model and the result kind."""
    parts = ("slide", slide_key, detector.get("id", ""), detector.get("version", ""), kind)
    return derived_uid(*parts, "series"), derived_uid(*parts, "instance")


def _equipment(detector: dict) -> list[hd.ContributingEquipment]:
    return [hd.ContributingEquipment(
        manufacturer=MANUFACTURER, purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=_lo(detector.get("id", "")), software_versions=_lo(detector.get("version", "")),
        device_serial_number=DEVICE_SERIAL_NUMBER,
        contribution_description=_lo(f"whole-slide analysis by {detector.get('name', '')}"))]


def _software_versions(detector: dict) -> list[str]:
    return [_lo(f"{detector.get('id', '')} {detector.get('version', '')}"), _lo(f"orthanc-ai {__version__}")]


def _specimen(source: Dataset | None, container: str, slide_key: str) -> list[hd.SpecimenDescription]:
    if source is not None and source.get("SpecimenDescriptionSequence"):
        return [hd.SpecimenDescription.from_dataset(item) for item in source.SpecimenDescriptionSequence]
    return [hd.SpecimenDescription(specimen_id=_lo(container), specimen_uid=derived_uid("specimen", slide_key))]


def heatmap_image(heatmap: np.ndarray, *, slide_key: str, detector: dict, source: Dataset | None,
                  study: StudyContext | None, container_identifier: str, pixel_spacing_mm: float | None
                  ) -> hd.sc.SCImage:
    """The heatmap PNG's pixels as an RGB Secondary Capture in the slide's coordinate system."""
    series_uid, sop_uid = result_uids(slide_key, detector, "heatmap")
    container = (str(source.get("ContainerIdentifier", "")) if source is not None else "") or container_identifier
    common = dict(pixel_array=np.ascontiguousarray(heatmap), photometric_interpretation="RGB", bits_allocated=8,
                  coordinate_system="SLIDE", series_instance_uid=series_uid, series_number=9301,
                  sop_instance_uid=sop_uid, instance_number=1, manufacturer=MANUFACTURER,
                  container_identifier=_lo(container), specimen_descriptions=_specimen(source, container, slide_key),
                  series_description=series_description("Nuclei density heatmap"),
                  manufacturer_model_name=_lo(detector.get("id", "")),
                  software_versions=_software_versions(detector), contributing_equipment=_equipment(detector),
                  content_date=datetime.now().date(), content_time=datetime.now().time().replace(microsecond=0))
    if pixel_spacing_mm:
        common["pixel_spacing"] = (pixel_spacing_mm, pixel_spacing_mm)
    if source is not None:
        sc = hd.sc.SCImage.from_ref_dataset(ref_dataset=source, **common)
    else:
        assert study is not None, "a vendor slide needs a StudyContext"
        sc = hd.sc.SCImage(study_instance_uid=study.study_instance_uid, patient_id=study.patient_id,
                           patient_name=study.patient_name, patient_birth_date=study.patient_birth_date or None,
                           patient_sex=study.patient_sex or None, accession_number=study.accession_number,
                           study_id=study.study_id, study_date=study.study_date or None,
                           study_time=study.study_time or None,
                           referring_physician_name=study.referring_physician_name, **common)
        if study.study_description:
            sc.StudyDescription = _lo(study.study_description)
    sc.ImageType = ["DERIVED", "SECONDARY"]
    if "PatientOrientation" not in sc:
        sc.PatientOrientation = ""  # type 2C; a slide has no patient orientation
    sc.BurnedInAnnotation = "YES"  # the legend and the hotspot numbers are drawn into the pixels
    if source is not None and "FrameOfReferenceUID" in source:
        sc.ReferencedImageSequence = [_reference(source)]
    return sc


def _reference(source: Dataset) -> Dataset:
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    return ref


def _num(name: hd.sr.CodedConcept | Code, value: float, unit: hd.sr.CodedConcept | Code) -> hd.sr.NumContentItem:
    return hd.sr.NumContentItem(name=name, value=float(value), unit=unit,
                                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)


def _text(name: hd.sr.CodedConcept | Code, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=name, value=str(value)[:1024],
                                 relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)


def _container(name: hd.sr.CodedConcept, items: Iterable[hd.sr.ContentItem]) -> hd.sr.ContainerContentItem:
    item = hd.sr.ContainerContentItem(name=name, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    item.ContentSequence = hd.sr.ContentSequence(list(items))
    return item


PERCENT = hd.sr.CodedConcept("%", "UCUM", "percent")
NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")
PER_MM2 = hd.sr.CodedConcept("/mm2", "UCUM", "per square millimeter")
MM2 = hd.sr.CodedConcept("mm2", "UCUM", "square millimeter")
MM = hd.sr.CodedConcept("mm", "UCUM", "millimeter")
COUNT = hd.sr.CodedConcept("{count}", "UCUM", "count")


def slide_report_sr(report: dict, *, slide_key: str, evidence: list[Dataset]) -> hd.sr.ComprehensiveSR:
    """The report's QC figures, nuclei counts, densities and hotspots as a Comprehensive SR."""
    detector = (report.get("audit") or {}).get("model") or {}
    series_uid, sop_uid = result_uids(slide_key, detector, "SR")
    qc = report.get("quality_control") or {}
    nuclei = ((report.get("results") or {}).get("nuclei")) or {}
    tiles = (report.get("processing") or {}).get("tiles") or {}
    observer = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derived_uid("device observer", detector.get("id", ""), detector.get("version", "")),
            name=_lo(detector.get("id", "")), manufacturer_name=MANUFACTURER,
            model_name=_lo(detector.get("name", "")), serial_number=DEVICE_SERIAL_NUMBER))
    method = ("a classical image-processing method, not a trained model" if detector.get("method") == "classical"
              else "a neural network")
    summary = (f"Automated whole-slide analysis by {detector.get('name', '?')} ({method}): "
               f"{nuclei.get('total', 0)} nuclei in {nuclei.get('tissue_area_analysed_mm2', 0)} mm2 of tissue. "
               "Not reviewed by a pathologist.")
    items: list = [*hd.sr.LanguageOfContentItemAndDescendants(ENGLISH),
                   *hd.sr.ObservationContext(observer_device_context=observer), _text(COMMENT, summary)]
    qc_items = [_text(_concept("QC-STATUS", "Quality control status"), qc.get("status", "unknown"))]
    if qc.get("tissue_ratio") is not None:
        qc_items.append(_num(_concept("TISSUE-RATIO", "Tissue ratio"), 100 * qc["tissue_ratio"], PERCENT))
    if qc.get("blur_ratio") is not None:
        qc_items.append(_num(_concept("BLUR-RATIO", "Blurry tissue tiles"), 100 * qc["blur_ratio"], PERCENT))
    if qc.get("focus_score") is not None:
        qc_items.append(_num(_concept("FOCUS", "Focus score (variance of the Laplacian)"), qc["focus_score"],
                             NO_UNITS))
    if tiles.get("possible") is not None:
        qc_items.append(_num(_concept("TILES-POSSIBLE", "Tiles possible"), tiles["possible"], COUNT))
        qc_items.append(_num(_concept("TILES-ANALYSED", "Tiles analysed"), tiles["extracted"], COUNT))
    stain = qc.get("stain") or {}
    if stain.get("looks_like_he") is not None:
        qc_items.append(_text(_concept("STAIN", "Stain check"),
                              "H&E" if stain["looks_like_he"] else "not H&E-like"))
    qc_items += [_text(_concept("QC-WARNING", "Quality control warning"), w) for w in qc.get("warnings", [])]
    items.append(_container(_concept("QC", "Slide quality control"), qc_items))
    if nuclei:
        density = nuclei.get("density_per_mm2") or {}
        n_items = [_num(_concept("NUCLEI-COUNT", "Number of nuclei"), nuclei.get("total", 0), COUNT),
                   _num(_concept("TISSUE-AREA", "Tissue area analysed"), nuclei.get("tissue_area_analysed_mm2", 0),
                        MM2)]
        for key, meaning in (("overall", "Nuclei density"), ("mean", "Nuclei density, mean over tiles"),
                             ("std", "Nuclei density, standard deviation over tiles"),
                             ("min", "Nuclei density, minimum over tiles"), ("max", "Nuclei density, maximum over tiles")):
            if density.get(key) is not None:
                n_items.append(_num(_concept(f"DENSITY-{key.upper()}", meaning), density[key], PER_MM2))
        by_density = nuclei.get("density_per_mm2_by_type") or {}
        for i, (name, count) in enumerate(sorted((nuclei.get("by_type") or {}).items())):
            n_items.append(_num(_concept(f"COUNT-{i + 1}", _lo(f"Number of nuclei: {name}")), count, COUNT))
            if by_density.get(name) is not None:
                n_items.append(_num(_concept(f"DENSITY-{i + 1}", _lo(f"Nuclei density: {name}")), by_density[name],
                                    PER_MM2))
        items.append(_container(_concept("NUCLEI", "Nuclei"), n_items))
        for roi in nuclei.get("regions_of_interest") or []:
            location = (f"x {roi['x_mm']} mm, y {roi['y_mm']} mm, {roi['width_mm']} x {roi['height_mm']} mm "
                        f"(level-0 pixels x {roi['x_px']}, y {roi['y_px']}, {roi['width_px']} x {roi['height_px']})")
            items.append(_container(_concept("HOTSPOT", "Hotspot region of interest"), [
                _num(_concept("HOTSPOT-RANK", "Hotspot rank"), roi["rank"], NO_UNITS),
                _num(_concept("DENSITY-OVERALL", "Nuclei density"), roi["density_per_mm2"], PER_MM2),
                _num(_concept("NUCLEI-COUNT", "Number of nuclei"), roi["nuclei"], COUNT),
                _text(_concept("HOTSPOT-LOCATION", "Hotspot location"), location)]))
    root = hd.sr.ContainerContentItem(name=PATHOLOGY_STUDY)
    root.ContentSequence = hd.sr.ContentSequence(items)
    sr = hd.sr.ComprehensiveSR(
        evidence=evidence, content=root, series_instance_uid=series_uid, series_number=9300,
        sop_instance_uid=sop_uid, instance_number=1, manufacturer=MANUFACTURER, is_complete=True,
        is_final=False, is_verified=False, series_description=series_description("Slide analysis report"),
        manufacturer_model_name=_lo(detector.get("id", "")), software_versions=_software_versions(detector),
        device_serial_number=DEVICE_SERIAL_NUMBER, contributing_equipment=_equipment(detector))
    scheme = Dataset()
    scheme.CodingSchemeDesignator = PRIVATE_SCHEME
    scheme.CodingSchemeName = "Orthanc AI whole-slide analysis concepts"
    scheme.CodingSchemeResponsibleOrganization = MANUFACTURER
    sr.CodingSchemeIdentificationSequence = [scheme]
    return sr


def nuclei_annotations(store: NucleusStore, source: Dataset, classes: tuple[str, ...], detector: dict, *,
                       slide_key: str, max_per_instance: int = 200_000) -> list[hd.ann.MicroscopyBulkSimpleAnnotations]:
    """Nuclei polygons (with their area) on the level-0 image, one annotation group per class; split into
    several instances of at most ``max_per_instance`` nuclei (viewers freeze on more, WSI.md §9)."""
    if str(source.get("SOPClassUID", "")) != WSI_SOP_CLASS:
        raise ValueError("bulk annotations need a VL Whole Slide Microscopy source image")
    series_uid, _ = result_uids(slide_key, detector, "ANN")
    family = (codes.cid7162.ArtificialIntelligence if detector.get("method") == "network"
              else codes.cid7162.MorphologicalOperations)
    algorithm = hd.AlgorithmIdentificationSequence(name=_lo(detector.get("name", "")), family=family,
                                                   version=_lo(detector.get("version", "")), source=MANUFACTURER)
    out = []
    chunk: dict[int, list] = {}
    n = 0

    def flush() -> None:
        if not chunk:
            return
        number = len(out) + 1
        groups = []
        for g, class_index in enumerate(sorted(chunk), start=1):
            polygons = [p.astype(np.float32) for p, _ in chunk[class_index]]
            areas = np.array([a for _, a in chunk[class_index]], np.float32)
            name = classes[class_index] if class_index < len(classes) else classes[0]
            groups.append(hd.ann.AnnotationGroup(
                number=g, uid=derived_uid("slide", slide_key, detector.get("id", ""), "ANN group", number, name),
                label=_lo(name), annotated_property_category=codes.SCT.AnatomicalStructure,
                annotated_property_type=NUCLEUS, algorithm_type=hd.ann.AnnotationGroupGenerationTypeValues.AUTOMATIC,
                graphic_type=hd.ann.GraphicTypeValues.POLYGON, graphic_data=polygons,
                algorithm_identification=algorithm,
                measurements=[hd.ann.Measurements(name=codes.SCT.Area, unit=codes.UCUM.SquareMicrometer, values=areas)]))
        ann = hd.ann.MicroscopyBulkSimpleAnnotations(
            source_images=[source], annotation_coordinate_type=hd.ann.AnnotationCoordinateTypeValues.SCOORD,
            annotation_groups=groups, series_instance_uid=series_uid, series_number=9302,
            sop_instance_uid=derived_uid("slide", slide_key, detector.get("id", ""), detector.get("version", ""),
                                         "ANN", number),
            instance_number=number, manufacturer=MANUFACTURER, manufacturer_model_name=_lo(detector.get("id", "")),
            software_versions=_software_versions(detector), device_serial_number=DEVICE_SERIAL_NUMBER,
            content_description=_lo(f"Nuclei found by {detector.get('name', '')}"),
            contributing_equipment=_equipment(detector), series_description=series_description("Nuclei"))
        for keyword in ("ContainerIdentifier", "IssuerOfTheContainerIdentifierSequence", "SpecimenDescriptionSequence"):
            if keyword in ann:  # highdicom copies the Specimen module, which the ANN IOD does not have
                delattr(ann, keyword)
        if "Laterality" not in ann:
            ann.Laterality = ""  # General Series, type 2C: unknown for a slide
        out.append(ann)
        chunk.clear()

    for nucleus in store.iter():
        chunk.setdefault(nucleus.class_index, []).append((nucleus.polygon, nucleus.area_um2))
        n += 1
        if n % max_per_instance == 0:
            flush()
    flush()
    return out
