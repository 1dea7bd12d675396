"""SEG writer: frames map to the exact source frames, masks survive a round trip, identity is honest."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from inference import __version__
from inference.models.base import Code, ModelInfo, SegmentDescription
from inference.results.identity import MANUFACTURER, derived_uid, series_description
from inference.results.seg import write_segmentation
from inference.volume import Volume, volume_from_datasets, volume_from_files

SEGMENTS = (
    SegmentDescription(
        label=1,
        name="Brain",
        category=Code("123037004", "SCT", "Anatomical Structure"),
        type=Code("12738006", "SCT", "Brain"),
        color=(255, 80, 0),
    ),
    SegmentDescription(  # never present in the label maps below except where a test says so
        label=4,
        name="Lesion",
        category=Code("49755003", "SCT", "Morphologically Altered Structure"),
        type=Code("52988006", "SCT", "Lesion"),
        color=(0, 160, 255),
    ),
)
MODEL = ModelInfo(
    id="test-brain-seg",
    name="Test brain segmentation",
    version="1.2.3",
    task="segmentation",
    modality="MR",
    segments=SEGMENTS,
)


@pytest.fixture(scope="module")
def hfs_volume(shared_data: Path) -> Volume:
    return volume_from_files(sorted((shared_data / "mr_brain" / "siemens_t1_fl2d_sag_HFS").glob("*.dcm")))


def _cube_labels(volume: Volume) -> np.ndarray:
    """Label 1 in an off-centre box (so a flipped or shifted mask would not match); label 4 nowhere."""
    labels = np.zeros(volume.shape, dtype=np.uint8)
    s, r, c = volume.shape
    labels[s // 4 : s // 2, r // 3 : r // 2, c // 5 : c // 2] = 1
    return labels


def _write(volume: Volume, labels: np.ndarray, path: Path, model: ModelInfo = MODEL, **kwargs) -> pydicom.Dataset:
    seg = write_segmentation(
        volume,
        labels,
        SEGMENTS,
        model,
        series_instance_uid=derived_uid(volume.series_instance_uid, model.id, "series"),
        sop_instance_uid=derived_uid(volume.series_instance_uid, model.id, "instance"),
        **kwargs,
    )
    seg.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path)


def _mask_from_frames(seg: pydicom.Dataset, volume: Volume) -> np.ndarray:
    """(slices, rows, columns, segments) rebuilt only from each SEG frame's own source reference."""
    slice_of = {(f.sop_instance_uid, f.frame_number): k for k, f in enumerate(volume.frames)}
    multi_frame = volume.frames[0].frame_number is not None
    mask = np.zeros((*volume.shape, len(seg.SegmentSequence)), dtype=np.uint8)
    seen = np.zeros((volume.shape[0], len(seg.SegmentSequence)), dtype=int)
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), seg.Rows, seg.Columns)
    for index, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        source = item.DerivationImageSequence[0].SourceImageSequence[0]
        frame_number = int(source.ReferencedFrameNumber) if multi_frame else None
        k = slice_of[(source.ReferencedSOPInstanceUID, frame_number)]
        segment = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        mask[k, :, :, segment - 1] = pixels[index]
        seen[k, segment - 1] += 1
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(position, (volume.affine @ [0, 0, k, 1])[:3], atol=1e-3)
    assert (seen == 1).all(), "every source frame must have exactly one SEG frame per segment"
    return mask


def _dciodvfy_errors(path: Path) -> list[str]:
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


# --- the HFS brain series -----------------------------------------------------------------------


def test_seg_round_trip_on_brain_series(hfs_volume: Volume, tmp_path: Path) -> None:
    labels = _cube_labels(hfs_volume)
    seg = _write(hfs_volume, labels, tmp_path / "seg.dcm")

    assert seg.SOPClassUID == pydicom.uid.SegmentationStorage
    assert seg.SegmentationType == "BINARY"
    assert int(seg.NumberOfFrames) == hfs_volume.shape[0] * len(SEGMENTS)
    mask = _mask_from_frames(seg, hfs_volume)
    np.testing.assert_array_equal(mask[..., 0], labels == 1)
    assert not mask[..., 1].any()

    # highdicom's own reader agrees, per source instance
    read = hd.seg.segread(tmp_path / "seg.dcm")
    uids = [f.sop_instance_uid for f in hfs_volume.frames]
    by_source = read.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1, 2])
    np.testing.assert_array_equal(by_source[..., 0], labels == 1)
    referenced_series = seg.ReferencedSeriesSequence[0]
    assert referenced_series.SeriesInstanceUID == hfs_volume.series_instance_uid
    assert {item.ReferencedSOPInstanceUID for item in referenced_series.ReferencedInstanceSequence} == set(uids)


def test_seg_identity_and_display(hfs_volume: Volume, tmp_path: Path) -> None:
    seg = _write(hfs_volume, _cube_labels(hfs_volume), tmp_path / "seg.dcm")

    assert seg.SeriesDescription == "AI Test brain segmentation"
    assert seg.Manufacturer == MANUFACTURER
    assert seg.ManufacturerModelName == MODEL.id
    assert "test-brain-seg 1.2.3" in seg.SoftwareVersions and f"orthanc-ai {__version__}" in seg.SoftwareVersions
    assert seg.DeviceSerialNumber
    assert seg.StudyInstanceUID == hfs_volume.study_instance_uid
    assert seg.FrameOfReferenceUID == hfs_volume.frame_of_reference_uid
    assert seg.SeriesNumber == 9001
    assert seg.ContentLabel == "AI_SEG"
    assert "Test brain segmentation" in seg.ContentDescription

    for number, (item, segment) in enumerate(zip(seg.SegmentSequence, SEGMENTS, strict=True), start=1):
        assert item.SegmentNumber == number
        assert item.SegmentLabel == segment.name
        assert item.SegmentedPropertyCategoryCodeSequence[0].CodeValue == segment.category.value
        assert item.SegmentedPropertyTypeCodeSequence[0].CodeValue == segment.type.value
        assert item.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
        assert tuple(item.RecommendedDisplayCIELabValue) == hd.color.CIELabColor.from_rgb(*segment.color).value
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        assert item.SegmentAlgorithmName == MODEL.name
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == MODEL.name and algorithm.AlgorithmVersion == MODEL.version
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"  # Artificial Intelligence

    ours = [item for item in seg.ContributingEquipmentSequence if item.Manufacturer == MANUFACTURER]
    assert len(ours) == 1
    assert ours[0].ManufacturerModelName == MODEL.id and ours[0].SoftwareVersions == MODEL.version
    assert ours[0].PurposeOfReferenceCodeSequence[0].CodeValue == "109102"  # Processing Equipment


def test_demonstration_model_says_so(hfs_volume: Volume, tmp_path: Path) -> None:
    demo = ModelInfo(**{**MODEL.__dict__, "demonstration": True})
    labels = _cube_labels(hfs_volume)
    seg = _write(hfs_volume, labels, tmp_path / "seg.dcm", model=demo, series_description="Brain mask")

    assert seg.SeriesDescription == "AI DEMO Brain mask"
    assert "DEMO" in seg.ContentDescription and "not for diagnosis" in seg.ContentDescription
    ours = next(item for item in seg.ContributingEquipmentSequence if item.Manufacturer == MANUFACTURER)
    assert "not for diagnosis" in ours.ContributionDescription
    assert seg.ContentLabel == "AI_DEMO_SEG"


def test_series_description_always_starts_with_ai() -> None:
    assert series_description("AI Liver") == "AI Liver"
    assert series_description("Liver", demonstration=True) == "AI DEMO Liver"
    assert series_description("x" * 100).startswith("AI ") and len(series_description("x" * 100)) == 64


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian package dicom3tools) is not installed")
def test_seg_passes_dciodvfy(hfs_volume: Volume, tmp_path: Path) -> None:
    path = tmp_path / "seg.dcm"
    _write(hfs_volume, _cube_labels(hfs_volume), path)
    assert _dciodvfy_errors(path) == []


def test_undescribed_labels_and_wrong_shape_are_refused(hfs_volume: Volume) -> None:
    uids = {"series_instance_uid": derived_uid("x", "1"), "sop_instance_uid": derived_uid("x", "2")}
    labels = _cube_labels(hfs_volume)
    labels[0, 0, 0] = 9
    with pytest.raises(ValueError, match=r"\[9\]"):
        write_segmentation(hfs_volume, labels, SEGMENTS, MODEL, **uids)
    with pytest.raises(ValueError, match="shape"):
        write_segmentation(hfs_volume, labels[:-1], SEGMENTS, MODEL, **uids)
    with pytest.raises(TypeError, match="integers"):
        write_segmentation(hfs_volume, labels.astype(np.float32), SEGMENTS, MODEL, **uids)


# --- multi-frame sources ------------------------------------------------------------------------


def test_seg_on_enhanced_mr_references_exact_frames(enhanced_mr: pydicom.Dataset, tmp_path: Path) -> None:
    volume = volume_from_datasets([enhanced_mr])
    labels = np.zeros(volume.shape, dtype=np.uint8)
    labels[2:6, 10:30, 20:50] = 1
    labels[7, 40:50, 5:15] = 4
    seg = _write(volume, labels, tmp_path / "seg.dcm")

    assert int(seg.NumberOfFrames) == volume.shape[0] * len(SEGMENTS)
    mask = _mask_from_frames(seg, volume)
    np.testing.assert_array_equal(mask[..., 0], labels == 1)
    np.testing.assert_array_equal(mask[..., 1], labels == 4)
    if shutil.which("dciodvfy"):
        assert _dciodvfy_errors(tmp_path / "seg.dcm") == []


def test_seg_on_enhanced_ct(shared_data: Path, tmp_path: Path) -> None:
    volume = volume_from_files([shared_data / "ct" / "enhanced_ct_eCT_Supplemental.dcm"])
    labels = np.zeros(volume.shape, dtype=np.uint8)
    labels[1, 100:300, 200:260] = 1  # only in the second slice, which is frame 1 of the source
    seg = _write(volume, labels, tmp_path / "seg.dcm")

    mask = _mask_from_frames(seg, volume)
    np.testing.assert_array_equal(mask[..., 0], labels == 1)
    assert volume.frames[1].frame_number == 1


# --- UIDs ---------------------------------------------------------------------------------------


def test_derived_uid_is_deterministic_and_valid() -> None:
    uid = derived_uid("1.2.3", "model", "seg")
    assert uid == derived_uid("1.2.3", "model", "seg")
    assert uid != derived_uid("1.2.3", "model", "sr")
    assert derived_uid("ab", "c") != derived_uid("a", "bc")
    assert re.fullmatch(r"2\.25\.(0|[1-9][0-9]*)", uid) and len(uid) <= 64
    assert pydicom.uid.UID(uid).is_valid


@pytest.mark.parametrize("name,segments,fractional", [
    ("highdicom_seg_image_ct_binary.dcm", 1, False),
    ("highdicom_seg_image_ct_binary_overlap.dcm", 2, False),
    ("highdicom_seg_image_ct_binary_fractional.dcm", 1, True),
    ("highdicom_seg_image_ct_true_fractional.dcm", 1, True),
])
def test_read_segmentation_of_other_tools(shared_data, name, segments, fractional):
    """SEGs written by highdicom's own test suite, on the CT2 series, read back by our reader."""
    from inference.results.seg import read_segmentation
    ds = pydicom.dcmread(shared_data / "seg" / name)
    masks = read_segmentation(ds)
    assert len(masks) == segments
    ct_uids = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
               for p in (shared_data / "ct" / "pydicom_CT2_series").glob("*.dcm")}
    for mask in masks:
        assert mask.frames and {uid for uid, _ in mask.frames} <= ct_uids
        values = np.concatenate([m.ravel() for m in mask.frames.values()])
        assert values.max() > 0 and values.min() >= 0 and values.max() <= 1
        if not fractional:
            assert set(np.unique(values)) <= {0.0, 1.0}


def test_read_segmentation_round_trips_our_seg(hfs_volume, tmp_path):
    from inference.results.seg import read_segmentation
    labels = _cube_labels(hfs_volume)
    masks = read_segmentation(_write(hfs_volume, labels, tmp_path / "seg.dcm"))
    mask = masks[0]
    for k, frame in enumerate(hfs_volume.frames):
        assert np.array_equal(mask.frames[(frame.sop_instance_uid, None)] > 0.5, labels[k] == 1)


def test_read_segmentation_of_a_single_segment_seg(hfs_volume, tmp_path):
    """highdicom puts a lone segment's identification in the shared functional groups."""
    from inference.results.seg import read_segmentation
    labels = (_cube_labels(hfs_volume) == SEGMENTS[0].label).astype(np.uint8)
    ds = write_segmentation(hfs_volume, labels, SEGMENTS[:1], MODEL, series_instance_uid=derived_uid("1", "s"),
                            sop_instance_uid=derived_uid("1", "i"))
    ds.save_as(tmp_path / "one.dcm", enforce_file_format=True)
    (mask,) = read_segmentation(pydicom.dcmread(tmp_path / "one.dcm"))
    for k, frame in enumerate(hfs_volume.frames):
        assert np.array_equal(mask.frames[(frame.sop_instance_uid, None)] > 0.5, labels[k] == 1)
