"""DICOM series → Volume: slice order, affine, multi-frame, decoding and the inputs we refuse."""

from __future__ import annotations

import copy
import random
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.valuerep import DSfloat

from inference.volume import (
    SourceFrame,
    UnsupportedInput,
    Volume,
    VolumeError,
    read_instance,
    volume_from_datasets,
    volume_from_files,
)


def _series_paths(shared_data: Path, name: str) -> list[Path]:
    return sorted((shared_data / "mr_brain" / name).glob("*.dcm"))


@pytest.fixture(scope="module")
def hfs_datasets(shared_data: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(path) for path in _series_paths(shared_data, "siemens_t1_fl2d_sag_HFS")]


def _copies(datasets: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """Deep copies: a shallow copy shares data elements, so editing it would edit the module fixture."""
    return [copy.deepcopy(ds) for ds in datasets]


def _normal(ds: pydicom.Dataset) -> np.ndarray:
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    return np.cross(iop[:3], iop[3:])


def _assert_affine_matches_headers(volume: Volume, datasets: dict[str, pydicom.Dataset]) -> None:
    """Voxel (0, 0, k) lands on slice k's Image Position; i and j run along the IOP row/column cosines."""
    for k, frame in enumerate(volume.frames):
        ds = datasets[frame.sop_instance_uid]
        position = np.array([float(v) for v in ds.ImagePositionPatient])
        np.testing.assert_allclose(volume.affine @ [0, 0, k, 1], [*position, 1], atol=1e-4)
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
        np.testing.assert_allclose(volume.affine[:3, 0], iop[:3] * column_spacing, atol=1e-9)
        np.testing.assert_allclose(volume.affine[:3, 1], iop[3:] * row_spacing, atol=1e-9)
        # an arbitrary in-plane voxel, by the formula of PS3.3 C.7.6.2.1.1
        expected = position + iop[:3] * column_spacing * 17 + iop[3:] * row_spacing * 5
        np.testing.assert_allclose((volume.affine @ [17, 5, k, 1])[:3], expected, atol=1e-4)


# --- slice order and geometry -------------------------------------------------------------------


def test_slices_sorted_along_normal_whatever_the_file_order(shared_data: Path) -> None:
    paths = _series_paths(shared_data, "siemens_t1_fl2d_sag_HFS")
    reference = volume_from_files(paths)
    shuffled = list(paths)
    random.Random(7).shuffle(shuffled)
    volume = volume_from_files(shuffled)

    assert volume.frames == reference.frames
    np.testing.assert_array_equal(volume.array, reference.array)
    np.testing.assert_array_equal(volume.affine, reference.affine)
    by_uid = {ds.SOPInstanceUID: ds for ds in volume.datasets}
    normal = _normal(volume.datasets[0])
    along_normal = [
        float(np.dot([float(v) for v in by_uid[f.sop_instance_uid].ImagePositionPatient], normal))
        for f in volume.frames
    ]
    assert np.all(np.diff(along_normal) > 0)


def test_instance_number_is_ignored(hfs_datasets: list[pydicom.Dataset]) -> None:
    reference = volume_from_datasets(hfs_datasets)
    reversed_numbers = _copies(hfs_datasets)
    for ds in reversed_numbers:
        ds.InstanceNumber = len(reversed_numbers) + 1 - int(ds.InstanceNumber)
    random.Random(3).shuffle(reversed_numbers)

    volume = volume_from_datasets(reversed_numbers)

    assert volume.frames == reference.frames
    np.testing.assert_array_equal(volume.array, reference.array)


@pytest.mark.parametrize("series", ["siemens_t1_fl2d_sag_HFS", "siemens_t1_fl2d_sag_HFDR"])
def test_affine_maps_voxels_to_patient_positions(shared_data: Path, series: str) -> None:
    datasets = [pydicom.dcmread(path) for path in _series_paths(shared_data, series)]
    volume = volume_from_datasets(datasets)

    assert volume.shape == (35, 256, 256)
    assert volume.array.dtype == np.float32
    assert volume.spacing == pytest.approx((4.8, 1.015625, 1.015625), abs=1e-5)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in datasets}
    _assert_affine_matches_headers(volume, by_uid)
    for k in (0, 17, 34):  # pixels belong to the frame named as their source
        source = by_uid[volume.frames[k].sop_instance_uid]
        np.testing.assert_array_equal(volume.array[k], source.pixel_array.astype(np.float32))
    assert all(f.frame_number is None and f.sop_class_uid == pydicom.uid.MRImageStorage for f in volume.frames)
    assert volume.series_instance_uid == datasets[0].SeriesInstanceUID
    assert volume.study_instance_uid == datasets[0].StudyInstanceUID
    assert volume.frame_of_reference_uid == datasets[0].FrameOfReferenceUID
    assert volume.modality == "MR"


def test_synthetic_oblique_series_round_trips(shared_data: Path) -> None:
    """An oblique stack built from MR_small: rotated IOP, positions along the normal, files shuffled."""
    source = pydicom.dcmread(shared_data / "mr" / "MR_small.dcm")
    angle_a, angle_b = np.radians(25.0), np.radians(-40.0)
    rotation_x = np.array([[1, 0, 0], [0, np.cos(angle_a), -np.sin(angle_a)], [0, np.sin(angle_a), np.cos(angle_a)]])
    rotation_z = np.array([[np.cos(angle_b), -np.sin(angle_b), 0], [np.sin(angle_b), np.cos(angle_b), 0], [0, 0, 1]])
    rotation = rotation_z @ rotation_x
    iop = [DSfloat(v, auto_format=True) for v in (*rotation[:, 0], *rotation[:, 1])]
    row, column = np.array(iop[:3], dtype=float), np.array(iop[3:], dtype=float)
    normal = np.cross(row, column)
    origin = np.array([-12.5, 30.25, 7.0])
    pixels = source.pixel_array

    datasets = []
    for k in range(6):
        ds = copy.deepcopy(source)
        ds.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["oblique", str(k)])
        ds.ImageOrientationPatient = iop
        ds.ImagePositionPatient = [DSfloat(v, auto_format=True) for v in origin + 2.5 * k * normal]
        ds.InstanceNumber = 6 - k
        ds.PixelData = (pixels + 100 * k).astype(pixels.dtype).tobytes()
        datasets.append(ds)
    random.Random(1).shuffle(datasets)

    volume = volume_from_datasets(datasets)

    by_uid = {str(ds.SOPInstanceUID): ds for ds in datasets}
    _assert_affine_matches_headers(volume, by_uid)
    for k in range(6):
        np.testing.assert_array_equal(volume.array[k], (pixels + 100 * k).astype(np.float32))
    np.testing.assert_allclose(volume.affine[:3, 2], 2.5 * normal, atol=1e-5)
    np.testing.assert_allclose(volume.affine[:3, 0] / 0.3125, rotation[:, 0], atol=1e-9)
    assert volume.spacing == pytest.approx((2.5, 0.3125, 0.3125), abs=1e-5)


# --- multi-frame --------------------------------------------------------------------------------


def test_enhanced_ct_frames_sorted_and_rescaled(shared_data: Path) -> None:
    ds = pydicom.dcmread(shared_data / "ct" / "enhanced_ct_eCT_Supplemental.dcm")
    volume = volume_from_datasets([ds])

    # the normal of IOP [-1 0 0 0 1 0] is (0, 0, -1): frame 2 (z = -149) comes before frame 1 (z = -159)
    assert [f.frame_number for f in volume.frames] == [2, 1]
    assert {f.sop_instance_uid for f in volume.frames} == {ds.SOPInstanceUID}
    stored = ds.pixel_array
    for k, frame in enumerate(volume.frames):
        item = ds.PerFrameFunctionalGroupsSequence[frame.frame_number - 1]
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(volume.affine @ [0, 0, k, 1], [*position, 1], atol=1e-4)
        np.testing.assert_array_equal(volume.array[k], stored[frame.frame_number - 1].astype(np.float32) - 1024)
    assert volume.spacing == pytest.approx((10.0, 0.388672, 0.388672))
    assert len(volume.datasets) == 1 and "PixelData" not in volume.datasets[0]


def test_enhanced_mr_functional_groups(enhanced_mr: pydicom.Dataset) -> None:
    volume = volume_from_datasets([enhanced_mr])

    positions = [
        float(item.PlanePositionSequence[0].ImagePositionPatient[1])
        for item in enhanced_mr.PerFrameFunctionalGroupsSequence
    ]
    expected_frames = [int(i) + 1 for i in np.argsort(positions)]
    assert [f.frame_number for f in volume.frames] == expected_frames
    assert all(f.sop_class_uid == pydicom.uid.EnhancedMRImageStorage for f in volume.frames)
    stored = enhanced_mr.pixel_array
    for k, frame in enumerate(volume.frames):
        item = enhanced_mr.PerFrameFunctionalGroupsSequence[frame.frame_number - 1]
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(volume.affine @ [0, 0, k, 1], [*position, 1], atol=1e-6)
        np.testing.assert_array_equal(volume.array[k], stored[frame.frame_number - 1].astype(np.float32) * 2 - 10)
    assert volume.spacing == pytest.approx((1.2, 0.9, 0.8))
    np.testing.assert_allclose(volume.affine[:3, :3], [[0.8, 0, 0], [0, 0, 1.2], [0, -0.9, 0]], atol=1e-9)


def test_enhanced_mr_per_frame_orientation_and_measures(enhanced_mr: pydicom.Dataset) -> None:
    """Functional groups that are per-frame instead of shared are read as well."""
    shared = enhanced_mr.SharedFunctionalGroupsSequence[0]
    for item in enhanced_mr.PerFrameFunctionalGroupsSequence:
        item.PlaneOrientationSequence = shared.PlaneOrientationSequence
        item.PixelMeasuresSequence = shared.PixelMeasuresSequence
    del enhanced_mr.SharedFunctionalGroupsSequence

    volume = volume_from_datasets([enhanced_mr])

    assert volume.spacing == pytest.approx((1.2, 0.9, 0.8))
    np.testing.assert_array_equal(volume.array[0], enhanced_mr.pixel_array[volume.frames[0].frame_number - 1])


def test_multi_frame_without_functional_groups_is_refused(shared_data: Path) -> None:
    """The stored emri_small sample lost its functional groups: its frames cannot be placed."""
    with pytest.raises(VolumeError, match="functional groups"):
        volume_from_files([shared_data / "mr" / "enhanced_mr_emri_small.dcm"])


# --- decoding, single slices, files -------------------------------------------------------------


def test_jpeg_lossless_ct_decodes_to_hounsfield_units(shared_data: Path) -> None:
    path = shared_data / "ct" / "WG04_CT1_JPLL.dcm"
    volume = volume_from_files([path])

    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID.is_compressed
    assert volume.shape == (1, 512, 512)
    assert volume.array.dtype == np.float32
    expected = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(volume.array[0], expected)
    assert -1100 < float(np.median(volume.array[0, 0:10, 236:276])) < -900  # air in front of the chest


def test_single_slice_uses_slice_thickness(shared_data: Path) -> None:
    volume = volume_from_files([shared_data / "mr" / "MR_small.dcm"])
    ds = pydicom.dcmread(shared_data / "mr" / "MR_small.dcm")
    assert volume.shape == (1, 64, 64)
    assert volume.frames == [SourceFrame(ds.SOPInstanceUID, ds.SOPClassUID, None)]
    assert volume.spacing[0] == pytest.approx(float(ds.SliceThickness))
    np.testing.assert_allclose(volume.affine[:3, 2] / volume.spacing[0], _normal(ds), atol=1e-9)


def test_single_slice_refused_when_model_needs_more(shared_data: Path) -> None:
    with pytest.raises(UnsupportedInput, match="has 1 slice; this model needs at least 2"):
        volume_from_datasets([pydicom.dcmread(shared_data / "mr" / "MR_small.dcm")], min_slices=2)


@pytest.mark.parametrize(
    ("relative", "fraction"),
    [
        ("mr_brain/siemens_t1_fl2d_sag_HFS/0001_1.3.12.2.1107.5.2.43.67060.2022040715053454597060816.dcm", 0.5),
        ("mr_brain/siemens_t1_fl2d_sag_HFS/0001_1.3.12.2.1107.5.2.43.67060.2022040715053454597060816.dcm", 0.9),
        ("ct/WG04_CT1_JPLL.dcm", 0.7),  # ends inside encapsulated Pixel Data
    ],
)
def test_truncated_file_is_named(shared_data: Path, tmp_path: Path, relative: str, fraction: float) -> None:
    path = tmp_path / "cut.dcm"
    shutil.copy(shared_data / relative, path)
    with path.open("r+b") as handle:
        handle.truncate(int(path.stat().st_size * fraction))

    with pytest.raises(VolumeError, match="cut.dcm") as raised:
        volume_from_files([path])
    assert "truncated" in str(raised.value)
    assert not isinstance(raised.value, UnsupportedInput)


def test_unreadable_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not DICOM")
    with pytest.raises(VolumeError, match="notes.txt"):
        read_instance(path)


def test_source_datasets_keep_their_pixels_and_volume_copies_drop_them(hfs_datasets: list[pydicom.Dataset]) -> None:
    volume = volume_from_datasets(hfs_datasets)
    assert all("PixelData" not in ds for ds in volume.datasets)
    assert all("PixelData" in ds for ds in hfs_datasets)
    assert all(getattr(ds, "_pixel_array", None) is None for ds in hfs_datasets)  # nothing decoded is cached
    assert [ds.SOPInstanceUID for ds in volume.datasets] == [f.sop_instance_uid for f in volume.frames]
    assert volume.datasets[0].PatientPosition == "HFS"


# --- what we refuse -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("relative", "sop_class_name"),
    [
        ("sr/dcmtk_test-SR.dcm", "Comprehensive SR Storage"),
        ("sr/highdicom_sr_tid1500.dcm", "Comprehensive 3D SR Storage"),
        ("pdf/orthanc_sample-pdf.dcm", "Encapsulated PDF Storage"),
        ("seg/highdicom_seg_image_ct_binary.dcm", "Segmentation Storage"),
    ],
)
def test_non_image_objects_are_unsupported(shared_data: Path, relative: str, sop_class_name: str) -> None:
    with pytest.raises(UnsupportedInput, match=sop_class_name):
        volume_from_files([shared_data / relative])


def test_missing_pixel_data_is_unsupported(hfs_datasets: list[pydicom.Dataset]) -> None:
    ds = _copies(hfs_datasets[:1])[0]
    del ds.PixelData
    with pytest.raises(UnsupportedInput, match="no Pixel Data"):
        volume_from_datasets([ds])


def test_colour_image_is_unsupported(shared_data: Path) -> None:
    ds = pydicom.dcmread(shared_data / "mr" / "MR_small.dcm")
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    with pytest.raises(UnsupportedInput, match="colour"):
        volume_from_datasets([ds])


def test_projection_image_without_plane_geometry_is_unsupported(shared_data: Path) -> None:
    with pytest.raises(UnsupportedInput, match="Image Position"):
        volume_from_files([shared_data / "dx" / "highdicom_dx_chest.dcm"])


def test_mixed_series_is_refused(hfs_datasets: list[pydicom.Dataset], shared_data: Path) -> None:
    other = pydicom.dcmread(_series_paths(shared_data, "siemens_t1_fl2d_sag_HFDR")[0])
    with pytest.raises(VolumeError, match="SeriesInstanceUID|StudyInstanceUID|FrameOfReferenceUID"):
        volume_from_datasets([*hfs_datasets[:3], other])


def test_mixed_orientation_is_refused(hfs_datasets: list[pydicom.Dataset]) -> None:
    datasets = _copies(hfs_datasets[:5])
    datasets[2].ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    with pytest.raises(VolumeError, match="orientations"):
        volume_from_datasets(datasets)


def test_mixed_image_sizes_are_refused(shared_data: Path) -> None:
    datasets = [pydicom.dcmread(p) for p in sorted((shared_data / "ct" / "pydicom_CT2_series").glob("*.dcm"))]
    datasets[1].Rows = 8
    with pytest.raises(VolumeError, match="image sizes"):
        volume_from_datasets(datasets)


def test_duplicate_positions_are_refused(hfs_datasets: list[pydicom.Dataset]) -> None:
    datasets = _copies(hfs_datasets[:5])
    datasets[3].ImagePositionPatient = datasets[1].ImagePositionPatient
    with pytest.raises(VolumeError, match="same position"):
        volume_from_datasets(datasets)


def test_missing_slice_is_refused(hfs_datasets: list[pydicom.Dataset]) -> None:
    with pytest.raises(VolumeError, match="slice is probably missing"):
        volume_from_datasets([*hfs_datasets[:10], *hfs_datasets[11:20]])


def test_real_series_with_a_gap_is_refused_and_its_regular_part_accepted(shared_data: Path) -> None:
    """pydicom's CT2 series: one slice 200 mm away from three 1.25 mm-spaced ones."""
    paths = sorted((shared_data / "ct" / "pydicom_CT2_series").glob("*.dcm"))
    with pytest.raises(VolumeError, match="unevenly spaced"):
        volume_from_files(paths)
    regular = [p for p in paths if float(pydicom.dcmread(p).ImagePositionPatient[2]) > 0]
    volume = volume_from_files(regular)
    assert volume.shape == (3, 16, 16)
    assert volume.spacing[0] == pytest.approx(1.25, abs=1e-4)
    first = next(ds for ds in map(pydicom.dcmread, regular) if ds.SOPInstanceUID == volume.frames[0].sop_instance_uid)
    np.testing.assert_array_equal(volume.array[0], first.pixel_array.astype(np.float32) - 1024)  # rescale applied


def test_no_datasets_is_an_error() -> None:
    with pytest.raises(VolumeError):
        volume_from_datasets([])
