"""Measurements of findings: each 3D connected component of a segment, measured in patient millimetres.

A finding is one 26-connected component of one segment's mask. Every length is a distance between voxel
centres in patient space (LPS mm), so the numbers do not depend on how the grid is oriented or how
anisotropic it is. A shape one voxel thick therefore measures 0 mm across: lengths are between centres,
not between outer voxel faces, and can be up to one voxel step shorter than the physical extent.

"Axial" diameters (``longest_axial_diameter_mm`` and ``perpendicular_axial_diameter_mm``) are measured
RECIST-style on the source image planes, that is on the acquisition plane of the series, whatever it is:
on a sagittal series they are sagittal diameters. ``Finding.extra["measurement_plane"]`` and
``extra["image_orientation_patient"]`` say which plane it was.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from inference.models.base import SegmentDescription
from inference.results.findings import Finding
from inference.results.identity import derived_uid
from inference.volume import Volume

__all__ = ["PERPENDICULAR_TOLERANCE_DEGREES", "measure_findings"]

PERPENDICULAR_TOLERANCE_DEGREES = 10.0
"""The short axis may deviate this much from exactly perpendicular to the long axis (pixel grids are discrete)."""

_CONNECTIVITY_3D = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity: faces, edges and corners
_FACE_NEIGHBOURS_3D = ndimage.generate_binary_structure(3, 1)  # a voxel with a face outside is on the surface
_FACE_NEIGHBOURS_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)  # a pixel with an edge outside, within its slice
_FACE_NEIGHBOURS_IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)
_PAIRWISE_BLOCK = 1_000_000  # largest number of point pairs held in memory at once
_PLANE_TOLERANCE = math.cos(math.radians(10.0))  # a slice normal this close to an axis names the plane


def measure_findings(
    volume: Volume,
    labels: np.ndarray,
    segments: Sequence[SegmentDescription],
    *,
    uid_parts: Sequence[str],
    min_voxels: int = 1,
) -> list[Finding]:
    """One ``Finding`` per 26-connected component of each segment, numbered 1.. by decreasing volume.

    Numbering is per segment (in the order of ``segments``); components smaller than ``min_voxels`` are
    dropped. ``uid_parts`` (e.g. study, series, model id and version) make tracking UIDs deterministic, so
    a re-run reports the same lesion under the same UID. ``extra["segment_number"]`` is the segment's
    position in ``segments`` (1-based), which is its SEG segment number when the SEG was written with
    the same list.
    """
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"Label map must hold integers, got {labels.dtype}.")
    if labels.shape != volume.array.shape:
        raise ValueError(f"Label map shape {labels.shape} differs from the volume shape {volume.array.shape}.")
    if min_voxels < 1:
        raise ValueError(f"min_voxels must be at least 1, got {min_voxels}.")

    grid = _Grid(volume.affine)
    findings: list[Finding] = []
    for segment_number, segment in enumerate(segments, start=1):
        mask = labels == segment.label
        if not mask.any():
            continue
        components, count = ndimage.label(mask, structure=_CONNECTIVITY_3D)
        sizes = np.bincount(components.ravel(), minlength=count + 1)
        boxes = ndimage.find_objects(components)
        # Decreasing size; equal sizes keep scan order (first voxel in k, j, i order), so numbering is stable.
        order = sorted((n for n in range(1, count + 1) if sizes[n] >= min_voxels), key=lambda n: (-sizes[n], n))
        tracking_name = "Lesion" if len(segments) == 1 else segment.name
        for number, component_label in enumerate(order, start=1):
            box = boxes[component_label - 1]
            measured = _measure_component(volume, grid, components[box] == component_label, box)
            extra = {"segment_number": segment_number, **measured.pop("extra")}
            findings.append(
                Finding(
                    number=number,
                    segment_label=segment.label,
                    segment_name=segment.name,
                    tracking_uid=derived_uid(*uid_parts, "finding", str(segment.label), str(number)),
                    tracking_id=f"{tracking_name} {number}",
                    location="",
                    extra=extra,
                    **measured,
                )
            )
    return findings


class _Grid:
    """The volume's geometry as the measurements need it: voxel index → mm, and in-plane metric."""

    def __init__(self, affine: np.ndarray) -> None:
        self.affine = np.asarray(affine, dtype=np.float64)
        self.linear = self.affine[:3, :3]
        self.voxel_volume_ml = abs(float(np.linalg.det(self.linear))) / 1000.0
        # In-plane coordinates in an orthonormal basis of the slice plane: distances within a slice are
        # |R (di, dj)| whatever the pixel spacing and orientation (R from the QR factorisation of [a_i a_j]).
        _, self.in_plane = np.linalg.qr(self.linear[:, :2])
        row = self.linear[:, 0] / np.linalg.norm(self.linear[:, 0])
        column = self.linear[:, 1] / np.linalg.norm(self.linear[:, 1])
        self.image_orientation = [float(v) for v in (*row, *column)]
        self.plane = _plane_name(np.cross(row, column))

    def to_patient(self, kji: np.ndarray) -> np.ndarray:
        """(n, 3) voxel indices (k, j, i) → (n, 3) patient LPS mm."""
        ijk = np.asarray(kji, dtype=np.float64)[:, ::-1]
        return ijk @ self.linear.T + self.affine[:3, 3]


def _plane_name(normal: np.ndarray) -> str:
    """AXIAL, CORONAL or SAGITTAL when the slice normal is within 10° of the patient axis, else OBLIQUE."""
    axis = int(np.argmax(np.abs(normal)))
    if abs(normal[axis]) < _PLANE_TOLERANCE:
        return "OBLIQUE"
    return ("SAGITTAL", "CORONAL", "AXIAL")[axis]  # normal along x (L), y (P), z (S)


def _measure_component(volume: Volume, grid: _Grid, component: np.ndarray, box: tuple[slice, ...]) -> dict:
    """Every measurement of one component, given as a cropped mask and the crop's place in the volume."""
    offset = np.array([s.start for s in box])
    voxels = np.argwhere(component) + offset  # (n, 3) k, j, i
    voxel_count = len(voxels)
    centroid_index = voxels.mean(axis=0)
    centroid_mm = grid.to_patient(centroid_index[None, :])[0]
    areas = component.sum(axis=(1, 2))
    key_slice = int(offset[0] + _nearest_of_best(areas, centroid_index[0] - offset[0]))

    padded = np.pad(component, 1)
    surface = np.argwhere(padded & ~ndimage.binary_erosion(padded, _FACE_NEIGHBOURS_3D)) - 1 + offset
    surface_mm = grid.to_patient(surface)
    max_3d, a, b = _farthest_pair(surface_mm)

    outline = np.argwhere(padded & ~ndimage.binary_erosion(padded, _FACE_NEIGHBOURS_IN_PLANE)) - 1 + offset
    axial = _axial_diameters(grid, outline, centroid_index[0])

    return {
        "voxel_count": int(voxel_count),
        "volume_ml": voxel_count * grid.voxel_volume_ml,
        "max_3d_diameter_mm": max_3d,
        "longest_axial_diameter_mm": axial["long"],
        "perpendicular_axial_diameter_mm": axial["short"],
        "mean_intensity": float(volume.array[box][component].mean(dtype=np.float64)),
        "centroid_mm": tuple(float(v) for v in centroid_mm),
        "centroid_index": tuple(float(v) for v in centroid_index),
        "key_slice": key_slice,
        "extra": {
            "measurement_plane": grid.plane,
            "image_orientation_patient": grid.image_orientation,
            "axial_slice": axial["slice"],
            "long_axis_index": axial["long_index"],
            "long_axis_mm": _endpoints_mm(grid, axial["long_index"]),
            "perpendicular_axis_index": axial["short_index"],
            "perpendicular_axis_mm": _endpoints_mm(grid, axial["short_index"]),
            "max_3d_diameter_mm_endpoints": [[float(v) for v in surface_mm[a]], [float(v) for v in surface_mm[b]]],
        },
    }


def _axial_diameters(grid: _Grid, outline: np.ndarray, centroid_k: float) -> dict:
    """Longest in-plane diameter over all slices, and on that slice the longest chord perpendicular to it."""
    # Longest first; equal lengths (to 1 nm, a symmetric lesion) prefer the slice nearest the centroid.
    best: tuple[float, float, float, int, int, int] | None = None  # (rounded, -distance, length, k, a, b)
    rows_of = {int(k): np.flatnonzero(outline[:, 0] == k) for k in np.unique(outline[:, 0])}
    for k, rows in rows_of.items():
        length, a, b = _farthest_pair(_in_plane(grid, outline[rows]))
        candidate = (round(length, 6), -abs(k - centroid_k), length, k, int(rows[a]), int(rows[b]))
        if best is None or candidate[:2] > best[:2]:
            best = candidate
    assert best is not None
    _, _, length, k, a, b = best
    rows = rows_of[k]
    points = _in_plane(grid, outline[rows])
    direction = _in_plane(grid, outline[[b]]) - _in_plane(grid, outline[[a]])
    short, c, d = _longest_perpendicular(points, direction[0])
    return {
        "long": float(length),
        "short": short,
        "slice": int(k),
        "long_index": [[int(v) for v in outline[a]], [int(v) for v in outline[b]]],
        "short_index": None if c < 0 else [[int(v) for v in outline[rows[c]]], [int(v) for v in outline[rows[d]]]],
    }


def _in_plane(grid: _Grid, kji: np.ndarray) -> np.ndarray:
    """(n, 3) voxel indices on one slice → (n, 2) mm coordinates in an orthonormal basis of the slice."""
    return kji[:, [2, 1]].astype(np.float64) @ grid.in_plane.T


def _endpoints_mm(grid: _Grid, endpoints: list[list[int]] | None) -> list[list[float]] | None:
    if endpoints is None:
        return None
    return [[float(v) for v in point] for point in grid.to_patient(np.array(endpoints))]


def _nearest_of_best(values: np.ndarray, centre: float) -> int:
    """Index of the largest value; among equal ones, the one nearest ``centre`` (then the lowest)."""
    best = np.flatnonzero(values == values.max())
    return int(best[np.argmin(np.abs(best - centre))])


def _farthest_pair(points: np.ndarray) -> tuple[float, int, int]:
    """Largest distance between two of ``points`` (n, d) and their indices.

    Only vertices of the convex hull can be farthest apart, so the pairwise search runs over those.
    Flat or collinear sets (a lesion on one slice, a line of voxels) are reduced to their own dimension
    first, because Qhull refuses degenerate input.
    """
    if len(points) == 1:
        return 0.0, 0, 0
    candidates = _hull_vertices(points)
    return _farthest_among(points, candidates)


def _hull_vertices(points: np.ndarray) -> np.ndarray:
    """Indices of the convex hull vertices of ``points``, computed in the subspace the points span."""
    if len(points) <= 4:
        return np.arange(len(points))
    centred = points - points.mean(axis=0)
    _, singular, basis = np.linalg.svd(centred, full_matrices=False)
    if singular[0] <= 1e-9:
        return np.array([0])  # all points coincide
    rank = int(np.sum(singular > singular[0] * 1e-9))
    coordinates = centred @ basis[:rank].T
    if rank == 1:
        return np.array([int(np.argmin(coordinates[:, 0])), int(np.argmax(coordinates[:, 0]))])
    try:
        return ConvexHull(coordinates).vertices
    except QhullError:  # nearly degenerate beyond the rank test: every point is a candidate
        return np.arange(len(points))


def _farthest_among(points: np.ndarray, candidates: np.ndarray) -> tuple[float, int, int]:
    """Brute-force farthest pair among ``points[candidates]``, in blocks so memory stays bounded."""
    chosen = points[candidates]
    block = max(1, _PAIRWISE_BLOCK // len(chosen))
    best, best_a, best_b = -1.0, 0, 0
    for start in range(0, len(chosen), block):
        squared = ((chosen[start : start + block, None, :] - chosen[None, :, :]) ** 2).sum(axis=-1)
        flat = int(np.argmax(squared))
        row, column = divmod(flat, len(chosen))
        if squared[row, column] > best:
            best, best_a, best_b = float(squared[row, column]), start + row, column
    return math.sqrt(best), int(candidates[best_a]), int(candidates[best_b])


def _longest_perpendicular(points: np.ndarray, direction: np.ndarray) -> tuple[float, int, int]:
    """Longest chord between two of ``points`` (n, 2) within ±10° of perpendicular to ``direction``.

    Returns (length, index, index), or (0.0, -1, -1) when no pair qualifies (a one-pixel-wide lesion,
    or a single pixel). Chords are between outline pixels of the lesion; they are not checked to stay inside it.
    """
    norm = float(np.linalg.norm(direction))
    if norm == 0.0 or len(points) < 2:
        return 0.0, -1, -1
    unit = direction / norm
    # |cos(angle to the long axis)| <= sin(tolerance)  <=>  within the tolerance of perpendicular
    limit = math.sin(math.radians(PERPENDICULAR_TOLERANCE_DEGREES)) ** 2
    block = max(1, _PAIRWISE_BLOCK // len(points))
    best, best_a, best_b = 0.0, -1, -1
    for start in range(0, len(points), block):
        chords = points[None, :, :] - points[start : start + block, None, :]
        squared = (chords**2).sum(axis=-1)
        along = chords @ unit
        squared[along**2 > limit * squared] = -1.0
        flat = int(np.argmax(squared))
        row, column = divmod(flat, len(points))
        if squared[row, column] > best:
            best, best_a, best_b = float(squared[row, column]), start + row, column
    return math.sqrt(best), best_a, best_b
