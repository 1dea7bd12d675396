"""Tile and slide quality control: tissue ratio, blur (variance of the Laplacian), stain check.

Per tile (grid A, 224 px at 0.5 µm/px by default): the tissue ratio (share of pixels that are saturated or
darker than the glass, on every 4th pixel of each axis) and the variance of the Laplacian of the grey
image (HistoQC's ``laplacian_var``; low = out of focus). Tiles are measured a block at a time (one grey
conversion and one integer Laplacian per block), so QC costs little next to decoding the pixels.

Per slide: tissue ratio, blur ratio (blurry tissue tiles / tissue tiles), focus score (median variance of
the Laplacian over tissue tiles), H&E stain check (Macenko vectors vs Ruifrok's), and a decision: ``pass``,
``warn`` (recorded in the report) or ``fail`` (the slide ends ``failed`` with the reason); no tissue at all
ends the slide ``skipped``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import cv2
import numpy as np

from inference.pathology.stain import StainEstimate, estimate_stains
from inference.pathology.tiling import Block, TileGrid

__all__ = ["BACKGROUND", "BLURRY", "KEPT", "LOW_TISSUE", "QcParams", "SlideQc", "TileQc", "decide", "measure_block",
           "measure_block_reference", "tile_state", "tiles_from_state"]

# Tile status codes in the grid (uint8)
BACKGROUND, LOW_TISSUE, BLURRY, KEPT = 0, 1, 2, 3
STATUS_NAMES = {BACKGROUND: "background", LOW_TISSUE: "low_tissue", BLURRY: "blurry", KEPT: "kept"}

_SAMPLE_PER_TILE = 64
_SAMPLE_MAX = 60_000


@dataclass(frozen=True)
class QcParams:
    """QC thresholds (data: every report records them). Blur thresholds are scanner-dependent: calibrate."""

    tile_px: int = 224
    tile_mpp: float = 0.5
    block_tiles: int = 8
    min_tile_tissue: float = 0.5  # a tile is kept when its tissue ratio is above this
    candidate_mask_fraction: float = 0.05  # tiles the low-resolution mask covers less than this: background
    blur_threshold: float = 60.0  # variance of the Laplacian (grey 0–255) at tile_mpp below which a tile is blurry
    max_blur_ratio: float = 0.5  # fail the slide above this share of blurry tissue tiles
    warn_blur_ratio: float = 0.2
    min_tissue_mm2: float = 0.05  # warn under this much kept tissue
    stain_check: bool = True

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class TileQc:
    """Per-tile results on the grid, as small arrays (a 100 000² px slide has ≈ 50 000 tiles)."""

    grid: TileGrid
    status: np.ndarray  # uint8 (rows, cols): BACKGROUND, LOW_TISSUE, BLURRY, KEPT
    tissue_ratio: np.ndarray  # float32 (rows, cols); NaN where not read
    laplacian_var: np.ndarray  # float32 (rows, cols); NaN where not measured
    samples: list[np.ndarray] = field(default_factory=list)  # stain pixel samples from kept tiles

    @classmethod
    def empty(cls, grid: TileGrid) -> "TileQc":
        shape = (grid.rows, grid.cols)
        return cls(grid, np.zeros(shape, np.uint8), np.full(shape, np.nan, np.float32),
                   np.full(shape, np.nan, np.float32))

    def counts(self) -> dict[str, int]:
        values = np.bincount(self.status.ravel(), minlength=4)
        return {STATUS_NAMES[i]: int(values[i]) for i in range(4)}

    def add(self, block: Block, ratio: np.ndarray, lap: np.ndarray, status: np.ndarray,
            sample: np.ndarray | None) -> None:
        sl = (slice(block.row, block.row + block.n_rows), slice(block.col, block.col + block.n_cols))
        read = status != BACKGROUND
        self.tissue_ratio[sl] = np.where(read, ratio, self.tissue_ratio[sl])
        self.laplacian_var[sl] = np.where(read, lap, self.laplacian_var[sl])
        self.status[sl] = np.where(read, status, self.status[sl])
        if sample is not None and len(sample) and sum(len(s) for s in self.samples) < _SAMPLE_MAX:
            self.samples.append(sample)


def measure_block(pixels: np.ndarray, block: Block, tile_px: int, candidates: np.ndarray,
                  saturation_threshold: int, grey_threshold: float, params: QcParams, sample: bool = True
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Tissue ratio, variance of the Laplacian and status of each tile of a block (vectorised).

    ``pixels`` is the block at the grid's resolution ((n_rows·tile_px, n_cols·tile_px, 3));
    ``candidates`` says which tiles of the block the tissue mask proposed (the others stay background);
    ``sample`` whether to take stain pixels from its kept tiles.

    Both measures use every 4th row only, so only those rows' Laplacian is computed (from the grey rows
    just above, on and below them), and only over the rows of tiles that hold tissue: the same integers as
    ``cv2.Laplacian`` of the whole block, for a fraction of the work; per-tile sums are exact integers.
    :func:`measure_block_reference` is the plain whole-block computation (the tests hold both to the same
    results).
    """
    nr, nc, t = block.n_rows, block.n_cols, tile_px
    if t % 4 or pixels.shape[0] < 2 or pixels.shape[1] < 2:
        return measure_block_reference(pixels, block, tile_px, candidates, saturation_threshold, grey_threshold,
                                       params, sample)
    q = t // 4
    small = _every_4th_pixel(pixels)
    sat = cv2.cvtColor(small, cv2.COLOR_RGB2HSV)[..., 1]
    tissue = (sat > saturation_threshold) | (cv2.cvtColor(small, cv2.COLOR_RGB2GRAY) < grey_threshold)
    count = tissue.view(np.uint8).reshape(nr * q, nc, q).sum(axis=2, dtype=np.int32).reshape(nr, q, nc).sum(axis=1)
    ratio = (count / (q * q)).astype(np.float32)
    tissue_tiles = candidates & (ratio > params.min_tile_tissue)
    var = np.full((nr, nc), np.nan, np.float32)
    if tissue_tiles.any():  # focus matters only where there is tissue
        rows = np.flatnonzero(tissue_tiles.any(axis=1))
        r0, r1 = int(rows[0]), int(rows[-1]) + 1
        y0 = max(0, r0 * t - 4)  # from the sampled row above (for the row above r0·t; a multiple of 4)
        lap = _sampled_laplacian(cv2.cvtColor(pixels[y0:r1 * t], cv2.COLOR_RGB2GRAY))[(r0 * t - y0) // 4:]
        lap = lap.astype(np.int32)  # every 4th row of tile rows r0 … r1-1: 12 544 samples a tile
        acc = np.int32 if t * 1020 ** 2 < 2 ** 31 else np.int64  # |Laplacian| ≤ 4·255: row sums fit
        m = r1 - r0
        s1 = lap.reshape(m * q, nc, t).sum(axis=2, dtype=acc).reshape(m, q, nc).sum(axis=1, dtype=np.int64)
        lap *= lap
        s2 = lap.reshape(m * q, nc, t).sum(axis=2, dtype=acc).reshape(m, q, nc).sum(axis=1, dtype=np.int64)
        n = q * t  # exact sums; the variance rounds once
        sub = tissue_tiles[r0:r1]
        var[r0:r1][sub] = ((n * s2 - s1 * s1) / (n * n))[sub]
    return _finish(pixels, ratio, var, tissue_tiles, candidates, t, grey_threshold, params, sample)


def _every_4th_pixel(pixels: np.ndarray) -> np.ndarray:
    """``pixels[::4, ::4]`` (what ``cv2.resize`` with ``INTER_NEAREST`` to a quarter gives), as RGBX: each
    pixel is read as one 32-bit word (its 3 bytes and the next pixel's first), a cheaper gather. The colour
    conversions ignore the fourth byte."""
    h, w = pixels.shape[:2]
    if h % 4 or w % 4 or pixels.strides[1:] != (3, 1):
        return cv2.resize(pixels, (w // 4, h // 4), interpolation=cv2.INTER_NEAREST)
    words = pixels[0::4].reshape(h // 4, w * 3).view(np.uint32)[:, 0::3]
    return np.ascontiguousarray(words).view(np.uint8).reshape(words.shape[0], w // 4, 4)


_HORIZONTAL = np.array([[1, -4, 1]], np.float32)


def _sampled_laplacian(grey: np.ndarray) -> np.ndarray:
    """``cv2.Laplacian(grey, CV_16S)[0::4]`` (3×3 kernel, reflect-101 borders), computed on those rows only
    (the block's height is a multiple of 4, so every sampled row has a real row below it)."""
    # left + right - 4·centre, then the rows below and above
    lap = cv2.filter2D(grey[0::4], cv2.CV_16S, _HORIZONTAL, borderType=cv2.BORDER_REFLECT_101)
    lap += grey[1::4]
    lap[0] += grey[1]  # above the first row: reflected
    lap[1:] += grey[3::4][:len(lap) - 1]  # above the others
    return lap


def measure_block_reference(pixels: np.ndarray, block: Block, tile_px: int, candidates: np.ndarray,
                            saturation_threshold: int, grey_threshold: float, params: QcParams,
                            sample: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """:func:`measure_block` computed the plain way (whole-block grey and Laplacian); any tile size."""
    nr, nc, t = block.n_rows, block.n_cols, tile_px
    q = max(1, t // 4)  # tissue ratio on every 4th pixel of each axis: a statistic, not an image
    small = cv2.resize(pixels, (nc * q, nr * q), interpolation=cv2.INTER_NEAREST)  # pixels [::4, ::4]
    sat = cv2.cvtColor(small, cv2.COLOR_RGB2HSV)[..., 1]
    tissue = (sat > saturation_threshold) | (cv2.cvtColor(small, cv2.COLOR_RGB2GRAY) < grey_threshold)
    ratio = tissue.reshape(nr, q, nc, q).mean(axis=(1, 3), dtype=np.float64).astype(np.float32)
    tissue_tiles = candidates & (ratio > params.min_tile_tissue)
    var = np.full((nr, nc), np.nan, np.float32)
    if tissue_tiles.any():
        lap = cv2.Laplacian(cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY), cv2.CV_16S)
        for r, c in zip(*np.nonzero(tissue_tiles)):
            _, std = cv2.meanStdDev(lap[r * t:(r + 1) * t:4, c * t:(c + 1) * t])
            var[r, c] = std[0, 0] ** 2
    return _finish(pixels, ratio, var, tissue_tiles, candidates, t, grey_threshold, params, sample)


def _finish(pixels: np.ndarray, ratio: np.ndarray, var: np.ndarray, tissue_tiles: np.ndarray,
            candidates: np.ndarray, t: int, grey_threshold: float, params: QcParams, sample: bool
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Statuses from the measures, and stain pixels from the kept tiles."""
    status = np.full(ratio.shape, BACKGROUND, np.uint8)
    status[candidates] = LOW_TISSUE
    status[tissue_tiles & (var < params.blur_threshold)] = BLURRY
    status[tissue_tiles & (var >= params.blur_threshold)] = KEPT
    stain_pixels = None
    if sample and params.stain_check and (status == KEPT).any():
        # a fixed pattern of pixels in every kept tile, tissue pixels only: deterministic
        idx = (np.arange(_SAMPLE_PER_TILE) * 7919) % (t * t)
        rows, cols = np.nonzero(status == KEPT)
        width = pixels.shape[1]
        flat = ((rows * t * width + cols * t)[:, None] + ((idx // t) * width + idx % t)[None, :]).ravel()
        px = pixels.reshape(-1, 3).take(flat, axis=0)  # pixels[y, x] in one flat gather
        stain_pixels = px[px.sum(axis=1, dtype=np.uint16) < 3 * grey_threshold]  # not glass
    return ratio, var, status, stain_pixels


@dataclass(frozen=True)
class SlideQc:
    """The slide-level QC figures and the decision."""

    status: str  # pass | warn | fail | empty
    tissue_ratio: float  # tissue mask area / slide area
    tissue_area_mm2: float | None
    kept_tissue_mm2: float | None
    blur_ratio: float | None
    focus_score: float | None  # median variance of the Laplacian over tissue tiles
    stain: StainEstimate | None
    warnings: tuple[str, ...]
    reason: str | None  # why the slide failed or is empty

    def to_json(self) -> dict:
        return {"status": self.status, "tissue_ratio": self.tissue_ratio, "tissue_area_mm2": self.tissue_area_mm2,
                "kept_tissue_mm2": self.kept_tissue_mm2, "blur_ratio": self.blur_ratio,
                "focus_score": self.focus_score, "stain": self.stain.to_json() if self.stain else None,
                "warnings": list(self.warnings), "reason": self.reason}


def decide(tiles: TileQc, mask_tissue_ratio: float, slide_area_mm2: float | None, params: QcParams,
           extra_warnings: list[str] | None = None) -> SlideQc:
    """Slide-level QC from the tile results: figures, warnings and pass/warn/fail/empty."""
    counts = tiles.counts()
    warnings = list(extra_warnings or [])
    tissue_tiles = counts["kept"] + counts["blurry"]
    area = tiles.grid.tile_area_mm2
    tissue_area = round(mask_tissue_ratio * slide_area_mm2, 4) if slide_area_mm2 else None
    if tissue_tiles == 0:
        reason = ("no tissue found: the tissue mask is empty" if mask_tissue_ratio == 0 else
                  f"no tile has more than {params.min_tile_tissue:.0%} tissue "
                  f"(tissue mask covers {mask_tissue_ratio:.1%} of the slide)")
        return SlideQc("empty", round(mask_tissue_ratio, 5), tissue_area, 0.0, None, None, None,
                       tuple(warnings), reason)
    blur_ratio = round(counts["blurry"] / tissue_tiles, 4)
    lap = tiles.laplacian_var[(tiles.status == KEPT) | (tiles.status == BLURRY)]
    focus = round(float(np.median(lap)), 2)
    stain = None
    if params.stain_check and tiles.samples:
        stain = estimate_stains(np.concatenate(tiles.samples)[:_SAMPLE_MAX])
        if stain.looks_like_he is False:
            closer = " (the second stain is closer to DAB: an IHC slide?)" if (
                stain.dab_angle_deg is not None and stain.eosin_angle_deg is not None
                and stain.dab_angle_deg < stain.eosin_angle_deg) else ""
            warnings.append(f"the stain does not look like H&E: stain vectors are {stain.hematoxylin_angle_deg}° "
                            f"and {stain.eosin_angle_deg}° from hematoxylin and eosin{closer}")
        elif stain.looks_like_he is None:
            warnings.append("too few stained pixels to check the stain")
    kept_mm2 = round(counts["kept"] * area, 4)
    if kept_mm2 < params.min_tissue_mm2:
        warnings.append(f"little usable tissue: {kept_mm2} mm² in {counts['kept']} tile(s)")
    if blur_ratio > params.max_blur_ratio:
        reason = (f"{blur_ratio:.0%} of the tissue tiles are out of focus (variance of the Laplacian under "
                  f"{params.blur_threshold:g}; limit {params.max_blur_ratio:.0%})")
        return SlideQc("fail", round(mask_tissue_ratio, 5), tissue_area, kept_mm2, blur_ratio, focus, stain,
                       tuple(warnings), reason)
    if blur_ratio > params.warn_blur_ratio:
        warnings.append(f"{blur_ratio:.0%} of the tissue tiles are out of focus and were left out")
    return SlideQc("warn" if warnings else "pass", round(mask_tissue_ratio, 5), tissue_area, kept_mm2, blur_ratio,
                   focus, stain, tuple(warnings), None)


def tile_state(tiles: TileQc) -> dict:
    """The tile grid and statuses as compact JSON (zlib + base64), so a later stage can use them."""
    import base64
    import zlib

    return {"grid": {"width": tiles.grid.width, "height": tiles.grid.height, "tile_px": tiles.grid.tile_px,
                     "step": tiles.grid.step, "mpp": tiles.grid.mpp},
            "status": base64.b64encode(zlib.compress(tiles.status.tobytes(), 6)).decode("ascii")}


def tiles_from_state(state: dict) -> TileQc:
    """The inverse of :func:`tile_state` (statuses only; per-tile measures are not carried)."""
    import base64
    import zlib

    g = state["grid"]
    grid = TileGrid(int(g["width"]), int(g["height"]), int(g["tile_px"]), float(g["step"]), float(g["mpp"]))
    tiles = TileQc.empty(grid)
    status = np.frombuffer(zlib.decompress(base64.b64decode(state["status"])), np.uint8)
    tiles.status[...] = status.reshape(grid.rows, grid.cols)
    return tiles
