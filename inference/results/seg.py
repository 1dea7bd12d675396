"""DICOM Segmentation (SEG) writer: a label map on a ``Volume`` → one BINARY SEG instance (highdicom).

Every source frame gets one SEG frame per segment, empty or not, so viewers that pair SEG frames with
source frames by index (OHIF) never shift the overlay, and every frame references its exact source.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes

from inference import __version__
from inference.models.base import Code, ModelInfo, SegmentDescription
from inference.results.identity import (
    DEVICE_SERIAL_NUMBER, MANUFACTURER, check_label_map, contributing_equipment, lo as _lo,
    series_description as _series_description)
from inference.volume import Volume

__all__ = ["write_segmentation"]

ARTIFICIAL_INTELLIGENCE = codes.DCM.ArtificialIntelligence  # (123110, DCM) Algorithm Family of our models


def write_segmentation(
    volume: Volume,
    labels: np.ndarray,
    segments: Sequence[SegmentDescription],
    model: ModelInfo,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int = 9001,
    series_description: str | None = None,
    algorithm_family: Code | None = None,
) -> pydicom.Dataset:
    """Encode ``labels`` (uint8, shape of ``volume.array``) as a BINARY SEG with one segment per description.

    ``algorithm_family`` defaults to (123110, DCM, "Artificial Intelligence"); classical methods should
    pass their own family code. Segment numbers are 1..N in the order of ``segments``, whatever their labels.
    """
    check_label_map(volume, labels, segments, "A segmentation")
    label_values = [segment.label for segment in segments]

    source_images, segment_numbers = _in_source_order(volume, _segment_numbers(labels, label_values))
    family = _coded(algorithm_family) if algorithm_family else ARTIFICIAL_INTELLIGENCE
    algorithm = hd.AlgorithmIdentificationSequence(
        name=_lo(model.name), family=family, version=_lo(model.version), source=MANUFACTURER
    )
    description = _series_description(series_description or model.name, demonstration=model.demonstration)
    software_versions = [_lo(f"{model.id} {model.version}"), _lo(f"orthanc-ai {__version__}")]

    return hd.seg.Segmentation(
        source_images=source_images,
        pixel_array=segment_numbers,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[
            _segment_description(number, segment, algorithm) for number, segment in enumerate(segments, start=1)
        ],
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=_lo(model.id),
        software_versions=software_versions,  # type: ignore[arg-type]  # a list: pydicom warns on tuples
        device_serial_number=DEVICE_SERIAL_NUMBER,
        content_label="AI_DEMO_SEG" if model.demonstration else "AI_SEG",
        content_description=_content_description(model),
        omit_empty_frames=False,
        series_description=description,
        contributing_equipment=[contributing_equipment(model, "Segmentation")],
    )


def _segment_numbers(labels: np.ndarray, label_values: Sequence[int]) -> np.ndarray:
    """Label map with each label replaced by its segment number (1..N), as SEG requires."""
    lookup = np.zeros(max(int(labels.max(initial=0)), max(label_values)) + 1, dtype=np.uint16)
    for number, value in enumerate(label_values, start=1):
        lookup[value] = number
    dtype = np.uint8 if len(label_values) < 256 else np.uint16
    return lookup[labels].astype(dtype, copy=False)


def _in_source_order(volume: Volume, numbers: np.ndarray) -> tuple[list[pydicom.Dataset], np.ndarray]:
    """Source images as highdicom wants them, and the mask reordered so that plane i belongs to them.

    Single-frame sources: plane i is the slice of ``source_images[i]``. One multi-frame source: plane i is
    its frame i + 1 (frames not in the volume get empty planes).
    """
    slice_of = {(frame.sop_instance_uid, frame.frame_number): k for k, frame in enumerate(volume.frames)}
    if all(frame.frame_number is None for frame in volume.frames):
        order = [slice_of[(str(ds.SOPInstanceUID), None)] for ds in volume.datasets]
        return list(volume.datasets), numbers[order]
    if len(volume.datasets) > 1:
        raise ValueError(
            "The volume comes from several multi-frame instances; a SEG can reference only one multi-frame "
            "source image (highdicom). Write one SEG per source instance."
        )
    source = volume.datasets[0]
    uid = str(source.SOPInstanceUID)
    planes = np.zeros((int(source.NumberOfFrames),) + numbers.shape[1:], dtype=numbers.dtype)
    for frame_index in range(planes.shape[0]):
        k = slice_of.get((uid, frame_index + 1))
        if k is not None:
            planes[frame_index] = numbers[k]
    return [source], planes


def _segment_description(
    number: int, segment: SegmentDescription, algorithm: hd.AlgorithmIdentificationSequence
) -> hd.seg.SegmentDescription:
    algorithm_type = hd.seg.SegmentAlgorithmTypeValues(segment.algorithm_type)
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=_lo(segment.name),
        segmented_property_category=_coded(segment.category),
        segmented_property_type=_coded(segment.type),
        algorithm_type=algorithm_type,
        algorithm_identification=None if algorithm_type == hd.seg.SegmentAlgorithmTypeValues.MANUAL else algorithm,
        display_color=hd.color.CIELabColor.from_rgb(*segment.color),
    )


def _content_description(model: ModelInfo) -> str:
    """Content Description (LO): the model and version, and a plain warning for demonstration models."""
    text = f"{model.name} {model.version}"
    if model.demonstration:
        text = f"DEMO, not for diagnosis: {text}"
    return _lo(text)


def _coded(code: Code) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=_lo(code.meaning))


@dataclass(frozen=True)
class SegmentMask:
    """One segment of a SEG read back: its description and a mask per referenced source frame."""

    number: int
    label: str
    property_type: Code
    frames: dict[tuple[str, int | None], np.ndarray]  # (SOP Instance UID, frame number or None) → float32 mask


def read_segmentation(ds: pydicom.Dataset) -> list[SegmentMask]:
    """Read any DICOM SEG (ours or another tool's; BINARY or FRACTIONAL, overlapping segments allowed) into
    per-segment masks keyed by the source frame each SEG frame is derived from. Fractional values are
    scaled to 0..1. Raises ValueError with a reason for a SEG we cannot place on its sources."""
    seg = hd.seg.Segmentation.from_dataset(ds, copy=False)
    fractional = seg.segmentation_type == hd.seg.SegmentationTypeValues.FRACTIONAL
    scale = float(getattr(ds, "MaximumFractionalValue", 255)) if fractional else 1.0
    pixels = ds.pixel_array.reshape(int(ds.get("NumberOfFrames", 1)), ds.Rows, ds.Columns)
    out: dict[int, SegmentMask] = {}
    for item in seg.SegmentSequence:
        prop = item.SegmentedPropertyTypeCodeSequence[0]
        out[int(item.SegmentNumber)] = SegmentMask(
            number=int(item.SegmentNumber), label=str(item.SegmentLabel),
            property_type=Code(prop.CodeValue, prop.CodingSchemeDesignator, prop.CodeMeaning), frames={})
    shared = ds.get("SharedFunctionalGroupsSequence")
    shared_segment = (shared[0].SegmentIdentificationSequence[0].ReferencedSegmentNumber
                      if shared and "SegmentIdentificationSequence" in shared[0] else None)
    for index, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
        # per frame, or once in the shared groups when every frame belongs to the same (single) segment
        number = int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber
                     if "SegmentIdentificationSequence" in frame else shared_segment)
        try:
            source = frame.DerivationImageSequence[0].SourceImageSequence[0]
        except (AttributeError, IndexError):
            raise ValueError(f"SEG frame {index + 1} does not say which source image it is derived from") from None
        key = (str(source.ReferencedSOPInstanceUID),
               int(source.ReferencedFrameNumber) if "ReferencedFrameNumber" in source else None)
        out[number].frames[key] = pixels[index].astype(np.float32) / scale
    return list(out.values())
