"""Brain lesion candidates by a classical intensity-outlier rule: no training, no network.

Steps, each explainable on a screen:
1. brain mask: three-class Otsu (background / tissue / bright fat and vessels) on a lightly smoothed volume;
   the tissue class is eroded by ``mask_opening_mm`` to cut the thin links through the skull to the scalp,
   the largest 3D component is kept and grown back, holes are filled slice by slice, and the mask is
   eroded by ``mask_erosion_mm`` to drop the rim;
2. robust z-score inside the mask: (intensity - median) / (1.4826 * MAD), per slice (2D acquisitions drift
   from slice to slice), or over the whole mask for slices with too little brain;
3. voxels beyond ``z_threshold`` (polarity "bright", "dark" or "both"), holes filled per slice;
4. connected components kept if at least ``min_volume_mm3``, at most ``max_fraction`` of the brain mask,
   and reaching at least ``min_depth_mm`` inside the mask (drops scalp, marrow and sinus slivers at its edge).

Everything is float32 or boolean on the grid of the input; nothing else is allocated at full size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_multiotsu, threshold_otsu

from inference.models.base import InputNotSupported, ModelInfo, ProgressCallback, SegmentationResult
from inference.volume import Volume

LESION_LABEL = 1
_MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution times this is its standard deviation


@dataclass(frozen=True)
class OutlierParams:
    """Parameters of the method; every one is a physical quantity or a plain threshold."""

    z_threshold: float = 5.0
    polarity: str = "bright"  # "bright", "dark" or "both"
    smoothing_mm: float = 1.5  # Gaussian sigma applied before z-scoring
    min_volume_mm3: float = 200.0
    max_fraction: float = 0.05  # of the brain mask volume
    min_depth_mm: float = 10.0  # a candidate must reach this far inside the brain mask (in-plane distance)
    mask_smoothing_mm: float = 0.5
    mask_classes: int = 3  # 3: background / tissue / bright; 2: plain Otsu foreground
    mask_opening_mm: float = 2.0
    mask_erosion_mm: float = 2.0
    min_mask_volume_mm3: float = 50_000.0  # below this no head was found (50 mL)
    min_slice_area_mm2: float = 1_000.0  # slices with less brain use the whole-mask statistics
    per_slice_statistics: bool = True
    min_slices: int = 3

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> OutlierParams:
        """Build from a manifest's ``params``; unknown keys (e.g. pipeline options) are ignored."""
        known = {k: v for k, v in params.items() if k in cls.__dataclass_fields__}
        result = cls(**known)
        if result.polarity not in ("bright", "dark", "both"):
            raise ValueError(f"params.polarity must be 'bright', 'dark' or 'both', not {result.polarity!r}")
        if result.mask_classes not in (2, 3):
            raise ValueError("params.mask_classes must be 2 or 3")
        if result.z_threshold <= 0 or not 0 < result.max_fraction <= 1:
            raise ValueError("params.z_threshold must be > 0 and params.max_fraction in (0, 1]")
        return result


class IntensityOutlierModel:
    """Lesion candidates = compact intensity outliers inside a brain mask (demonstration, not validated)."""

    def __init__(self, info: ModelInfo, params: dict[str, Any]) -> None:
        self.info = info
        self.params = OutlierParams.from_dict(params)

    def segment(self, volume: Volume, progress: ProgressCallback) -> SegmentationResult:
        """Label 1 on every lesion candidate; uint8 on the grid of ``volume.array``."""
        p = self.params
        array = np.asarray(volume.array, dtype=np.float32)
        if array.ndim != 3 or array.shape[0] < p.min_slices:
            raise InputNotSupported(
                f"{self.info.name} needs a 3D series of at least {p.min_slices} slices; "
                f"this one has shape {array.shape}")
        spacing = tuple(float(s) for s in volume.spacing)
        progress(0.0)
        brain = brain_mask(array, spacing, p)
        progress(0.4)
        z = robust_z(array, spacing, brain, p)
        progress(0.7)
        candidates = outliers(z, brain, p.z_threshold, p.polarity)
        del z
        labels, kept, dropped = filter_components(candidates, brain, spacing, p)
        progress(1.0)
        voxel_mm3 = float(np.prod(spacing))
        notes = [
            "Classical intensity-outlier rule (no training): candidates for review, not a diagnosis.",
            f"Brain mask {brain.sum() * voxel_mm3 / 1000:.0f} mL; robust z > {p.z_threshold:g} ({p.polarity}); "
            f"{kept} candidate(s) kept, {dropped} component(s) rejected by size/depth.",
        ]
        return SegmentationResult(labels=labels, notes=notes)


def _ellipsoid(radius_mm: float, spacing: tuple[float, ...]) -> np.ndarray:
    """Boolean structuring element of a ball of ``radius_mm`` on an anisotropic grid."""
    half = [int(np.floor(radius_mm / s)) for s in spacing]
    grids = np.ogrid[tuple(slice(-h, h + 1) for h in half)]
    return sum((g * s) ** 2 for g, s in zip(grids, spacing)) <= radius_mm ** 2


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndi.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == sizes.argmax()


def _fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    for k in range(mask.shape[0]):
        mask[k] = ndi.binary_fill_holes(mask[k])
    return mask


def brain_mask(array: np.ndarray, spacing: tuple[float, float, float], p: OutlierParams) -> np.ndarray:
    """Boolean brain (head interior) mask; raises InputNotSupported when none can be found."""
    smoothed = ndi.gaussian_filter(array, [p.mask_smoothing_mm / s for s in spacing])
    sample = smoothed[:, ::2, ::2]
    if float(sample.max()) <= float(sample.min()):
        raise InputNotSupported("no head found: the image is constant")
    try:
        if p.mask_classes == 3:
            low, high = threshold_multiotsu(sample, classes=3)
            tissue = (smoothed > low) & (smoothed <= high)
        else:
            tissue = smoothed > threshold_otsu(sample)
    except ValueError as exc:  # too few distinct intensities for the thresholds
        raise InputNotSupported(f"no head found: {exc}") from exc
    del smoothed
    ball = _ellipsoid(p.mask_opening_mm, spacing)
    core = _largest_component(ndi.binary_erosion(tissue, ball))
    brain = _fill_holes_per_slice(ndi.binary_dilation(core, ball) & tissue)
    del core, tissue
    if p.mask_erosion_mm > 0:
        brain = ndi.binary_erosion(brain, _ellipsoid(p.mask_erosion_mm, spacing))
    volume_mm3 = float(brain.sum()) * float(np.prod(spacing))
    if volume_mm3 < p.min_mask_volume_mm3:
        raise InputNotSupported(
            f"no head found: the brain mask is {volume_mm3 / 1000:.1f} mL, "
            f"less than {p.min_mask_volume_mm3 / 1000:g} mL (is this a brain MR series?)")
    return brain


def robust_z(array: np.ndarray, spacing: tuple[float, float, float], brain: np.ndarray,
             p: OutlierParams) -> np.ndarray:
    """Float32 robust z-score of the smoothed intensity against the brain mask's median and MAD."""
    z = ndi.gaussian_filter(array, [p.smoothing_mm / s for s in spacing]) if p.smoothing_mm > 0 else array.copy()

    def stats(values: np.ndarray) -> tuple[float, float]:
        median = float(np.median(values))
        mad = float(np.median(np.abs(values - median))) * _MAD_TO_SIGMA
        return median, max(mad, 1e-6 * max(abs(median), 1.0))

    overall = stats(z[brain])
    min_pixels = p.min_slice_area_mm2 / (spacing[1] * spacing[2])
    for k in range(z.shape[0]):
        inside = z[k][brain[k]]
        median, mad = stats(inside) if p.per_slice_statistics and inside.size >= min_pixels else overall
        z[k] -= median
        z[k] /= mad
    return z


def outliers(z: np.ndarray, brain: np.ndarray, threshold: float, polarity: str) -> np.ndarray:
    """Voxels of the mask beyond the threshold in the chosen direction, holes filled per slice."""
    if polarity == "bright":
        found = z > threshold
    elif polarity == "dark":
        found = z < -threshold
    else:
        found = np.abs(z) > threshold
    found &= brain
    return _fill_holes_per_slice(found)


def filter_components(candidates: np.ndarray, brain: np.ndarray, spacing: tuple[float, float, float],
                      p: OutlierParams) -> tuple[np.ndarray, int, int]:
    """uint8 label map of the components that pass size and depth; also (kept, rejected) counts."""
    components, count = ndi.label(candidates)
    if count == 0:
        return np.zeros(candidates.shape, np.uint8), 0, 0
    sizes = np.bincount(components.ravel(), minlength=count + 1)
    voxel_mm3 = float(np.prod(spacing))
    keep = (sizes * voxel_mm3 >= p.min_volume_mm3) & (sizes <= p.max_fraction * float(brain.sum()))
    if p.min_depth_mm > 0:
        deep = np.zeros(brain.shape, bool)
        for k in range(brain.shape[0]):
            if brain[k].any():
                deep[k] = ndi.distance_transform_edt(brain[k], sampling=spacing[1:]) >= p.min_depth_mm
        reaches = np.zeros(count + 1, bool)
        reaches[np.unique(components[deep & candidates])] = True
        keep &= reaches
    keep[0] = False
    labels = (keep[components] * LESION_LABEL).astype(np.uint8)
    kept = int(keep.sum())
    return labels, kept, count - kept
