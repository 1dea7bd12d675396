"""Synthetic H&E-like pyramidal TIFFs of any size, written tile by tile (tests, benchmarks, self-checks).

Pink "tissue" inside a few large ellipses on white glass, with dark purple elliptic "nuclei" on a jittered
grid; level 0 plus halvings, 256 px JPEG tiles (YCbCr 4:2:0, Aperio-like). Every tile is a pure function
of its coordinates, so a 40 000 × 40 000 px slide is written without ever holding a level in memory, and
nuclei that straddle tile borders are drawn identically on both sides. RGB is converted to YCbCr before
writing (tifffile stores samples as given; WSI.md §3).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

__all__ = ["NUCLEUS_SPACING", "nuclei_truth", "write_synthetic_slide"]

TILE = 256
NUCLEUS_SPACING = 64  # level-0 px between nuclei centres on the jittered grid (16 µm at 0.25 µm/px)
_GLASS = (245, 245, 245)
_STROMA = (235, 150, 215)
_NUCLEUS = (95, 55, 140)
_BLOBS = [(0.35, 0.4, 0.28, 0.3), (0.65, 0.6, 0.25, 0.32), (0.5, 0.85, 0.3, 0.12)]


def _tissue(xs: np.ndarray, ys: np.ndarray, width: int, height: int, blobs: list[tuple[float, float, float, float]]
            ) -> np.ndarray:
    """Boolean tissue mask at level-0 coordinates (xs, ys broadcast)."""
    inside = np.zeros(np.broadcast(xs, ys).shape, bool)
    for cx, cy, rx, ry in blobs:
        inside |= ((xs - cx * width) / (rx * width)) ** 2 + ((ys - cy * height) / (ry * height)) ** 2 <= 1
    return inside


def _uniform(gx: np.ndarray, gy: np.ndarray, seed: int, k: int) -> np.ndarray:
    """A reproducible uniform [0, 1) value per grid cell and index ``k`` (an integer hash, vectorised)."""
    h = (gx.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) ^ gy.astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
         ^ np.uint64((seed * 0x165667B1 + k * 0x27D4EB2F) & 0xFFFFFFFFFFFFFFFF))
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> np.uint64(33)
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _nuclei(x0: float, y0: float, x1: float, y1: float, width: int, height: int, blobs, seed: int) -> np.ndarray:
    """(n, 5) array of (cx, cy, ax, ay, angle): nuclei whose grid cell is near [x0, x1) × [y0, y1)."""
    s = NUCLEUS_SPACING
    gy, gx = np.mgrid[max(0, int(y0 // s) - 1):int(y1 // s) + 2, max(0, int(x0 // s) - 1):int(x1 // s) + 2]
    gx, gy = gx.ravel(), gy.ravel()
    jx, jy, ax, ay, angle, keep = (_uniform(gx, gy, seed, k) for k in range(6))
    cx, cy = (gx + 0.2 + 0.6 * jx) * s, (gy + 0.2 + 0.6 * jy) * s
    ok = (keep >= 0.25) & (cx < width) & (cy < height)
    ok &= _tissue(cx, cy, width, height, blobs)
    return np.stack([cx, cy, 11 + 5 * ax, 8 + 4 * ay, 180 * angle], axis=1)[ok]


def nuclei_truth(width: int, height: int | None = None, seed: int = 0) -> np.ndarray:
    """Every nucleus drawn on a synthetic slide: (n, 5) (cx, cy, ax, ay, angle) in level-0 pixels."""
    height = height or width
    return _nuclei(0, 0, width, height, width, height, _BLOBS, seed)


def _render(x0: int, y0: int, w: int, h: int, scale: float, width: int, height: int, blobs, noise: np.ndarray,
            seed: int, empty: bool) -> np.ndarray:
    """RGB tile of (h, w) at ``scale`` level-0 px per pixel, origin (x0, y0) in level pixels."""
    img = np.empty((h, w, 3), np.uint8)
    img[:] = _GLASS
    if empty:
        return img
    xs = (np.arange(w) + x0 + 0.5) * scale
    ys = (np.arange(h) + y0 + 0.5) * scale
    inside = _tissue(xs[None, :], ys[:, None], width, height, blobs)
    if inside.any():
        oy, ox = y0 % 64, x0 % 64
        stroma = (np.array(_STROMA, np.int16) + noise[oy:oy + h, ox:ox + w, None]).clip(0, 255).astype(np.uint8)
        full = bool(inside.all())
        if full:
            img = stroma
        else:
            np.copyto(img, stroma, where=inside[..., None])
        X0, Y0, X1, Y1 = x0 * scale, y0 * scale, (x0 + w) * scale, (y0 + h) * scale
        for cx, cy, ax, ay, angle in _nuclei(X0, Y0, X1, Y1, width, height, blobs, seed).tolist():
            cv2.ellipse(img, (int((cx / scale - x0) * 16 + 0.5), int((cy / scale - y0) * 16 + 0.5)),
                        (max(16, int(ax / scale * 16 + 0.5)), max(16, int(ay / scale * 16 + 0.5))), angle, 0, 360,
                        _NUCLEUS, -1, cv2.LINE_8, 4)
        if not full:
            np.copyto(img, np.array(_GLASS, np.uint8), where=~inside[..., None])
    return img


def write_synthetic_slide(path: Path | str, width: int, height: int | None = None, *, mpp: float | None = 0.25,
                          levels: int | None = None, empty: bool = False, seed: int = 0, quality: int = 85,
                          workers: int = 1) -> Path:
    """Write a pyramidal tiled TIFF; ``mpp=None`` writes no resolution (a slide without pixel size).

    ``workers`` threads render and encode tiles (a 40 000² px slide takes minutes on one core)."""
    import tifffile

    from inference.pathology.tiling import ordered_map

    height = height or width
    path = Path(path)
    blobs = _BLOBS
    noise = np.random.default_rng(seed).normal(0, 10, (64 + TILE * 2, 64 + TILE * 2)).astype(np.int16)
    noise = cv2.GaussianBlur(noise.astype(np.float32), (0, 0), 1.5).astype(np.int16)
    if levels is None:
        levels = max(1, int(math.log2(max(width, height) / 512)) + 1)

    def to_ycbcr(a: np.ndarray) -> np.ndarray:  # JFIF full-range YCbCr (cv2 orders Y, Cr, Cb)
        return cv2.cvtColor(a, cv2.COLOR_RGB2YCrCb)[..., [0, 2, 1]]

    def tiles(level: int) -> Iterator[np.ndarray]:
        scale = 2 ** level
        lw, lh = math.ceil(width / scale), math.ceil(height / scale)
        origins = [(tx, ty) for ty in range(0, lh, TILE) for tx in range(0, lw, TILE)]
        yield from ordered_map(lambda o: to_ycbcr(_render(o[0], o[1], TILE, TILE, scale, width, height, blobs, noise,
                                                          seed, empty)), origins, workers=workers,
                               in_flight=4 * workers)

    options = dict(tile=(TILE, TILE), compression="jpeg", compressionargs={"level": quality}, photometric="ycbcr",
                   subsampling=(2, 2), dtype=np.uint8)
    if mpp:
        options.update(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    with tifffile.TiffWriter(path, bigtiff=width * height > 2 ** 28) as tif:
        for level in range(levels):
            scale = 2 ** level
            shape = (math.ceil(height / scale), math.ceil(width / scale), 3)
            tif.write(tiles(level), shape=shape, subfiletype=1 if level else 0, metadata=None,
                      maxworkers=workers, **options)
    return path
