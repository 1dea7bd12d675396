"""DICOM RT Structure Set: a label map on a ``Volume`` → one RTSTRUCT instance of closed planar contours, and back.

Each segment becomes one ROI. On every source slice where the segment is present, each island and each
hole is one CLOSED_PLANAR contour (``skimage.measure.find_contours`` at level 0.5 on the padded binary
slice, so the polygon runs half-way between inside and outside voxel centres). Every point lies on the
exact plane of its source frame (that frame's Image Position (Patient)), and each contour references that
frame. Holes are separate contours rather than the standard's "keyhole" drawing; readers combine the
contours of one ROI on one plane by even-odd (XOR), as common RT systems and ``contours_to_mask`` do.

A segment absent from the label map keeps its ROI (Structure Set ROI, ROI Contour with its colour,
RT ROI Observations) with no Contour Sequence, which the ROI Contour Module allows (Type 3).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RTStructureSetStorage
from pydicom.valuerep import PersonName
from skimage.draw import polygon as _polygon_pixels
from skimage.measure import find_contours

from inference import __version__
from inference.models.base import Code, ModelInfo, SegmentDescription
from inference.results.identity import (
    DEVICE_SERIAL_NUMBER, MANUFACTURER, PROCESSING_EQUIPMENT, check_label_map, contribution_description,
    series_description as _series_description)
from inference.volume import Volume

__all__ = ["Contour", "ROI", "contours_to_mask", "read_rois", "write_rt_structure_set"]

DETACHED_STUDY_MANAGEMENT = "1.2.840.10008.3.1.2.3.1"
"""Referenced SOP Class UID of the RT Referenced Study item (retired class, the value RT systems expect)."""
ANATOMICAL_STRUCTURE = "123037004"  # SCT Segmented Property Category → RT ROI Interpreted Type ORGAN
CONTOUR_DATA = 0x30060050  # (3006,0050) Contour Data
CLOSED_CONTOUR_TYPES = ("CLOSED_PLANAR", "CLOSEDPLANAR_XOR")
"""Contour Geometric Types that enclose an area; POINT and OPEN_* contours add nothing to a mask."""

_MAX_SHORT_VALUE_LENGTH = 0xFFFE  # a DS value in Explicit VR has a 16-bit length (even, so 65534 bytes)
_DECIMALS = 6  # Contour Data precision: 1 nm, far below any pixel, and every value fits the DS 16 bytes

# Patient, General Study and Patient Study attributes copied from the source, with their Type 2 defaults.
_COPIED_TYPE_2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                  "ReferringPhysicianName", "StudyID", "AccessionNumber")
_COPIED_OPTIONAL = ("IssuerOfPatientID", "OtherPatientIDsSequence", "PatientIdentityRemoved",
                    "DeidentificationMethod", "DeidentificationMethodCodeSequence", "StudyDescription",
                    "IssuerOfAccessionNumberSequence", "PatientAge", "PatientSize", "PatientWeight")


@dataclass(frozen=True)
class Contour:
    """One Contour Sequence item: its geometric type, points in patient LPS mm, and the image it names."""

    geometric_type: str
    points: np.ndarray  # (N, 3) float64
    referenced_sop_instance_uid: str | None = None
    referenced_frame_number: int | None = None


@dataclass(frozen=True)
class ROI:
    """One ROI of a structure set: Structure Set ROI attributes joined with its ROI Contour item."""

    number: int
    name: str
    frame_of_reference_uid: str | None
    display_color: tuple[int, int, int] | None
    contours: tuple[Contour, ...]


# --- writing ------------------------------------------------------------------------------------


def write_rt_structure_set(
    volume: Volume,
    labels: np.ndarray,
    segments: Sequence[SegmentDescription],
    model: ModelInfo,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int = 9002,
    series_description: str | None = None,
) -> pydicom.Dataset:
    """Encode ``labels`` (integers, shape of ``volume.array``) as an RT Structure Set, one ROI per segment.

    ROI numbers are 1..N in the order of ``segments``, whatever their labels. The file meta says Explicit VR
    Little Endian unless a contour is too long for a 16-bit DS length; then Implicit VR Little Endian.
    """
    check_label_map(volume, labels, segments, "An RT Structure Set")
    if not volume.frame_of_reference_uid:
        raise ValueError(
            f"Series {volume.series_instance_uid} has no Frame of Reference UID; an RT Structure Set needs one "
            "to place its contours."
        )
    source = volume.datasets[0]
    now = datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"  # names copied from the source are decoded to str, re-encoded UTF-8
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.SOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = sop_instance_uid
    _copy_patient_and_study(source, ds)
    ds.StudyInstanceUID = volume.study_instance_uid
    # RT Series
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = series_instance_uid
    ds.SeriesNumber = series_number
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.SeriesDescription = _series_description(series_description or model.name, demonstration=model.demonstration)
    ds.OperatorsName = ""
    # Frame of Reference (mandatory in the current RT Structure Set IOD; dciodvfy requires it): the source's
    ds.FrameOfReferenceUID = volume.frame_of_reference_uid
    ds.PositionReferenceIndicator = source.get("PositionReferenceIndicator", "") or ""
    # General Equipment
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = _lo(model.id)
    ds.DeviceSerialNumber = DEVICE_SERIAL_NUMBER
    ds.SoftwareVersions = [_lo(f"{model.id} {model.version}"), _lo(f"orthanc-ai {__version__}")]
    # Structure Set
    ds.StructureSetLabel = "AI_DEMO_RTSTRUCT" if model.demonstration else "AI_RTSTRUCT"
    ds.StructureSetName = _lo(model.name)
    ds.StructureSetDescription = _structure_set_description(model)
    ds.InstanceNumber = 1
    ds.StructureSetDate, ds.StructureSetTime = date, time
    ds.ReferencedFrameOfReferenceSequence = [_referenced_frame_of_reference(volume)]
    ds.StructureSetROISequence = [
        _structure_set_roi(number, segment, volume.frame_of_reference_uid, model)
        for number, segment in enumerate(segments, start=1)
    ]
    # ROI Contour
    origins = _slice_origins(volume)
    ds.ROIContourSequence = [
        _roi_contour(number, segment, labels == segment.label, volume, origins)
        for number, segment in enumerate(segments, start=1)
    ]
    # RT ROI Observations
    ds.RTROIObservationsSequence = [
        _rt_roi_observation(number, segment) for number, segment in enumerate(segments, start=1)
    ]
    # SOP Common
    ds.ContributingEquipmentSequence = [_contributing_equipment(model)]

    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RTStructureSetStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if _has_long_contour(ds) else ExplicitVRLittleEndian
    return ds


def _copy_patient_and_study(source: pydicom.Dataset, ds: pydicom.Dataset) -> None:
    """Patient, General Study and Patient Study attributes of the source; Type 2 ones empty if it lacks them.

    Values are read through the source (so raw elements decode with its character set) and stored anew.
    """
    for keyword in (*_COPIED_TYPE_2, *_COPIED_OPTIONAL):
        element = source.data_element(keyword) if keyword in source else None
        if element is None or element.value is None:
            if keyword in _COPIED_TYPE_2:
                setattr(ds, keyword, "")
            continue
        value = element.value
        if isinstance(value, PersonName):
            value = str(value)
        elif element.VR == "SQ":
            value = [_copy_item(item) for item in value]
        setattr(ds, keyword, value)


def _copy_item(item: pydicom.Dataset) -> pydicom.Dataset:
    copy = Dataset()
    for element in item:
        value = element.value
        if isinstance(value, PersonName):
            value = str(value)
        elif element.VR == "SQ":
            value = [_copy_item(child) for child in value]
        copy.add_new(element.tag, element.VR, value)
    return copy


def _referenced_frame_of_reference(volume: Volume) -> pydicom.Dataset:
    """Frame of Reference → RT Referenced Study → RT Referenced Series → every source image of the volume."""
    series = Dataset()
    series.SeriesInstanceUID = volume.series_instance_uid
    series.ContourImageSequence = _contour_images(volume)
    study = Dataset()
    study.ReferencedSOPClassUID = DETACHED_STUDY_MANAGEMENT
    study.ReferencedSOPInstanceUID = volume.study_instance_uid
    study.RTReferencedSeriesSequence = [series]
    item = Dataset()
    item.FrameOfReferenceUID = volume.frame_of_reference_uid
    item.RTReferencedStudySequence = [study]
    return item


def _contour_images(volume: Volume) -> list[pydicom.Dataset]:
    """One Contour Image item per source instance, in slice order; multi-frame ones list their frames used."""
    frames_of: dict[str, list[int]] = {}
    class_of: dict[str, str] = {}
    for frame in volume.frames:
        frames_of.setdefault(frame.sop_instance_uid, [])
        class_of[frame.sop_instance_uid] = frame.sop_class_uid
        if frame.frame_number is not None:
            frames_of[frame.sop_instance_uid].append(frame.frame_number)
    items = []
    for uid, frame_numbers in frames_of.items():
        item = Dataset()
        item.ReferencedSOPClassUID = class_of[uid]
        item.ReferencedSOPInstanceUID = uid
        if frame_numbers:
            item.ReferencedFrameNumber = sorted(frame_numbers) if len(frame_numbers) > 1 else frame_numbers[0]
        items.append(item)
    return items


def _structure_set_roi(
    number: int, segment: SegmentDescription, frame_of_reference_uid: str, model: ModelInfo
) -> pydicom.Dataset:
    item = Dataset()
    item.ROINumber = number
    item.ReferencedFrameOfReferenceUID = frame_of_reference_uid
    item.ROIName = _lo(segment.name)
    item.ROIGenerationAlgorithm = segment.algorithm_type
    item.ROIGenerationDescription = _lo(f"{model.name} {model.version}")
    return item


def _rt_roi_observation(number: int, segment: SegmentDescription) -> pydicom.Dataset:
    """RT ROI Observations item: ORGAN for anatomy, empty (unknown) otherwise, and the segment's type code.

    A lesion found by a model is not a GTV: that is a clinical decision, so no target type is claimed.
    """
    item = Dataset()
    item.ObservationNumber = number
    item.ReferencedROINumber = number
    item.ROIObservationLabel = _lo(segment.name)[:16].rstrip()  # SH
    item.RTROIInterpretedType = "ORGAN" if segment.category.value == ANATOMICAL_STRUCTURE else ""
    item.ROIInterpreter = ""
    item.RTROIIdentificationCodeSequence = [_code_item(segment.type)]
    return item


def _roi_contour(
    number: int, segment: SegmentDescription, mask: np.ndarray, volume: Volume, origins: np.ndarray
) -> pydicom.Dataset:
    """ROI Contour item: display colour and one CLOSED_PLANAR contour per island and per hole, slice by slice."""
    item = Dataset()
    item.ROIDisplayColor = [int(c) for c in segment.color]
    contours = []
    column_step, row_step = volume.affine[:3, 0], volume.affine[:3, 1]
    for k in np.flatnonzero(mask.any(axis=(1, 2))):
        frame = volume.frames[k]
        for row_column in _slice_contours(mask[k]):
            points = origins[k] + row_column[:, 1:2] * column_step + row_column[:, 0:1] * row_step
            image = Dataset()
            image.ReferencedSOPClassUID = frame.sop_class_uid
            image.ReferencedSOPInstanceUID = frame.sop_instance_uid
            if frame.frame_number is not None:
                image.ReferencedFrameNumber = frame.frame_number
            contour = Dataset()
            contour.ContourImageSequence = [image]
            contour.ContourGeometricType = "CLOSED_PLANAR"
            contour.NumberOfContourPoints = len(points)
            contour.ContourNumber = len(contours) + 1
            contour.add(_contour_data(points))
            contours.append(contour)
    if contours:
        item.ContourSequence = contours
    item.ReferencedROINumber = number
    return item


def _slice_contours(mask: np.ndarray) -> list[np.ndarray]:
    """(row, column) vertices of every closed boundary (outer and hole) of a binary slice, without repeats.

    The slice is cropped to the mask's bounding box and padded by one voxel, so every contour closes.
    Collinear vertices (``find_contours`` puts one on every voxel edge crossed) are dropped: the polygon
    is unchanged and the file much smaller.
    """
    rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, columns[0], columns[-1] + 1
    padded = np.pad(mask[r0:r1, c0:c1].astype(np.float32), 1)
    offset = np.array([r0 - 1, c0 - 1], dtype=np.float64)
    result = []
    for vertices in find_contours(padded, 0.5):
        vertices = vertices[:-1] if np.array_equal(vertices[0], vertices[-1]) else vertices
        vertices = _without_collinear(vertices)
        if len(vertices) >= 3:
            result.append(vertices + offset)
    return result


def _without_collinear(vertices: np.ndarray) -> np.ndarray:
    """Vertices of a closed polygon, less those on the straight line through their two neighbours."""
    before = vertices - np.roll(vertices, 1, axis=0)
    after = np.roll(vertices, -1, axis=0) - vertices
    cross = before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]
    return vertices[np.abs(cross) > 1e-9]


def _slice_origins(volume: Volume) -> np.ndarray:
    """(slices, 3) Image Position (Patient) of every source frame, so contours lie on each frame's own plane.

    The volume's affine is a regular grid fitted to the frames (within a tolerance); the headers are exact.
    Where a frame's position cannot be read, the affine's is used.
    """
    origins = np.array([(volume.affine @ [0.0, 0.0, k, 1.0])[:3] for k in range(volume.shape[0])])
    by_uid = {str(ds.SOPInstanceUID): ds for ds in volume.datasets}
    for k, frame in enumerate(volume.frames):
        source = by_uid.get(frame.sop_instance_uid)
        if source is None:
            continue
        position = None
        if frame.frame_number is None:
            position = source.get("ImagePositionPatient")
        else:
            per_frame = source.get("PerFrameFunctionalGroupsSequence")
            if per_frame and len(per_frame) >= frame.frame_number:
                plane = per_frame[frame.frame_number - 1].get("PlanePositionSequence")
                position = plane[0].get("ImagePositionPatient") if plane else None
        if position is not None and len(position) == 3:
            origins[k] = [float(v) for v in position]
    return origins


def _contour_data(points: np.ndarray) -> DataElement:
    """Contour Data (DS) of (N, 3) points; values are formatted here, so pydicom's per-value check is skipped.

    That check dominates the writing time of large structure sets (about 20 µs a value).
    """
    values = [_decimal_string(v) for v in points.ravel().tolist()]
    return DataElement(CONTOUR_DATA, "DS", values, validation_mode=pydicom.config.IGNORE)


def _decimal_string(value: float) -> str:
    """A DS value with at most ``_DECIMALS`` decimals and no trailing zeros (well under 16 bytes in mm)."""
    text = f"{value:.{_DECIMALS}f}".rstrip("0").rstrip(".")
    if text in ("-0", ""):
        return "0"
    if len(text) > 16:
        raise ValueError(f"Contour coordinate {value} mm does not fit a Decimal String (16 characters).")
    return text


def _has_long_contour(ds: pydicom.Dataset) -> bool:
    """True if some Contour Data is longer than an Explicit VR DS value can be (65534 bytes)."""
    for roi in ds.ROIContourSequence:
        for contour in roi.get("ContourSequence", []):
            values = contour.ContourData
            if sum(len(str(v)) for v in values) + len(values) - 1 > _MAX_SHORT_VALUE_LENGTH:
                return True
    return False


def _contributing_equipment(model: ModelInfo) -> pydicom.Dataset:
    item = Dataset()
    item.PurposeOfReferenceCodeSequence = [_code_item(Code(PROCESSING_EQUIPMENT.value,
                                                           PROCESSING_EQUIPMENT.scheme_designator,
                                                           PROCESSING_EQUIPMENT.meaning))]
    item.Manufacturer = MANUFACTURER
    item.ManufacturerModelName = _lo(model.id)
    item.DeviceSerialNumber = DEVICE_SERIAL_NUMBER
    item.SoftwareVersions = _lo(model.version)
    item.ContributionDescription = contribution_description(model, "Contours")
    return item


def _structure_set_description(model: ModelInfo) -> str:
    """Structure Set Description (ST): the model and version, and a plain warning for demonstration models."""
    text = f"Contours by {model.name} {model.version} ({model.id})."
    return f"DEMO, not for diagnosis. {text}" if model.demonstration else text


def _code_item(code: Code) -> pydicom.Dataset:
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme
    item.CodeMeaning = _lo(code.meaning)
    return item


def _lo(text: str) -> str:
    """A value fit for a LO-like string: one line, at most 64 characters."""
    return " ".join(str(text).split())[:64]


# --- reading ------------------------------------------------------------------------------------


def read_rois(ds: pydicom.Dataset) -> dict[int, ROI]:
    """The ROIs of an RT Structure Set by ROI Number, with their contours; parsing only, no geometry.

    ROIs listed in the Structure Set ROI Sequence but without an ROI Contour item get no contours.
    Raises ``ValueError`` for an object that is not a structure set or has malformed Contour Data.
    """
    if str(ds.get("SOPClassUID", "")) != RTStructureSetStorage and ds.get("Modality") != "RTSTRUCT":
        raise ValueError(f"Instance {ds.get('SOPInstanceUID', '(no SOP Instance UID)')} is not an RT Structure Set.")
    names: dict[int, tuple[str, str | None]] = {}
    for item in ds.get("StructureSetROISequence", []):
        frame_of_reference = item.get("ReferencedFrameOfReferenceUID")
        name = str(item.get("ROIName", ""))
        names[int(item.ROINumber)] = (name, str(frame_of_reference) if frame_of_reference else None)
    contours_of: dict[int, tuple[Contour, ...]] = {}
    colors: dict[int, tuple[int, int, int]] = {}
    for item in ds.get("ROIContourSequence", []):
        number = int(item.ReferencedROINumber)
        color = item.get("ROIDisplayColor")
        if color is not None and len(color) == 3:
            colors[number] = (int(color[0]), int(color[1]), int(color[2]))
        contours = item.get("ContourSequence", [])
        contours_of[number] = tuple(_contour(number, index, contour) for index, contour in enumerate(contours))
    return {
        number: ROI(
            number=number,
            name=names.get(number, ("", None))[0],
            frame_of_reference_uid=names.get(number, ("", None))[1],
            display_color=colors.get(number),
            contours=contours_of.get(number, ()),
        )
        for number in sorted(set(names) | set(contours_of))
    }


def _contour(roi_number: int, index: int, item: pydicom.Dataset) -> Contour:
    values = _contour_values(item)
    if values.size == 0 or values.size % 3:
        raise ValueError(
            f"Contour {index + 1} of ROI {roi_number} has {values.size} Contour Data values; "
            "a contour needs x, y, z triplets."
        )
    uid, frame_number = None, None
    images = item.get("ContourImageSequence")
    if images:
        uid = str(images[0].get("ReferencedSOPInstanceUID", "")) or None
        frame = images[0].get("ReferencedFrameNumber")
        if frame is not None and frame != "":
            frame_number = int(frame[0] if isinstance(frame, MultiValue) else frame)
    return Contour(str(item.get("ContourGeometricType", "")), values.reshape(-1, 3), uid, frame_number)


def _contour_values(item: pydicom.Dataset) -> np.ndarray:
    """Contour Data as floats; still-encoded values are parsed directly, much faster than pydicom's DS objects."""
    if CONTOUR_DATA not in item:
        return np.empty(0)
    element = item.get_item(CONTOUR_DATA)
    if element is not None and element.is_raw and isinstance(element.value, bytes):
        text = element.value.strip(b" \0")
        return np.array(text.split(b"\\"), dtype=np.float64) if text else np.empty(0)
    data = item.ContourData
    return np.array([float(v) for v in data] if data is not None else [], dtype=np.float64)


def contours_to_mask(ds: pydicom.Dataset, volume: Volume) -> dict[int, np.ndarray]:
    """ROI Number → boolean mask on the volume grid, re-rasterising the closed contours of every ROI.

    A contour goes to the slice whose plane it lies on (found by geometry, so contours without or with stale
    image references still land right); contours of one ROI on one slice combine by even-odd (XOR), which
    fills islands and leaves holes empty. Contours on no slice of the volume are skipped with a warning.
    """
    origins = _slice_origins(volume)
    column_step, row_step = volume.affine[:3, 0], volume.affine[:3, 1]
    normal = np.cross(column_step, row_step)
    normal /= np.linalg.norm(normal)
    in_plane = np.linalg.pinv(np.stack([column_step, row_step], axis=1))  # (2, 3): mm → (column, row)
    plane_offsets = origins @ normal
    slice_step = float(np.median(np.abs(np.diff(plane_offsets)))) if len(origins) > 1 else volume.spacing[0]
    tolerance = max(0.1 * slice_step, 0.01)
    _, rows, columns = volume.shape
    volume_instances = {frame.sop_instance_uid for frame in volume.frames}

    masks: dict[int, np.ndarray] = {}
    skipped = 0
    for number, roi in read_rois(ds).items():
        if (
            roi.frame_of_reference_uid
            and volume.frame_of_reference_uid
            and roi.frame_of_reference_uid != volume.frame_of_reference_uid
            and roi.contours
            and not any(contour.referenced_sop_instance_uid in volume_instances for contour in roi.contours)
        ):  # a differing UID is tolerated when the contours name our images (some writers, e.g. rt-utils, mint one)
            raise ValueError(
                f"ROI {number} ({roi.name}) is in Frame of Reference {roi.frame_of_reference_uid}, the volume in "
                f"{volume.frame_of_reference_uid}; its contours cannot be placed on this series."
            )
        mask = np.zeros(volume.shape, dtype=bool)
        for contour in roi.contours:
            if contour.geometric_type not in CLOSED_CONTOUR_TYPES or len(contour.points) < 3:
                continue
            distances = contour.points @ normal
            k = int(np.argmin(np.abs(plane_offsets - distances.mean())))
            if np.max(np.abs(distances - plane_offsets[k])) > tolerance:
                skipped += 1
                continue
            column_row = (contour.points - origins[k]) @ in_plane.T
            rr, cc = _polygon_pixels(column_row[:, 1], column_row[:, 0], shape=(rows, columns))
            inside = np.zeros((rows, columns), dtype=bool)
            inside[rr, cc] = True
            mask[k] ^= inside
        masks[number] = mask
    if skipped:
        warnings.warn(
            f"{skipped} contour(s) of RT Structure Set {ds.get('SOPInstanceUID', '')} lie on no slice of series "
            f"{volume.series_instance_uid} and were left out of the masks.",
            stacklevel=2,
        )
    return masks
