"""DICOM series → ``Volume``: a voxel array on a known patient-space grid, with references to its sources.

Slices are ordered by geometry (position along the slice normal), never by Instance Number, so that
results written on the volume map back to the exact source frames. Classic single-frame series and
Enhanced multi-frame instances (functional groups) are both handled; anything we cannot place in
patient space exactly is refused with a message a user can act on.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.pixels import pixel_array
from pydicom.uid import UID

__all__ = [
    "SourceFrame",
    "UnsupportedInput",
    "Volume",
    "VolumeError",
    "read_instance",
    "volume_from_datasets",
    "volume_from_files",
]


class VolumeError(Exception):
    """Input cannot become a volume; message is a sentence a user can act on."""


class UnsupportedInput(VolumeError):
    """Valid DICOM we do not handle (non-image SOP class, single slice when 3D needed, no pixel data)."""


@dataclass(frozen=True)
class SourceFrame:
    """The source of one slice of a volume: an instance, and a frame of it if it is multi-frame."""

    sop_instance_uid: str
    sop_class_uid: str
    frame_number: int | None  # 1-based frame of a multi-frame instance, None for single-frame


@dataclass
class Volume:
    """Voxel array plus the affine that places it in patient space, and the frames it came from."""

    array: np.ndarray  # (slices, rows, columns) float32, modality LUT (RescaleSlope/Intercept) applied
    affine: np.ndarray  # 4x4 float64: maps (column i, row j, slice k, 1) to patient LPS mm
    frames: list[SourceFrame]  # frames[k] is the source of array[k]
    datasets: list[pydicom.Dataset]  # source instances without Pixel Data, in order of first use by frames
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str | None
    modality: str
    series_description: str

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Step lengths in mm along (slice k, row j, column i), the axis order of ``array``."""
        norms = np.linalg.norm(self.affine[:3, :3], axis=0)  # columns: i, j, k
        return (float(norms[2]), float(norms[1]), float(norms[0]))

    @property
    def shape(self) -> tuple[int, int, int]:
        """(slices, rows, columns)."""
        return tuple(int(n) for n in self.array.shape)  # type: ignore[return-value]


# SOP classes that carry pixels but are results or plans, not images a model can read.
_DERIVED_OBJECT_CLASSES: dict[str, str] = {
    pydicom.uid.SegmentationStorage: "Segmentation Storage",
    "1.2.840.10008.5.1.4.1.1.66.7": "Label Map Segmentation Storage",
    pydicom.uid.RTDoseStorage: "RT Dose Storage",
}
# Attributes that hold bulk pixel data; removed from the datasets a Volume keeps.
_BULK_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_BULK_DATA_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
# Largest tolerated deviation of a slice from its place on a uniform grid, as a fraction of the step.
_SPACING_TOLERANCE = 0.1
# Largest tolerated difference between direction cosines of slices of one volume.
_ORIENTATION_TOLERANCE = 1e-3


@dataclass
class _FrameGeometry:
    """Everything needed to place and rescale one frame, read from the dataset or its functional groups."""

    dataset: pydicom.Dataset
    frame_number: int | None
    position: np.ndarray  # Image Position (Patient), LPS mm
    orientation: np.ndarray  # Image Orientation (Patient): row cosines then column cosines
    pixel_spacing: tuple[float, float]  # (between rows, between columns) mm
    slice_thickness: float | None
    rescale_slope: float
    rescale_intercept: float


def read_instance(source: str | os.PathLike[str] | bytes | BinaryIO, *, name: str | None = None) -> pydicom.Dataset:
    """Read one DICOM instance, raising ``VolumeError`` that names it if it is unreadable or truncated.

    pydicom reads truncated files without complaint (it drops or shortens the last element), so the
    raw elements are checked against their declared lengths.
    """
    if isinstance(source, bytes):
        label = name or "DICOM instance"
        fp: str | os.PathLike[str] | BinaryIO = io.BytesIO(source)
    else:
        label = name or (os.fspath(source) if isinstance(source, (str, os.PathLike)) else "DICOM instance")
        fp = source
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(fp)
        except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError, struct.error) as exc:
            raise VolumeError(f"{label} could not be read as DICOM ({exc}); check that the file is complete.") from exc
    if any("End of file" in str(w.message) for w in caught) or _has_short_element(ds):
        raise VolumeError(f"{label} is truncated (the file ends inside a data element); send the complete file again.")
    return ds


def volume_from_files(paths: Iterable[str | os.PathLike[str]], *, min_slices: int = 1) -> Volume:
    """Read DICOM files and build their volume; a convenience over ``volume_from_datasets``."""
    return volume_from_datasets([read_instance(path) for path in paths], min_slices=min_slices)


def volume_from_datasets(datasets: Sequence[pydicom.Dataset], *, min_slices: int = 1) -> Volume:
    """Build a volume from the instances of one series (single-frame slices or Enhanced multi-frame).

    Slices are sorted along the slice normal; their spacing must be uniform. The returned datasets
    are copies without Pixel Data; the inputs are not modified.
    """
    if not datasets:
        raise VolumeError("No DICOM instances were given; a volume needs at least one image.")
    for ds in datasets:
        _check_image_instance(ds)
    _check_one_series(datasets)

    geometries = [geometry for ds in datasets for geometry in _frame_geometries(ds)]
    if len(geometries) < min_slices:
        noun = "slice" if len(geometries) == 1 else "slices"
        raise UnsupportedInput(
            f"Series {datasets[0].SeriesInstanceUID} has {len(geometries)} {noun}; "
            f"this model needs at least {min_slices}."
        )
    _check_same_grid(geometries)
    geometries = _sorted_along_normal(geometries)
    affine = _affine(geometries)

    first = datasets[0]
    rows, columns = int(first.Rows), int(first.Columns)
    array = np.empty((len(geometries), rows, columns), dtype=np.float32)
    for k, geometry in enumerate(geometries):
        array[k] = _decoded_frame(geometry)
        if geometry.rescale_slope != 1.0:
            array[k] *= np.float32(geometry.rescale_slope)
        if geometry.rescale_intercept != 0.0:
            array[k] += np.float32(geometry.rescale_intercept)

    frames = [
        SourceFrame(str(g.dataset.SOPInstanceUID), str(g.dataset.SOPClassUID), g.frame_number) for g in geometries
    ]
    kept: dict[str, pydicom.Dataset] = {}
    for geometry in geometries:
        uid = str(geometry.dataset.SOPInstanceUID)
        if uid not in kept:
            kept[uid] = _without_bulk_data(geometry.dataset)

    return Volume(
        array=array,
        affine=affine,
        frames=frames,
        datasets=list(kept.values()),
        study_instance_uid=str(first.StudyInstanceUID),
        series_instance_uid=str(first.SeriesInstanceUID),
        frame_of_reference_uid=str(first.FrameOfReferenceUID) if first.get("FrameOfReferenceUID") else None,
        modality=str(first.get("Modality", "")),
        series_description=str(first.get("SeriesDescription", "")),
    )


# --- checks -------------------------------------------------------------------------------------


def _describe(ds: pydicom.Dataset) -> str:
    """How to name an instance in a message: its file if it was read from one, else its SOP Instance UID."""
    filename = getattr(ds, "filename", None)
    if isinstance(filename, str) and filename:
        return f"file {filename}"
    return f"instance {ds.get('SOPInstanceUID', '(no SOP Instance UID)')}"


def _capitalized(text: str) -> str:
    return text[:1].upper() + text[1:]


def _sop_class_name(ds: pydicom.Dataset) -> str:
    uid = str(ds.get("SOPClassUID", ""))
    if not uid:
        return "an unknown SOP class"
    return _DERIVED_OBJECT_CLASSES.get(uid) or UID(uid).name


def _has_short_element(ds: pydicom.Dataset) -> bool:
    """True if a not-yet-parsed element holds fewer bytes than its header declares (a truncated file)."""
    for tag in ds.keys():
        raw = ds.get_item(tag)
        if (
            isinstance(raw, RawDataElement)
            and raw.value is not None
            and raw.length != 0xFFFFFFFF
            and len(raw.value) < raw.length
        ):
            return True
    return False


def _check_image_instance(ds: pydicom.Dataset) -> None:
    """Refuse instances that are not greyscale images with pixel data."""
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class in _DERIVED_OBJECT_CLASSES or "Rows" not in ds or "Columns" not in ds:
        raise UnsupportedInput(
            f"{_capitalized(_describe(ds))} is {_sop_class_name(ds)}, not an image; "
            "send an image series (CT, MR, ...) to this model."
        )
    if not any(keyword in ds for keyword in _BULK_DATA_KEYWORDS):
        raise UnsupportedInput(
            f"{_capitalized(_describe(ds))} ({_sop_class_name(ds)}) has no Pixel Data; "
            "it may have been stored without its pixels. Send the complete image."
        )
    samples = int(ds.get("SamplesPerPixel", 1))
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise UnsupportedInput(
            f"{_capitalized(_describe(ds))} is a colour image (Samples per Pixel {samples}, "
            f"Photometric Interpretation {photometric or 'missing'}); this model reads greyscale images only."
        )
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        if not ds.get(keyword):
            raise VolumeError(f"{_capitalized(_describe(ds))} has no {keyword}; it is not a valid DICOM image.")


def _check_one_series(datasets: Sequence[pydicom.Dataset]) -> None:
    """All instances must belong to one series of one study, on one frame of reference."""
    first = datasets[0]
    for ds in datasets[1:]:
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
            if ds.get(keyword) != first.get(keyword):
                raise VolumeError(
                    f"The instances mix several values of {keyword} ({first.get(keyword)} and "
                    f"{ds.get(keyword)}, in {_describe(ds)}); a volume is built from one series at a time."
                )
        if (ds.Rows, ds.Columns) != (first.Rows, first.Columns):
            raise VolumeError(
                f"Series {first.SeriesInstanceUID} mixes image sizes ({first.Rows}x{first.Columns} and "
                f"{ds.Rows}x{ds.Columns} in {_describe(ds)}); it is not one volume."
            )
    uids = [str(ds.SOPInstanceUID) for ds in datasets]
    if len(set(uids)) != len(uids):
        duplicate = next(uid for uid in uids if uids.count(uid) > 1)
        raise VolumeError(f"Instance {duplicate} was given more than once; send each instance once.")


def _check_same_grid(geometries: Sequence[_FrameGeometry]) -> None:
    """All frames must share orientation and pixel spacing."""
    reference = geometries[0]
    for geometry in geometries[1:]:
        if np.max(np.abs(geometry.orientation - reference.orientation)) > _ORIENTATION_TOLERANCE:
            raise VolumeError(
                f"Series {reference.dataset.SeriesInstanceUID} mixes slice orientations "
                f"({_format(reference.orientation)} and {_format(geometry.orientation)} in "
                f"{_describe_frame(geometry)}), for example a localizer stored in the series; "
                "a volume needs parallel slices."
            )
        if not np.allclose(geometry.pixel_spacing, reference.pixel_spacing, rtol=1e-3, atol=1e-4):
            raise VolumeError(
                f"Series {reference.dataset.SeriesInstanceUID} mixes pixel spacings "
                f"({_format(reference.pixel_spacing)} and {_format(geometry.pixel_spacing)} mm in "
                f"{_describe_frame(geometry)}); a volume needs one grid."
            )


def _describe_frame(geometry: _FrameGeometry) -> str:
    name = _describe(geometry.dataset)
    return name if geometry.frame_number is None else f"frame {geometry.frame_number} of {name}"


def _format(values: Iterable[float]) -> str:
    return "[" + ", ".join(f"{float(v):.6g}" for v in values) + "]"


# --- geometry -----------------------------------------------------------------------------------


def _slice_normal(orientation: np.ndarray) -> np.ndarray:
    """Unit normal of the slice plane: row direction × column direction (right-handed i, j, k)."""
    normal = np.cross(orientation[:3], orientation[3:])
    length = np.linalg.norm(normal)
    if length < 0.5:
        raise VolumeError(
            f"Image Orientation (Patient) {_format(orientation)} does not describe a plane "
            "(row and column directions are parallel or zero); the image cannot be placed in patient space."
        )
    return normal / length


def _sorted_along_normal(geometries: list[_FrameGeometry]) -> list[_FrameGeometry]:
    """Frames in increasing position along the slice normal; refuses duplicates and uneven spacing."""
    normal = _slice_normal(geometries[0].orientation)
    ordered = sorted(geometries, key=lambda g: float(np.dot(g.position, normal)))
    if len(ordered) < 2:
        return ordered

    distances = np.array([float(np.dot(g.position, normal)) for g in ordered])
    steps = np.diff(distances)
    series = ordered[0].dataset.SeriesInstanceUID
    typical = float(np.median(steps))
    for index, step in enumerate(steps):
        if step <= max(_SPACING_TOLERANCE * typical, 1e-3):
            raise VolumeError(
                f"Series {series} has two slices at the same position ({distances[index]:.2f} mm along the "
                f"slice normal: {_describe_frame(ordered[index])} and {_describe_frame(ordered[index + 1])}); "
                "it probably holds several echoes, phases or acquisitions. Split it into one series per volume."
            )

    # Every slice must sit on the line from the first to the last position, at equal steps. This also
    # accepts a tilted gantry exactly (the k axis is then not along the normal).
    first, last = ordered[0].position, ordered[-1].position
    step_vector = (last - first) / (len(ordered) - 1)
    step_length = float(np.linalg.norm(step_vector))
    for k, geometry in enumerate(ordered):
        deviation = float(np.linalg.norm(geometry.position - (first + k * step_vector)))
        if deviation > max(_SPACING_TOLERANCE * step_length, 1e-3):
            widest = int(np.argmax(np.abs(steps - typical)))
            if abs(steps[widest] - typical) <= _SPACING_TOLERANCE * typical:
                raise VolumeError(
                    f"Series {series} has slices that are not stacked on one line ({_describe_frame(geometry)} "
                    f"is {deviation:.3g} mm off); it cannot be read as one regular volume."
                )
            raise VolumeError(
                f"Series {series} has unevenly spaced slices: {steps[widest]:.3g} mm between "
                f"{_describe_frame(ordered[widest])} and {_describe_frame(ordered[widest + 1])}, where "
                f"{typical:.3g} mm is typical; a slice is probably missing. Send the complete series."
            )
    return ordered


def _affine(ordered: Sequence[_FrameGeometry]) -> np.ndarray:
    """4x4 map from (column i, row j, slice k, 1) to LPS mm, per DICOM PS3.3 C.7.6.2.1.1."""
    reference = ordered[0]
    row_spacing, column_spacing = reference.pixel_spacing
    affine = np.eye(4, dtype=np.float64)
    affine[:3, 0] = reference.orientation[:3] * column_spacing  # along a row: increasing column index i
    affine[:3, 1] = reference.orientation[3:] * row_spacing  # along a column: increasing row index j
    if len(ordered) > 1:
        affine[:3, 2] = (ordered[-1].position - ordered[0].position) / (len(ordered) - 1)
    else:
        thickness = reference.slice_thickness if reference.slice_thickness and reference.slice_thickness > 0 else 1.0
        affine[:3, 2] = _slice_normal(reference.orientation) * thickness
    affine[:3, 3] = reference.position
    return affine


def _frame_geometries(ds: pydicom.Dataset) -> list[_FrameGeometry]:
    """Geometry of every frame of an instance: top-level attributes, or functional groups if multi-frame."""
    if "PerFrameFunctionalGroupsSequence" not in ds and "SharedFunctionalGroupsSequence" not in ds:
        frame_count = int(ds.get("NumberOfFrames") or 1)
        if frame_count > 1:
            raise VolumeError(
                f"{_capitalized(_describe(ds))} ({_sop_class_name(ds)}) has {frame_count} frames but no per-frame "
                "functional groups, so its frames cannot be placed in patient space."
            )
        return [_geometry(ds, None, [ds])]

    shared = ds.get("SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    frame_count = int(ds.get("NumberOfFrames") or 1)
    if per_frame is not None and len(per_frame) != frame_count:
        raise VolumeError(
            f"{_capitalized(_describe(ds))} declares {frame_count} frames but has {len(per_frame)} "
            "Per-frame Functional Groups items; the instance is inconsistent."
        )
    geometries = []
    for index in range(frame_count):
        groups = []  # most specific first: per-frame, shared, then the top level as a fallback
        if per_frame is not None:
            groups.append(per_frame[index])
        if shared:
            groups.append(shared[0])
        groups.append(ds)
        geometries.append(_geometry(ds, index + 1, groups))
    return geometries


def _lookup(groups: Sequence[pydicom.Dataset], sequence: str, keyword: str):
    """First value of ``keyword`` in ``sequence`` of the groups (or at their top level), most specific first."""
    for group in groups:
        items = group.get(sequence)
        if items and keyword in items[0] and items[0][keyword].value not in (None, ""):
            return items[0][keyword].value
        if group is groups[-1] and keyword in group and group[keyword].value not in (None, ""):
            return group[keyword].value
    return None


def _geometry(ds: pydicom.Dataset, frame_number: int | None, groups: Sequence[pydicom.Dataset]) -> _FrameGeometry:
    where = _describe(ds) if frame_number is None else f"frame {frame_number} of {_describe(ds)}"
    position = _lookup(groups, "PlanePositionSequence", "ImagePositionPatient")
    orientation = _lookup(groups, "PlaneOrientationSequence", "ImageOrientationPatient")
    spacing = _lookup(groups, "PixelMeasuresSequence", "PixelSpacing")
    missing = [
        name
        for name, value, count in (
            ("Image Position (Patient)", position, 3),
            ("Image Orientation (Patient)", orientation, 6),
            ("Pixel Spacing", spacing, 2),
        )
        if value is None or len(value) != count
    ]
    if missing:
        raise UnsupportedInput(
            f"{_capitalized(where)} ({_sop_class_name(ds)}) has no {' or '.join(missing)}, "
            "so it cannot be placed in patient space; this model needs cross-sectional images (CT, MR, PET)."
        )
    thickness = _lookup(groups, "PixelMeasuresSequence", "SliceThickness")
    slope = _lookup(groups, "PixelValueTransformationSequence", "RescaleSlope")
    intercept = _lookup(groups, "PixelValueTransformationSequence", "RescaleIntercept")
    orientation_array = np.array([float(v) for v in orientation], dtype=np.float64)
    _slice_normal(orientation_array)  # validates that it is a plane
    return _FrameGeometry(
        dataset=ds,
        frame_number=frame_number,
        position=np.array([float(v) for v in position], dtype=np.float64),
        orientation=orientation_array,
        pixel_spacing=(float(spacing[0]), float(spacing[1])),
        slice_thickness=float(thickness) if thickness is not None else None,
        rescale_slope=float(slope) if slope is not None else 1.0,
        rescale_intercept=float(intercept) if intercept is not None else 0.0,
    )


# --- pixels -------------------------------------------------------------------------------------


def _decoded_frame(geometry: _FrameGeometry) -> np.ndarray:
    """Stored values of one frame (before the modality LUT), decoding compressed transfer syntaxes."""
    ds = geometry.dataset
    try:
        # pixel_array() rather than ds.pixel_array: the latter caches the decoded array on the caller's dataset.
        index = None if geometry.frame_number is None else geometry.frame_number - 1
        frame = pixel_array(ds, index=index)
    except Exception as exc:  # decoders raise many types; the user needs the instance and the reason
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        syntax_name = UID(str(syntax)).name if syntax else "unknown transfer syntax"
        raise VolumeError(
            f"Pixel Data of {_describe_frame(geometry)} could not be decoded ({syntax_name}): {exc}"
        ) from exc
    if frame.shape != (int(ds.Rows), int(ds.Columns)):
        raise VolumeError(
            f"Pixel Data of {_describe_frame(geometry)} has shape {frame.shape}, expected "
            f"{int(ds.Rows)}x{int(ds.Columns)}; the instance is inconsistent."
        )
    return frame


def _without_bulk_data(ds: pydicom.Dataset) -> pydicom.Dataset:
    """A shallow copy without pixel or overlay data (elements are shared with ``ds``, not duplicated)."""
    copy = pydicom.Dataset()
    for tag in ds.keys():
        if tag in _BULK_DATA_TAGS or (0x6000 <= tag.group <= 0x601E and tag.element == 0x3000):
            continue
        copy.add(ds[tag])
    if hasattr(ds, "file_meta"):
        copy.file_meta = ds.file_meta
    return copy
