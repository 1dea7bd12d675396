"""Counts, densities per mm², hotspots and the heatmap image."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("cv2", reason="OpenCV is not installed: run `make test`")

from inference.pathology.aggregation import AggregationParams, aggregate  # noqa: E402
from inference.pathology.heatmap import colormap, encode_png, render_heatmap  # noqa: E402
from inference.pathology.qc import BACKGROUND, KEPT, TileQc  # noqa: E402
from inference.pathology.tiling import TileGrid  # noqa: E402


def _qc(rows: int, cols: int) -> TileQc:
    qc = TileQc.empty(TileGrid(cols * 448, rows * 448, 224, 448.0, 0.5))  # slide at 0.25 µm/px
    qc.status[:] = KEPT
    return qc


def test_densities_and_types():
    qc = _qc(4, 4)
    qc.status[0, 0] = BACKGROUND
    counts = np.zeros((4, 4, 2), np.int32)
    counts[..., 0] = 10
    counts[1, 1, 1] = 5
    counts[0, 0, 0] = 99  # a tile that is not kept does not count
    figures = aggregate(counts, qc, ("Nucleus (unclassified)", "Inflammatory"), 0.25,
                        AggregationParams(hotspot_window_um=112, hotspot_count=2))
    area = 0.112 ** 2
    assert figures.total == 15 * 10 + 5 and figures.by_type == {"Nucleus (unclassified)": 150, "Inflammatory": 5}
    assert figures.density["max"] == pytest.approx(15 / area, rel=1e-4)
    assert figures.density["min"] == pytest.approx(10 / area, rel=1e-4)
    assert figures.density["overall"] == pytest.approx(155 / (15 * area), rel=1e-4)
    assert np.isnan(figures.density_grid[0, 0])
    first, second = figures.regions_of_interest
    assert (first["x_px"], first["y_px"], first["nuclei"], first["rank"]) == (448, 448, 15, 1)
    assert first["x_mm"] == pytest.approx(0.112) and first["width_mm"] == pytest.approx(0.112)
    assert second["density_per_mm2"] <= first["density_per_mm2"]


def test_hotspots_do_not_overlap():
    qc = _qc(10, 10)
    counts = np.zeros((10, 10, 1), np.int32)
    counts[2:4, 2:4] = 50
    counts[7, 7] = 40
    figures = aggregate(counts, qc, ("n",), 0.25, AggregationParams(hotspot_window_um=224, hotspot_count=3))
    boxes = [(r["x_px"], r["y_px"], r["width_px"]) for r in figures.regions_of_interest]
    for i, (x, y, w) in enumerate(boxes):
        for x2, y2, w2 in boxes[i + 1:]:
            assert x + w <= x2 or x2 + w2 <= x or y + w <= y2 or y2 + w2 <= y


def test_heatmap_has_the_thumbnail_size_and_is_deterministic():
    thumb = np.full((700, 512, 3), 240, np.uint8)
    density = np.full((12, 9), np.nan, np.float32)
    density[3:8, 2:6] = np.arange(20, dtype=np.float32).reshape(5, 4) * 100
    a = render_heatmap(thumb, density, (9 * 448, 12 * 448), (4100, 5500),
                       rois=[{"rank": 1, "x_px": 896, "y_px": 1344, "width_px": 896, "height_px": 896}])
    assert a.shape == thumb.shape and not np.array_equal(a, thumb)
    assert (a[5, 5] == thumb[5, 5]).all()  # not analysed: the thumbnail shows through
    b = render_heatmap(thumb, density, (9 * 448, 12 * 448), (4100, 5500),
                       rois=[{"rank": 1, "x_px": 896, "y_px": 1344, "width_px": 896, "height_px": 896}])
    assert encode_png(a) == encode_png(b)
    lut = colormap()
    assert lut.shape == (256, 3) and tuple(lut[0]) == (68, 1, 84) and tuple(lut[-1]) == (253, 231, 37)
