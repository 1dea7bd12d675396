"""Low-resolution overview, 1024 px thumbnail and tissue mask of a slide.

The overview is read level by level in blocks and reduced block by block (``cv2.INTER_AREA``), so a slide
without a pyramid costs time but never a full-resolution level in memory (HistoQC#297 read a whole level
for hours). The tissue mask is Otsu on HSV saturation (clamped, so an empty slide stays empty and a slide
full of tissue is not split into "pale" and "dark"), morphological opening and closing, small-object
removal, with pen marks (green/teal/blue ink) and black ink excluded. Ideas and parameters follow CLAM's
and TIAToolbox's maskers (reimplemented; see WSI.md §2).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

from inference.pathology.reader import Slide

__all__ = ["Overview", "TissueMaskParams", "read_overview", "thumbnail", "tissue_mask"]

THUMBNAIL_SIZE = 1024
"""Longest side of the thumbnail (and of every PNG served for a slide) in pixels."""


@dataclass(frozen=True)
class Overview:
    """The whole slide at low resolution: ``scale`` level-0 pixels per overview pixel, per axis."""

    image: np.ndarray
    scale_x: float
    scale_y: float
    level: int  # the pyramid level it was read from

    @property
    def shape(self) -> tuple[int, int]:
        return self.image.shape[0], self.image.shape[1]


@dataclass(frozen=True)
class TissueMaskParams:
    """Tissue mask parameters (data, so that reports can record them)."""

    overview_um_per_px: float = 4.0  # the mask is computed at this resolution (CLAM: 4–16 µm/px)
    max_overview_side: int = 4096
    min_saturation: int = 15  # Otsu on saturation, clamped to [min_saturation, max_saturation]
    max_saturation: int = 40
    glass_margin: int = 8  # also tissue: grey level this much darker than the glass (pale IHC, faint H&E)
    median_px: int = 5
    open_um: float = 12.0
    close_um: float = 24.0
    min_object_mm2: float = 0.005
    pen_filter: bool = True

    def to_json(self) -> dict:
        return asdict(self)


def overview_size(width: int, height: int, mpp: float | None, params: TissueMaskParams) -> tuple[int, int]:
    """Overview size: about ``overview_um_per_px``, never under the thumbnail size nor over the cap."""
    longest = max(width, height)
    side = longest * mpp / params.overview_um_per_px if mpp else THUMBNAIL_SIZE
    side = min(max(side, THUMBNAIL_SIZE), params.max_overview_side, longest)
    factor = side / longest
    return max(1, round(width * factor)), max(1, round(height * factor))


def read_overview(slide: Slide, size: tuple[int, int], block: int = 2048) -> Overview:
    """The slide reduced to ``size`` (width, height), read in blocks from the nearest level."""
    meta = slide.metadata
    out_w, out_h = size
    sx, sy = meta.width / out_w, meta.height / out_h
    level = slide.best_level(min(sx, sy))
    lv = slide.levels[level]
    ds_x, ds_y = meta.width / lv.width, meta.height / lv.height
    out = np.full((out_h, out_w, 3), 255, np.uint8)
    fx, fy = ds_x / sx, ds_y / sy  # overview pixels per level pixel
    for by in range(0, lv.height, block):
        for bx in range(0, lv.width, block):
            bw, bh = min(block, lv.width - bx), min(block, lv.height - by)
            ox0, oy0 = round(bx * fx), round(by * fy)
            ox1, oy1 = min(round((bx + bw) * fx), out_w), min(round((by + bh) * fy), out_h)
            if ox1 <= ox0 or oy1 <= oy0:
                continue
            pixels = slide.read_level(level, bx, by, bw, bh)
            if (ox1 - ox0, oy1 - oy0) != (bw, bh):
                pixels = cv2.resize(pixels, (ox1 - ox0, oy1 - oy0), interpolation=cv2.INTER_AREA)
            out[oy0:oy1, ox0:ox1] = pixels
    return Overview(out, sx, sy, level)


def thumbnail(overview: Overview, max_side: int = THUMBNAIL_SIZE) -> np.ndarray:
    """The overview reduced so that its longest side is ``max_side`` (never enlarged)."""
    h, w = overview.shape
    factor = min(1.0, max_side / max(h, w))
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    if size == (w, h):
        return overview.image.copy()
    return cv2.resize(overview.image, size, interpolation=cv2.INTER_AREA)


def pen_marks(hsv: np.ndarray) -> np.ndarray:
    """Green/teal and strongly saturated blue ink, and near-black ink (folds and marker): boolean mask.

    Hematoxylin is purple-blue (OpenCV hue ≈ 120–165) and IHC counterstain light blue (≈ 100–115, pale),
    so only dark, saturated blue counts as ink.
    """
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    green = (h >= 35) & (h < 100) & (s > 50)
    blue = (h >= 100) & (h < 130) & (s > 150) & (v < 180)
    black = v < 40
    return green | blue | black


def tissue_mask(rgb: np.ndarray, um_per_px: float | None, params: TissueMaskParams = TissueMaskParams()
                ) -> tuple[np.ndarray, dict]:
    """Boolean tissue mask of an overview image (same size), and what was measured while making it.

    A pixel is tissue when it is saturated (H&E) or clearly darker than the glass (pale IHC counterstain
    has almost no saturation). The mask is computed at ``params.overview_um_per_px`` or coarser, where
    nuclei and cytoplasm have blended, and ``um_per_px`` scales the morphology (unknown: the default).
    """
    um = um_per_px or params.overview_um_per_px
    full_size = (rgb.shape[1], rgb.shape[0])
    if um < params.overview_um_per_px:
        factor = um / params.overview_um_per_px
        rgb = cv2.resize(rgb, (max(1, round(rgb.shape[1] * factor)), max(1, round(rgb.shape[0] * factor))),
                         interpolation=cv2.INTER_AREA)
        um = params.overview_um_per_px
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    if params.median_px > 1 and min(rgb.shape[:2]) > params.median_px:
        saturation = cv2.medianBlur(hsv[..., 1], params.median_px)
        gray = cv2.medianBlur(gray, params.median_px)
    else:
        saturation = hsv[..., 1]
    otsu, _ = cv2.threshold(saturation, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    threshold = int(min(max(otsu, params.min_saturation), params.max_saturation))
    glass = max(float(np.percentile(gray, 99)), 200.0)
    mask = (saturation > threshold) | (gray < glass - params.glass_margin)
    pen = pen_marks(hsv) if params.pen_filter else np.zeros(mask.shape, bool)
    if params.pen_filter and pen.any():
        pen = cv2.dilate(pen.astype(np.uint8), _disk(max(1, round(8 / um)))) > 0
        mask &= ~pen
    mask = mask.astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, _disk(max(1, round(params.open_um / um / 2))))
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, _disk(max(1, round(params.close_um / um / 2))))
    if params.pen_filter:
        mask[pen] = 0
    min_px = params.min_object_mm2 * 1e6 / (um * um)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    keep = np.zeros(count, bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_px
    mask = keep[labels]
    if (mask.shape[1], mask.shape[0]) != full_size:
        mask = cv2.resize(mask.astype(np.uint8), full_size, interpolation=cv2.INTER_NEAREST) > 0
    info = {"saturation_threshold": threshold, "otsu_threshold": float(otsu), "glass_grey_level": glass,
            "pen_fraction": round(float(pen.mean()), 5), "pieces": int(keep.sum()),
            "um_per_px": round(um, 3)}
    return mask, info


def _disk(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def um_per_overview_px(overview: Overview, mpp: float | None) -> float | None:
    return overview.scale_x * mpp if mpp else None


def mask_png_image(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The mask as an 8-bit image (255 = tissue) at ``size`` (width, height), nearest neighbour."""
    img = mask.astype(np.uint8) * 255
    if (img.shape[1], img.shape[0]) != size:
        img = cv2.resize(img, size, interpolation=cv2.INTER_NEAREST)
    return img


def scale_for(size: tuple[int, int], width: int, height: int) -> tuple[float, float]:
    """Level-0 pixels per pixel of an image of ``size`` showing the whole slide."""
    return width / size[0], height / size[1]

