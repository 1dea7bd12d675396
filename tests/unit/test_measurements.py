"""Finding measurements against analytic shapes: spheres, boxes, lines, on straight and oblique grids."""

from __future__ import annotations

import math

import numpy as np
import pytest

from inference.models.base import Code, SegmentDescription
from inference.results.identity import derived_uid
from inference.results.measurements import PERPENDICULAR_TOLERANCE_DEGREES, measure_findings
from inference.volume import Volume

LESION = SegmentDescription(
    label=1,
    name="Lesion",
    category=Code("49755003", "SCT", "Morphologically Altered Structure"),
    type=Code("52988006", "SCT", "Lesion"),
    color=(255, 0, 0),
)
EDEMA = SegmentDescription(
    label=7,
    name="Edema",
    category=Code("49755003", "SCT", "Morphologically Altered Structure"),
    type=Code("79654002", "SCT", "Edema"),
    color=(0, 255, 0),
)
UID_PARTS = ("1.2.3", "test-model", "1.0")


def _volume(shape: tuple[int, int, int], spacing: tuple[float, float, float], rotation: np.ndarray | None = None,
            origin: tuple[float, float, float] = (-40.0, 25.0, 10.0), modality: str = "MR") -> Volume:
    """A synthetic volume: ``spacing`` is (k, j, i) mm; ``rotation`` turns the (i, j, k) axes in patient space."""
    affine = np.eye(4)
    affine[:3, :3] = (np.eye(3) if rotation is None else rotation) @ np.diag([spacing[2], spacing[1], spacing[0]])
    affine[:3, 3] = origin
    array = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) % 97  # varied, so means are checked
    return Volume(array, affine, [], [], "1.2.3", "1.2.3.4", None, modality, "synthetic")


def _voxel_centres_mm(volume: Volume) -> np.ndarray:
    k, j, i = np.meshgrid(*(np.arange(n) for n in volume.shape), indexing="ij")
    ijk1 = np.stack([i, j, k, np.ones_like(i)], axis=-1).astype(np.float64)
    return (ijk1 @ volume.affine.T)[..., :3]


def _ball(volume: Volume, centre_mm: np.ndarray, radius: float, label: int = 1) -> np.ndarray:
    distance = np.linalg.norm(_voxel_centres_mm(volume) - centre_mm, axis=-1)
    return np.where(distance <= radius, label, 0).astype(np.uint8)


def _rotation(axis: tuple[float, float, float], degrees: float) -> np.ndarray:
    """Rodrigues rotation about ``axis``."""
    u = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    cross = np.array([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]])
    angle = math.radians(degrees)
    return np.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * cross @ cross


def test_sphere_on_anisotropic_grid() -> None:
    spacing = (3.0, 0.8, 0.9)
    volume = _volume((24, 70, 64), spacing)
    radius = 12.0
    centre_index = np.array([11.0, 33.3, 30.6])  # on a slice, between rows and columns
    centre_mm = (volume.affine @ [centre_index[2], centre_index[1], centre_index[0], 1.0])[:3]
    labels = _ball(volume, centre_mm, radius)

    (finding,) = measure_findings(volume, labels, [LESION], uid_parts=UID_PARTS)

    assert finding.voxel_count == int(labels.sum())
    assert finding.volume_ml == pytest.approx(4 / 3 * math.pi * radius**3 / 1000, rel=0.05)
    assert finding.volume_ml == pytest.approx(labels.sum() * 3.0 * 0.8 * 0.9 / 1000, rel=1e-12)
    assert abs(finding.max_3d_diameter_mm - 2 * radius) <= max(spacing)
    in_plane = max(spacing[1:])
    assert abs(finding.longest_axial_diameter_mm - 2 * radius) <= in_plane
    assert abs(finding.perpendicular_axial_diameter_mm - 2 * radius) <= in_plane
    assert finding.max_3d_diameter_mm >= finding.longest_axial_diameter_mm - 1e-9
    assert finding.key_slice == 11 and finding.extra["axial_slice"] == 11
    np.testing.assert_allclose(finding.centroid_index, centre_index, atol=0.05)
    np.testing.assert_allclose(finding.centroid_mm, centre_mm, atol=0.05)
    assert finding.mean_intensity == pytest.approx(float(volume.array[labels == 1].mean(dtype=np.float64)), rel=1e-9)
    assert finding.location == ""
    assert finding.extra["measurement_plane"] == "AXIAL"
    assert finding.extra["image_orientation_patient"] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]

    # the endpoints are what the numbers say: on the axial slice, and perpendicular within the tolerance
    long_axis = np.array(finding.extra["long_axis_mm"])
    short_axis = np.array(finding.extra["perpendicular_axis_mm"])
    assert np.linalg.norm(long_axis[1] - long_axis[0]) == pytest.approx(finding.longest_axial_diameter_mm)
    assert np.linalg.norm(short_axis[1] - short_axis[0]) == pytest.approx(finding.perpendicular_axial_diameter_mm)
    assert {point[0] for point in finding.extra["long_axis_index"] + finding.extra["perpendicular_axis_index"]} == {11}
    cosine = abs(np.dot(long_axis[1] - long_axis[0], short_axis[1] - short_axis[0])) / (
        finding.longest_axial_diameter_mm * finding.perpendicular_axial_diameter_mm
    )
    assert cosine <= math.sin(math.radians(PERPENDICULAR_TOLERANCE_DEGREES)) + 1e-12
    ends = np.array(finding.extra["max_3d_diameter_mm_endpoints"])
    assert np.linalg.norm(ends[1] - ends[0]) == pytest.approx(finding.max_3d_diameter_mm)


def test_box_with_known_sides() -> None:
    spacing = (2.5, 0.8, 1.0)
    volume = _volume((14, 40, 30), spacing)
    labels = np.zeros(volume.shape, dtype=np.uint8)
    labels[3:8, 10:26, 5:18] = 1  # 5 slices x 16 rows x 13 columns: in plane 12 mm x 12 mm between centres

    (finding,) = measure_findings(volume, labels, [LESION], uid_parts=UID_PARTS)

    side_k, side_j, side_i = 4 * 2.5, 15 * 0.8, 12 * 1.0
    assert finding.voxel_count == 5 * 16 * 13
    assert finding.volume_ml == pytest.approx(5 * 16 * 13 * 2.5 * 0.8 * 1.0 / 1000)
    assert finding.max_3d_diameter_mm == pytest.approx(math.sqrt(side_k**2 + side_j**2 + side_i**2))
    assert finding.longest_axial_diameter_mm == pytest.approx(math.hypot(side_j, side_i))  # the diagonal
    assert finding.perpendicular_axial_diameter_mm == pytest.approx(math.hypot(side_j, side_i))  # the other one
    assert finding.key_slice == 5  # every slice has the same area: the one at the centroid
    assert finding.centroid_index == pytest.approx((5.0, 17.5, 11.0))


def test_components_are_numbered_by_decreasing_volume() -> None:
    volume = _volume((20, 60, 60), (2.0, 1.0, 1.0))
    small_centre = (volume.affine @ [15, 15, 5, 1])[:3]  # scanned first (lower k), yet the smaller one
    large_centre = (volume.affine @ [40, 40, 12, 1])[:3]
    labels = _ball(volume, small_centre, 4.0) | _ball(volume, large_centre, 8.0)
    labels[0, 0, 0] = labels[1, 1, 1] = 1  # two voxels touching by a corner: one 26-connected component

    findings = measure_findings(volume, labels, [LESION], uid_parts=UID_PARTS)

    assert [f.number for f in findings] == [1, 2, 3]
    assert [f.tracking_id for f in findings] == ["Lesion 1", "Lesion 2", "Lesion 3"]
    assert findings[0].volume_ml > findings[1].volume_ml > findings[2].volume_ml
    assert findings[0].centroid_mm == pytest.approx(tuple(large_centre), abs=0.05)
    assert findings[2].voxel_count == 2
    assert findings[0].tracking_uid == derived_uid(*UID_PARTS, "finding", "1", "1")
    assert len({f.tracking_uid for f in findings}) == 3
    assert measure_findings(volume, labels, [LESION], uid_parts=UID_PARTS) == findings  # deterministic

    kept = measure_findings(volume, labels, [LESION], uid_parts=UID_PARTS, min_voxels=3)
    assert [f.voxel_count for f in kept] == [f.voxel_count for f in findings[:2]]


def test_each_segment_is_numbered_on_its_own() -> None:
    volume = _volume((20, 40, 40), (2.0, 1.0, 1.0))
    labels = np.zeros(volume.shape, dtype=np.uint8)
    labels[2:5, 5:10, 5:10] = 7
    labels[10:12, 20:30, 20:30] = 1
    labels[15:17, 30:32, 30:32] = 1

    findings = measure_findings(volume, labels, [LESION, EDEMA], uid_parts=UID_PARTS)

    assert [(f.segment_name, f.number, f.segment_label) for f in findings] == [
        ("Lesion", 1, 1), ("Lesion", 2, 1), ("Edema", 1, 7)
    ]
    assert [f.tracking_id for f in findings] == ["Lesion 1", "Lesion 2", "Edema 1"]
    assert [f.extra["segment_number"] for f in findings] == [1, 1, 2]
    assert findings[2].tracking_uid == derived_uid(*UID_PARTS, "finding", "7", "1")
    assert measure_findings(volume, np.zeros_like(labels), [LESION, EDEMA], uid_parts=UID_PARTS) == []


def test_oblique_grid_gives_the_same_physical_measurements() -> None:
    spacing = (2.0, 0.7, 0.75)
    rotation = _rotation((1.0, 2.0, 3.0), 35.0)
    straight = _volume((24, 64, 64), spacing)
    oblique = _volume((24, 64, 64), spacing, rotation=rotation)
    labels = np.zeros(straight.shape, dtype=np.uint8)
    labels[5:17, 12:40, 20:50] = 1
    labels[8:12, 40:52, 25:30] = 1  # an irregular shape: a box with a bump

    (a,) = measure_findings(straight, labels, [LESION], uid_parts=UID_PARTS)
    (b,) = measure_findings(oblique, labels, [LESION], uid_parts=UID_PARTS)
    for name in ("volume_ml", "max_3d_diameter_mm", "longest_axial_diameter_mm", "perpendicular_axial_diameter_mm",
                 "mean_intensity"):
        assert getattr(b, name) == pytest.approx(getattr(a, name), rel=1e-9), name
    assert b.centroid_index == pytest.approx(a.centroid_index)
    index = [a.centroid_index[2], a.centroid_index[1], a.centroid_index[0], 1.0]
    assert b.centroid_mm == pytest.approx(tuple((oblique.affine @ index)[:3]))
    assert (a.extra["measurement_plane"], b.extra["measurement_plane"]) == ("AXIAL", "OBLIQUE")

    # the same physical ball sampled on both grids measures the same, within a voxel
    centre = np.array([-20.0, 48.0, 30.0])
    middle = [32.3, 31.6, 12.2]  # (i, j, k) of the centre: off the grid points
    oblique_centred = _volume((24, 64, 64), spacing, rotation, origin=tuple(centre - oblique.affine[:3, :3] @ middle))
    straight_centred = _volume((24, 64, 64), spacing, origin=tuple(centre - straight.affine[:3, :3] @ middle))
    (s,) = measure_findings(straight_centred, _ball(straight_centred, centre, 10.0), [LESION], uid_parts=UID_PARTS)
    (o,) = measure_findings(oblique_centred, _ball(oblique_centred, centre, 10.0), [LESION], uid_parts=UID_PARTS)
    for finding in (s, o):
        assert finding.volume_ml == pytest.approx(4 / 3 * math.pi * 1.0, rel=0.05)
        assert abs(finding.max_3d_diameter_mm - 20.0) <= max(spacing)
        assert abs(finding.longest_axial_diameter_mm - 20.0) <= max(spacing[1:])
        assert abs(finding.perpendicular_axial_diameter_mm - 20.0) <= max(spacing[1:])
        assert finding.centroid_mm == pytest.approx(tuple(centre), abs=0.1)


def test_axial_diameters_are_measured_in_the_acquisition_plane() -> None:
    """On a sagittal series (like the brain series), the 'axial' diameters are sagittal ones."""
    sagittal = np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # i → +y, j → -z, k → -x
    volume = _volume((30, 40, 40), (1.0, 1.0, 1.0), rotation=sagittal)
    labels = np.zeros(volume.shape, dtype=np.uint8)
    labels[0:30, 10:14, 10:13] = 1  # 29 mm along the slice normal (x), 3 mm x 2 mm within each slice

    (finding,) = measure_findings(volume, labels, [LESION], uid_parts=UID_PARTS)

    assert finding.extra["measurement_plane"] == "SAGITTAL"
    assert finding.extra["image_orientation_patient"] == [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
    assert finding.max_3d_diameter_mm == pytest.approx(math.sqrt(29**2 + 3**2 + 2**2))
    assert finding.longest_axial_diameter_mm == pytest.approx(math.hypot(3, 2))
    assert finding.key_slice == 14  # all areas equal: the slice at the centroid (14.5 → 14)


def test_degenerate_shapes() -> None:
    volume = _volume((10, 20, 20), (3.0, 0.5, 0.6))
    labels = np.zeros(volume.shape, dtype=np.uint8)
    labels[2, 3, 3] = 1  # one voxel
    labels[6, 2:12, 15] = 1  # a line of 10 voxels along j: collinear points
    labels[8, 10:18, 2:9] = 1  # a one-slice plate: coplanar points

    plate, line, voxel = measure_findings(volume, labels, [LESION], uid_parts=UID_PARTS)

    assert voxel.voxel_count == 1 and voxel.volume_ml == pytest.approx(3.0 * 0.5 * 0.6 / 1000)
    lengths = (voxel.max_3d_diameter_mm, voxel.longest_axial_diameter_mm, voxel.perpendicular_axial_diameter_mm)
    assert lengths == (0, 0, 0)
    assert voxel.extra["perpendicular_axis_mm"] is None
    assert line.max_3d_diameter_mm == pytest.approx(9 * 0.5)
    assert line.longest_axial_diameter_mm == pytest.approx(9 * 0.5)
    assert line.perpendicular_axial_diameter_mm == 0.0  # one voxel wide: centres are not apart
    assert plate.max_3d_diameter_mm == pytest.approx(math.hypot(7 * 0.5, 6 * 0.6))
    assert plate.longest_axial_diameter_mm == pytest.approx(plate.max_3d_diameter_mm)
    assert plate.key_slice == 8


def test_bad_label_maps_are_refused() -> None:
    volume = _volume((4, 8, 8), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="shape"):
        measure_findings(volume, np.zeros((4, 8, 7), dtype=np.uint8), [LESION], uid_parts=UID_PARTS)
    with pytest.raises(TypeError, match="integers"):
        measure_findings(volume, np.zeros((4, 8, 8), dtype=np.float32), [LESION], uid_parts=UID_PARTS)
    with pytest.raises(ValueError, match="min_voxels"):
        measure_findings(volume, np.zeros((4, 8, 8), dtype=np.uint8), [LESION], uid_parts=UID_PARTS, min_voxels=0)
