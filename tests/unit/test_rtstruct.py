"""RT Structure Set writer: contours lie on their source planes, name their source images, and re-rasterise
to the label map; the object is valid DICOM; structure sets written by others are read."""

from __future__ import annotations

import copy
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.valuerep import DSfloat

from inference import __version__
from inference.models.base import Code, ModelInfo, SegmentDescription
from inference.results.identity import MANUFACTURER, derived_uid
from inference.results.rtstruct import contours_to_mask, read_rois, write_rt_structure_set
from inference.volume import Volume, volume_from_datasets, volume_from_files

ANATOMY = Code("123037004", "SCT", "Anatomical Structure")
ALTERED = Code("49755003", "SCT", "Morphologically Altered Structure")
SEGMENTS = (
    SegmentDescription(1, "Blob", ANATOMY, Code("12738006", "SCT", "Brain"), (255, 80, 0)),
    SegmentDescription(2, "Islands", ALTERED, Code("52988006", "SCT", "Lesion"), (0, 160, 255)),
    SegmentDescription(3, "Sphere", ANATOMY, Code("89837001", "SCT", "Urinary bladder"), (20, 200, 20)),
    SegmentDescription(5, "Nothing", ALTERED, Code("52988006", "SCT", "Lesion"), (200, 200, 0)),  # never present
)
MODEL = ModelInfo(
    id="test-contours", name="Test contouring", version="2.0.1", task="segmentation", modality="MR", segments=SEGMENTS
)
HOLE_SLICE, NESTED_SLICE, ISLANDS_SLICE = 10, 12, 20


def _disk(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    rows, columns = np.ogrid[: shape[0], : shape[1]]
    return (rows - centre[0]) ** 2 + (columns - centre[1]) ** 2 <= radius**2


def _sphere(volume: Volume, centre_index: tuple[float, float, float], radius_mm: float) -> np.ndarray:
    """Voxels whose centres lie within ``radius_mm`` of the centre, measured in patient space."""
    k, j, i = np.meshgrid(*(np.arange(n) for n in volume.shape), indexing="ij")
    points = np.stack([i, j, k, np.ones_like(i)], axis=-1).astype(np.float64) @ volume.affine.T
    centre = volume.affine @ [centre_index[2], centre_index[1], centre_index[0], 1.0]
    return np.linalg.norm(points[..., :3] - centre[:3], axis=-1) <= radius_mm


def _brain_labels(volume: Volume) -> np.ndarray:
    """A blob with a hole (and, on one slice, an island in the hole), two islands on one slice, a sphere."""
    labels = np.zeros(volume.shape, dtype=np.uint8)
    plane = volume.shape[1:]
    for k in (HOLE_SLICE, HOLE_SLICE + 1, NESTED_SLICE):
        labels[k][_disk(plane, (60, 70), 25) & ~_disk(plane, (62, 72), 9)] = 1
    labels[NESTED_SLICE][_disk(plane, (62, 72), 3)] = 1
    labels[ISLANDS_SLICE, 30:45, 150:170] = 2
    labels[ISLANDS_SLICE, 60:70, 200:230] = 2
    labels[_sphere(volume, (17, 150, 110), 30.0)] = 3
    return labels


def _write(volume: Volume, labels: np.ndarray, path: Path, model: ModelInfo = MODEL, **kwargs) -> pydicom.Dataset:
    ds = write_rt_structure_set(
        volume,
        labels,
        SEGMENTS,
        model,
        series_instance_uid=derived_uid(volume.series_instance_uid, model.id, "rtstruct series"),
        sop_instance_uid=derived_uid(volume.series_instance_uid, model.id, "rtstruct"),
        **kwargs,
    )
    ds.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def _source_planes(datasets: list[pydicom.Dataset]) -> dict[tuple[str, int | None], tuple[np.ndarray, np.ndarray]]:
    """(SOP Instance UID, frame number) → (Image Position (Patient), unit normal), read from the headers."""
    planes = {}
    for ds in datasets:
        if "PerFrameFunctionalGroupsSequence" in ds:
            iop = ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
            for number, item in enumerate(ds.PerFrameFunctionalGroupsSequence, start=1):
                ipp = item.PlanePositionSequence[0].ImagePositionPatient
                planes[(str(ds.SOPInstanceUID), number)] = (ipp, iop)
        else:
            planes[(str(ds.SOPInstanceUID), None)] = (ds.ImagePositionPatient, ds.ImageOrientationPatient)
    result = {}
    for key, (ipp, iop) in planes.items():
        normal = np.cross(np.array(iop[:3], dtype=float), np.array(iop[3:], dtype=float))
        result[key] = (np.array(ipp, dtype=float), normal / np.linalg.norm(normal))
    return result


def _assert_on_referenced_planes(rtstruct: pydicom.Dataset, volume: Volume, datasets: list[pydicom.Dataset]) -> None:
    """Every point of every contour lies on the plane of the image its Contour Image Sequence names."""
    planes = _source_planes(datasets)
    checked = 0
    for roi in rtstruct.ROIContourSequence:
        for contour in roi.get("ContourSequence", []):
            image = contour.ContourImageSequence[0]
            frame = int(image.ReferencedFrameNumber) if "ReferencedFrameNumber" in image else None
            position, normal = planes[(image.ReferencedSOPInstanceUID, frame)]
            points = np.array(contour.ContourData, dtype=float).reshape(-1, 3)
            assert len(points) == int(contour.NumberOfContourPoints)
            assert np.max(np.abs((points - position) @ normal)) < 0.01
            checked += 1
    assert checked > 0


def _referenced_slices(rtstruct: pydicom.Dataset, volume: Volume, roi_index: int) -> list[int]:
    """Slice index of each contour of an ROI, from its Contour Image reference alone."""
    slice_of = {(f.sop_instance_uid, f.frame_number): k for k, f in enumerate(volume.frames)}
    slices = []
    for contour in rtstruct.ROIContourSequence[roi_index].ContourSequence:
        image = contour.ContourImageSequence[0]
        frame = int(image.ReferencedFrameNumber) if "ReferencedFrameNumber" in image else None
        slices.append(slice_of[(image.ReferencedSOPInstanceUID, frame)])
    return slices


def _dciodvfy_errors(path: Path) -> list[str]:
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


needs_dciodvfy = pytest.mark.skipif(
    shutil.which("dciodvfy") is None, reason="dciodvfy (Debian package dicom3tools) is not installed"
)


# --- the real brain series ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def brain_datasets(shared_data: Path) -> list[pydicom.Dataset]:
    paths = sorted((shared_data / "mr_brain" / "siemens_t1_fl2d_sag_HFS").glob("*.dcm"))
    return [pydicom.dcmread(path, stop_before_pixels=True) for path in paths]


@pytest.fixture(scope="module")
def brain(shared_data: Path) -> Volume:
    return volume_from_files(sorted((shared_data / "mr_brain" / "siemens_t1_fl2d_sag_HFS").glob("*.dcm")))


@pytest.fixture(scope="module")
def brain_labels(brain: Volume) -> np.ndarray:
    return _brain_labels(brain)


@pytest.fixture(scope="module")
def brain_rtstruct(brain: Volume, brain_labels: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rtstruct") / "brain_rtstruct.dcm"
    _write(brain, brain_labels, path)
    return path


def test_contours_lie_on_their_source_slices(
    brain_rtstruct: Path, brain: Volume, brain_labels: np.ndarray, brain_datasets: list[pydicom.Dataset]
) -> None:
    rtstruct = pydicom.dcmread(brain_rtstruct)
    _assert_on_referenced_planes(rtstruct, brain, brain_datasets)
    for index, segment in enumerate(SEGMENTS[:3]):  # each contour names a slice where its segment is
        labelled = set(np.flatnonzero((brain_labels == segment.label).any(axis=(1, 2))).tolist())
        assert set(_referenced_slices(rtstruct, brain, index)) == labelled


def test_islands_and_holes_are_separate_closed_contours(brain_rtstruct: Path, brain: Volume) -> None:
    rtstruct = pydicom.dcmread(brain_rtstruct)
    blob_slices = _referenced_slices(rtstruct, brain, 0)
    assert blob_slices.count(HOLE_SLICE) == 2  # outer boundary and hole
    assert blob_slices.count(NESTED_SLICE) == 3  # outer boundary, hole, island in the hole
    assert _referenced_slices(rtstruct, brain, 1) == [ISLANDS_SLICE, ISLANDS_SLICE]
    for roi in rtstruct.ROIContourSequence[:3]:
        for number, contour in enumerate(roi.ContourSequence, start=1):
            assert contour.ContourGeometricType == "CLOSED_PLANAR"
            assert contour.ContourNumber == number
            points = np.array(contour.ContourData, dtype=float).reshape(-1, 3)
            assert not np.allclose(points[0], points[-1])  # closed implicitly, first point not repeated
            assert all(len(str(value)) <= 16 for value in contour.ContourData)


def test_contours_rasterise_back_to_the_label_map(
    brain_rtstruct: Path, brain: Volume, brain_labels: np.ndarray
) -> None:
    masks = contours_to_mask(pydicom.dcmread(brain_rtstruct), brain)

    assert sorted(masks) == [1, 2, 3, 4]
    for number, segment in enumerate(SEGMENTS[:3], start=1):
        assert _dice(masks[number], brain_labels == segment.label) >= 0.95, segment.name
    hole = _disk(brain.shape[1:], (62, 72), 7)
    assert not masks[1][HOLE_SLICE][hole].any()  # XOR keeps the hole empty
    assert masks[1][NESTED_SLICE][62, 72]  # ... and fills the island inside it
    assert not masks[4].any()


def test_structure_set_references_identity_and_empty_roi(
    brain_rtstruct: Path, brain: Volume, brain_datasets: list[pydicom.Dataset]
) -> None:
    ds = pydicom.dcmread(brain_rtstruct)
    source = brain_datasets[0]

    assert ds.SOPClassUID == pydicom.uid.RTStructureSetStorage and ds.Modality == "RTSTRUCT"
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.SeriesDescription == "AI Test contouring" and ds.SeriesNumber == 9002
    assert ds.Manufacturer == MANUFACTURER and ds.ManufacturerModelName == MODEL.id
    assert "test-contours 2.0.1" in ds.SoftwareVersions and f"orthanc-ai {__version__}" in ds.SoftwareVersions
    ours = ds.ContributingEquipmentSequence[0]
    assert ours.Manufacturer == MANUFACTURER and ours.ManufacturerModelName == MODEL.id
    assert ours.SoftwareVersions == MODEL.version and ours.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
    assert ds.StructureSetLabel == "AI_RTSTRUCT" and ds.StructureSetDate and ds.StructureSetTime
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate"):
        assert ds.get(keyword) == source.get(keyword), keyword
    assert ds.SeriesInstanceUID != brain.series_instance_uid
    assert ds.FrameOfReferenceUID == brain.frame_of_reference_uid

    frame_of_reference = ds.ReferencedFrameOfReferenceSequence[0]
    assert frame_of_reference.FrameOfReferenceUID == brain.frame_of_reference_uid
    study = frame_of_reference.RTReferencedStudySequence[0]
    assert study.ReferencedSOPInstanceUID == brain.study_instance_uid
    series = study.RTReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == brain.series_instance_uid
    assert [item.ReferencedSOPInstanceUID for item in series.ContourImageSequence] == [
        frame.sop_instance_uid for frame in brain.frames
    ]
    assert all(item.ReferencedSOPClassUID == pydicom.uid.MRImageStorage for item in series.ContourImageSequence)

    assert [item.ROINumber for item in ds.StructureSetROISequence] == [1, 2, 3, 4]
    assert [item.ROIName for item in ds.StructureSetROISequence] == [s.name for s in SEGMENTS]
    rois = ds.StructureSetROISequence
    assert all(item.ReferencedFrameOfReferenceUID == brain.frame_of_reference_uid for item in rois)
    assert all(item.ROIGenerationAlgorithm == "AUTOMATIC" for item in ds.StructureSetROISequence)
    assert [item.ReferencedROINumber for item in ds.ROIContourSequence] == [1, 2, 3, 4]
    assert [tuple(item.ROIDisplayColor) for item in ds.ROIContourSequence] == [s.color for s in SEGMENTS]
    assert "ContourSequence" not in ds.ROIContourSequence[3]  # the empty segment keeps its ROI, without contours
    observations = ds.RTROIObservationsSequence
    assert [item.ReferencedROINumber for item in observations] == [1, 2, 3, 4]
    assert [item.RTROIInterpretedType for item in observations] == ["ORGAN", "", "ORGAN", ""]
    assert observations[2].RTROIIdentificationCodeSequence[0].CodeValue == "89837001"


def test_demonstration_model_says_so(brain: Volume, brain_labels: np.ndarray, tmp_path: Path) -> None:
    demo = ModelInfo(**{**MODEL.__dict__, "demonstration": True})
    ds = _write(brain, brain_labels, tmp_path / "demo.dcm", model=demo, series_description="Contours")

    assert ds.SeriesDescription == "AI DEMO Contours"
    assert ds.StructureSetLabel == "AI_DEMO_RTSTRUCT"
    assert "not for diagnosis" in ds.StructureSetDescription
    assert "not for diagnosis" in ds.ContributingEquipmentSequence[0].ContributionDescription


@needs_dciodvfy
def test_brain_rtstruct_passes_dciodvfy(brain_rtstruct: Path) -> None:
    assert _dciodvfy_errors(brain_rtstruct) == []


def test_contour_too_long_for_explicit_vr_switches_to_implicit(brain: Volume, tmp_path: Path) -> None:
    """A ragged outline has more Contour Data than a 16-bit Explicit VR length allows."""
    labels = np.zeros(brain.shape, dtype=np.uint8)
    labels[5, :, 0:2] = 1  # a comb: a spine, a tooth every third row, a bump every fourth column of each tooth
    labels[5, 0::3, 2:120] = 1
    labels[5, 1::3, 4:120:4] = 1  # one outline with about 8000 corners
    ds = _write(brain, labels, tmp_path / "long.dcm")

    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ImplicitVRLittleEndian
    longest = max(c.get_item(0x30060050).length for c in ds.ROIContourSequence[0].ContourSequence)  # Contour Data
    assert len(ds.ROIContourSequence[0].ContourSequence) == 1 and longest > 0xFFFE
    np.testing.assert_array_equal(contours_to_mask(ds, brain)[1], labels == 1)


def test_bad_label_maps_are_refused(brain: Volume) -> None:
    uids = {"series_instance_uid": derived_uid("x", "1"), "sop_instance_uid": derived_uid("x", "2")}
    labels = np.zeros(brain.shape, dtype=np.uint8)
    labels[0, 0, 0] = 9
    with pytest.raises(ValueError, match=r"\[9\]"):
        write_rt_structure_set(brain, labels, SEGMENTS, MODEL, **uids)
    with pytest.raises(ValueError, match="shape"):
        write_rt_structure_set(brain, labels[:-1], SEGMENTS, MODEL, **uids)
    with pytest.raises(TypeError, match="integers"):
        write_rt_structure_set(brain, labels.astype(np.float32), SEGMENTS, MODEL, **uids)
    no_frame_of_reference = copy.copy(brain)
    no_frame_of_reference.frame_of_reference_uid = None
    with pytest.raises(ValueError, match="Frame of Reference"):
        write_rt_structure_set(no_frame_of_reference, labels * 0, SEGMENTS, MODEL, **uids)


# --- a synthetic oblique series and an Enhanced MR ------------------------------------------------


def _oblique_series(shared_data: Path) -> list[pydicom.Dataset]:
    """Six MR_small slices on a doubly rotated plane, 2.5 mm apart along its normal, files shuffled."""
    source = pydicom.dcmread(shared_data / "mr" / "MR_small.dcm")
    a, b = np.radians(25.0), np.radians(-40.0)
    rotation_x = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rotation_z = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    rotation = rotation_z @ rotation_x
    iop = [DSfloat(v, auto_format=True) for v in (*rotation[:, 0], *rotation[:, 1])]
    normal = np.cross(np.array(iop[:3], dtype=float), np.array(iop[3:], dtype=float))
    origin = np.array([-12.5, 30.25, 7.0])
    datasets = []
    for k in range(6):
        ds = copy.deepcopy(source)
        ds.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["oblique rtstruct", str(k)])
        ds.ImageOrientationPatient = iop
        ds.ImagePositionPatient = [DSfloat(v, auto_format=True) for v in origin + 2.5 * k * normal]
        ds.InstanceNumber = 6 - k
        datasets.append(ds)
    random.Random(1).shuffle(datasets)
    return datasets


def test_oblique_series_round_trip(shared_data: Path, tmp_path: Path) -> None:
    datasets = _oblique_series(shared_data)
    volume = volume_from_datasets(datasets)
    labels = np.zeros(volume.shape, dtype=np.uint8)
    labels[_sphere(volume, (2.5, 30, 34), 6.0)] = 3
    for k in (1, 2):
        labels[k][_disk(volume.shape[1:], (20, 20), 12) & ~_disk(volume.shape[1:], (21, 19), 4)] = 1
    labels[4, 50:58, 5:12] = 2
    labels[4, 52:60, 20:30] = 2
    path = tmp_path / "oblique.dcm"
    rtstruct = _write(volume, labels, path)

    _assert_on_referenced_planes(rtstruct, volume, datasets)
    masks = contours_to_mask(rtstruct, volume)
    for number, segment in enumerate(SEGMENTS[:3], start=1):
        assert _dice(masks[number], labels == segment.label) >= 0.95, segment.name
    assert set(_referenced_slices(rtstruct, volume, 2)) == set(np.flatnonzero((labels == 3).any(axis=(1, 2))))
    if shutil.which("dciodvfy"):
        assert _dciodvfy_errors(path) == []


def test_enhanced_mr_contours_reference_frames(enhanced_mr: pydicom.Dataset, tmp_path: Path) -> None:
    volume = volume_from_datasets([enhanced_mr])
    labels = np.zeros(volume.shape, dtype=np.uint8)
    labels[2:6, 10:30, 20:50] = 1
    path = tmp_path / "enhanced.dcm"
    rtstruct = _write(volume, labels, path)

    _assert_on_referenced_planes(rtstruct, volume, [enhanced_mr])
    assert _referenced_slices(rtstruct, volume, 0) == [2, 3, 4, 5]
    listed = rtstruct.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
    image = listed.RTReferencedSeriesSequence[0].ContourImageSequence[0]
    assert [int(v) for v in image.ReferencedFrameNumber] == list(range(1, 11))
    np.testing.assert_array_equal(contours_to_mask(rtstruct, volume)[1], labels == 1)
    if shutil.which("dciodvfy"):
        assert _dciodvfy_errors(path) == []


# --- structure sets written by others -----------------------------------------------------------


def test_rt_utils_structure_set_is_rasterised(shared_data: Path) -> None:
    folder = shared_data / "rtstruct" / "rtutils_phantom"
    volume = volume_from_files([folder / "ct_1.dcm", folder / "ct_2.dcm"])
    rtstruct = pydicom.dcmread(folder / "rt.dcm")

    masks = contours_to_mask(rtstruct, volume)  # its ROI names a Frame of Reference of its own, but our images

    assert list(masks) == [1]
    contours = rtstruct.ROIContourSequence[0].ContourSequence
    referenced = {contour.ContourImageSequence[0].ReferencedSOPInstanceUID for contour in contours}
    for k, frame in enumerate(volume.frames):
        assert masks[1][k].any() == (frame.sop_instance_uid in referenced)


def test_structure_set_without_part_10_header_is_parsed(shared_data: Path) -> None:
    ds = pydicom.dcmread(shared_data / "rtstruct" / "pydicom_rtstruct.dcm", force=True)
    rois = read_rois(ds)

    assert sorted(rois) == [1, 2, 3]
    assert rois[1].name == "patient" and rois[1].display_color == (220, 160, 120)
    assert [c.geometric_type for c in rois[1].contours] == ["CLOSED_PLANAR"] * 3
    assert rois[1].contours[0].points.shape == (5, 3) and rois[1].contours[0].referenced_sop_instance_uid is None
    assert [c.geometric_type for c in rois[2].contours] == ["POINT"]


def test_other_frame_of_reference_is_refused(shared_data: Path, brain: Volume) -> None:
    ds = pydicom.dcmread(shared_data / "rtstruct" / "pydicom_rtstruct.dcm", force=True)
    with pytest.raises(ValueError, match="Frame of Reference"):
        contours_to_mask(ds, brain)
