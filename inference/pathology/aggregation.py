"""From per-tile nuclei counts to slide figures: counts by type, density per mm², hotspot regions.

Densities are per kept QC tile (count / tile area); the slide's mean, std, min and max are over kept tiles
and ``overall`` is all nuclei over all kept tissue. Hotspots are the top-k square windows (default ≈ 0.5 mm
a side, about one 40x high-power field) with the highest density, at least half covered by kept tiles,
chosen greedily without overlap, using integral images (no Python loop over windows).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from inference.pathology.qc import KEPT, TileQc

__all__ = ["AggregationParams", "SlideFigures", "aggregate"]


@dataclass(frozen=True)
class AggregationParams:
    hotspot_window_um: float = 500.0
    hotspot_count: int = 3
    hotspot_min_coverage: float = 0.5

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class SlideFigures:
    total: int
    by_type: dict[str, int]
    density: dict[str, float | None]  # mean, std, min, max (over kept tiles), overall
    density_by_type: dict[str, float | None]  # overall density per class
    regions_of_interest: list[dict]
    density_grid: np.ndarray  # float32 (rows, cols), NaN outside kept tiles
    kept_area_mm2: float

    def to_json(self) -> dict:
        return {"total": self.total, "by_type": self.by_type, "density_per_mm2": self.density,
                "density_per_mm2_by_type": self.density_by_type, "regions_of_interest": self.regions_of_interest,
                "tissue_area_analysed_mm2": self.kept_area_mm2}


def _stat(values: np.ndarray, fn) -> float | None:
    return round(float(fn(values)), 3) if values.size else None


def aggregate(counts: np.ndarray, qc: TileQc, classes: tuple[str, ...], slide_mpp: float,
              params: AggregationParams = AggregationParams()) -> SlideFigures:
    """Slide figures from ``counts`` (rows, cols, n_classes) on the QC grid."""
    grid = qc.grid
    kept = qc.status == KEPT
    area = grid.tile_area_mm2
    per_tile = counts.sum(axis=2).astype(np.float64)
    density = np.where(kept, per_tile / area, np.nan).astype(np.float32)
    values = density[kept]
    kept_area = float(kept.sum() * area)
    total = int(counts[kept].sum())
    by_type = {name: int(counts[..., i][kept].sum()) for i, name in enumerate(classes)}
    stats = {"mean": _stat(values, np.mean), "std": _stat(values, np.std), "min": _stat(values, np.min),
             "max": _stat(values, np.max),
             "overall": round(total / kept_area, 3) if kept_area else None}
    by_type_density = {name: (round(n / kept_area, 3) if kept_area else None) for name, n in by_type.items()}
    rois = hotspots(per_tile * kept, kept, grid.step, slide_mpp, area, params)
    return SlideFigures(total, by_type, stats, by_type_density, rois, density, round(kept_area, 4))


def hotspots(counts: np.ndarray, kept: np.ndarray, step: float, slide_mpp: float, tile_area_mm2: float,
             params: AggregationParams) -> list[dict]:
    """Top-k non-overlapping windows by density (count / kept area in the window)."""
    rows, cols = kept.shape
    tile_um = step * slide_mpp
    w = max(1, min(round(params.hotspot_window_um / tile_um), rows, cols))
    if rows == 0 or cols == 0 or not kept.any():
        return []

    def window_sums(a: np.ndarray) -> np.ndarray:
        s = np.zeros((rows + 1, cols + 1), np.float64)
        s[1:, 1:] = np.cumsum(np.cumsum(a, axis=0), axis=1)
        return s[w:, w:] - s[:-w, w:] - s[w:, :-w] + s[:-w, :-w]

    n = window_sums(counts.astype(np.float64))
    k = window_sums(kept.astype(np.float64))
    valid = k >= params.hotspot_min_coverage * w * w
    dens = np.where(valid, n / np.maximum(k, 1) / tile_area_mm2, -1.0)
    taken = np.zeros_like(valid)
    out = []
    for rank in range(1, params.hotspot_count + 1):
        candidates = np.where(taken, -1.0, dens)
        best = int(np.argmax(candidates))  # first maximum in row-major order: deterministic
        r, c = divmod(best, candidates.shape[1])
        if candidates[r, c] < 0:
            break
        out.append({"rank": rank, "x_px": round(c * step), "y_px": round(r * step), "width_px": round(w * step),
                    "height_px": round(w * step), "x_mm": round(c * step * slide_mpp / 1000, 4),
                    "y_mm": round(r * step * slide_mpp / 1000, 4), "width_mm": round(w * tile_um / 1000, 4),
                    "height_mm": round(w * tile_um / 1000, 4), "nuclei": int(n[r, c]),
                    "density_per_mm2": round(float(candidates[r, c]), 3),
                    "tissue_area_mm2": round(float(k[r, c] * tile_area_mm2), 4)})
        r0, c0 = max(0, r - w + 1), max(0, c - w + 1)
        taken[r0:r + w, c0:c + w] = True  # windows overlapping this one
    return out
