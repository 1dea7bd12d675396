"""Tile grids at a target resolution, read in blocks of several tiles at the nearest pyramid level.

A :class:`ResolutionReader` reads any level-0 rectangle at a target µm/px from the most detailed level
that is not finer than needed, and resizes (``INTER_AREA``) only when that level's resolution differs
from the target by more than 2 %. Reading aligned blocks of 8×8 tiles and slicing them is 2–2.3× faster
than one read per tile (WSI.md §3). :func:`ordered_map` runs block work on a small thread pool (the JPEG
decoders and OpenCV release the GIL) with a bounded number of blocks in flight, so memory stays flat
whatever the slide size, and yields results in a fixed order, so runs are reproducible.
"""

from __future__ import annotations

import math
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, TypeVar

import cv2
import numpy as np

from inference.pathology.reader import Slide

__all__ = ["Block", "ResolutionReader", "TileGrid", "blocks_of", "mask_fraction_per_tile",
           "mask_fraction_per_tile_reference", "ordered_map"]

T = TypeVar("T")
R = TypeVar("R")

RESIZE_TOLERANCE = 0.02
"""A level whose resolution is within 2 % of the target is used as is (no resampling)."""


class ResolutionReader:
    """Reads level-0 rectangles at ``target_mpp`` (``slide_mpp`` is the level-0 µm/px)."""

    def __init__(self, slide: Slide, slide_mpp: float, target_mpp: float) -> None:
        self.slide = slide
        ratio = target_mpp / slide_mpp  # level-0 px per target px
        self.level = slide.best_level(ratio)
        self.level_downsample = slide.levels[self.level].downsample
        self.resize = abs(ratio / self.level_downsample - 1) > RESIZE_TOLERANCE
        self.scale = ratio if self.resize else self.level_downsample  # level-0 px per output px
        self.mpp = self.scale * slide_mpp  # the resolution actually delivered

    def read(self, x0: float, y0: float, width: int, height: int) -> np.ndarray:
        """RGB (height, width, 3) at the target resolution, origin (x0, y0) in level-0 pixels."""
        ds = self.level_downsample
        if not self.resize:
            return self.slide.read_level(self.level, round(x0 / ds), round(y0 / ds), width, height)
        lx, ly = x0 / ds, y0 / ds
        lw, lh = width * self.scale / ds, height * self.scale / ds
        ix, iy = math.floor(lx), math.floor(ly)
        iw, ih = max(1, math.ceil(lx + lw) - ix), max(1, math.ceil(ly + lh) - iy)
        pixels = self.slide.read_level(self.level, ix, iy, iw, ih)
        interpolation = cv2.INTER_AREA if self.scale > ds else cv2.INTER_LINEAR
        return cv2.resize(pixels, (width, height), interpolation=interpolation)


@dataclass(frozen=True)
class TileGrid:
    """Non-overlapping square tiles of ``tile_px`` at ``mpp``; ``step`` level-0 px per tile side.

    Only whole tiles inside the slide count (``rows`` × ``cols`` = the possible tiles).
    """

    width: int
    height: int
    tile_px: int
    step: float
    mpp: float

    @classmethod
    def for_reader(cls, reader: ResolutionReader, width: int, height: int, tile_px: int) -> "TileGrid":
        return cls(width, height, tile_px, tile_px * reader.scale, reader.mpp)

    @property
    def cols(self) -> int:
        return int(self.width // self.step)

    @property
    def rows(self) -> int:
        return int(self.height // self.step)

    @property
    def possible(self) -> int:
        return self.rows * self.cols

    @property
    def tile_area_mm2(self) -> float:
        return (self.tile_px * self.mpp / 1000) ** 2

    def origin(self, row: int, col: int) -> tuple[float, float]:
        return col * self.step, row * self.step

    def to_json(self) -> dict:
        return {"size_px": self.tile_px, "mpp": round(self.mpp, 4), "level0_px": round(self.step, 3),
                "rows": self.rows, "cols": self.cols}


def mask_fraction_per_tile(grid: TileGrid, mask: np.ndarray, scale_x: float, scale_y: float) -> np.ndarray:
    """Share of each tile covered by a low-resolution mask (``scale`` level-0 px per mask px): (rows, cols).

    A mask pixel belongs to the tile under its centre. The bins are contiguous runs of mask rows and
    columns, so the counts are sums over runs, one axis then the other (exact, like one bincount per pixel).
    """
    if mask.dtype.kind not in "biu":  # fractional weights: summed in one pass, in pixel order
        return mask_fraction_per_tile_reference(grid, mask, scale_x, scale_y)
    h, w = mask.shape
    cols = np.minimum(((np.arange(w) + 0.5) * scale_x // grid.step).astype(np.int64), grid.cols)
    rows = np.minimum(((np.arange(h) + 0.5) * scale_y // grid.step).astype(np.int64), grid.rows)
    values = mask.view(np.uint8) if mask.dtype == bool else mask
    inside = _run_sums(_run_sums(values, cols, grid.cols + 1, 1), rows, grid.rows + 1, 0)
    total = np.outer(np.bincount(rows, minlength=grid.rows + 1), np.bincount(cols, minlength=grid.cols + 1))
    frac = np.divide(inside, total, out=np.zeros(total.shape), where=total > 0)
    return frac[:grid.rows, :grid.cols]


def _run_sums(values: np.ndarray, bins: np.ndarray, n: int, axis: int) -> np.ndarray:
    """Sums of ``values`` along ``axis`` over the runs of equal, non-decreasing ``bins`` (0 … n-1): n sums."""
    present = np.unique(bins)  # the bins that hold at least one value, in order
    shape = list(values.shape)
    shape[axis] = n
    sums = np.zeros(shape, np.int64)
    sums[(slice(None),) * axis + (present,)] = np.add.reduceat(values, np.searchsorted(bins, present), axis=axis,
                                                              dtype=np.int64)
    return sums


def mask_fraction_per_tile_reference(grid: TileGrid, mask: np.ndarray, scale_x: float, scale_y: float
                                     ) -> np.ndarray:
    """:func:`mask_fraction_per_tile` with one bincount over every mask pixel (the plain way; for tests)."""
    h, w = mask.shape
    cols = np.minimum(((np.arange(w) + 0.5) * scale_x // grid.step).astype(np.int64), grid.cols)
    rows = np.minimum(((np.arange(h) + 0.5) * scale_y // grid.step).astype(np.int64), grid.rows)
    index = rows[:, None] * (grid.cols + 1) + cols[None, :]
    size = (grid.rows + 1) * (grid.cols + 1)
    total = np.bincount(index.ravel(), minlength=size)
    inside = np.bincount(index.ravel(), weights=mask.ravel().astype(np.float64), minlength=size)
    frac = np.divide(inside, total, out=np.zeros(size), where=total > 0)
    return frac.reshape(grid.rows + 1, grid.cols + 1)[:grid.rows, :grid.cols]


@dataclass(frozen=True)
class Block:
    """``n_rows`` × ``n_cols`` tiles from (row, col): read at once, sliced into tiles."""

    row: int
    col: int
    n_rows: int
    n_cols: int


def blocks_of(selected: np.ndarray, block_tiles: int) -> list[Block]:
    """Blocks of up to ``block_tiles``² tiles, in row-major order, that hold at least one selected tile."""
    rows, cols = selected.shape
    out = []
    for r in range(0, rows, block_tiles):
        for c in range(0, cols, block_tiles):
            sub = selected[r:r + block_tiles, c:c + block_tiles]
            if sub.any():
                out.append(Block(r, c, sub.shape[0], sub.shape[1]))
    return out


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int = 2, in_flight: int | None = None
                ) -> Iterator[R]:
    """``map(fn, items)`` on ``workers`` threads, at most ``in_flight`` results pending, in input order."""
    if workers <= 1:
        yield from map(fn, items)
        return
    limit = in_flight or 2 * workers
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="slide-block") as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= limit:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
