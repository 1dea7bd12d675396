"""Tile grids, nearest-level block reads, mask coverage per tile and the ordered thread pool."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

pytest.importorskip("tiffslide", reason="the slide readers are not installed: run `make test`")

from inference.pathology.reader import open_slide  # noqa: E402
from inference.pathology.synthetic import write_synthetic_slide  # noqa: E402
from inference.pathology.tiling import (ResolutionReader, TileGrid, blocks_of, mask_fraction_per_tile,  # noqa: E402
                                        mask_fraction_per_tile_reference, ordered_map)


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    with open_slide(write_synthetic_slide(tmp_path_factory.mktemp("t") / "s.tif", 2048)) as s:
        yield s


def test_reads_at_the_nearest_level_and_resizes_only_when_needed(slide):
    exact = ResolutionReader(slide, 0.25, 0.5)
    assert (exact.level, exact.resize, exact.mpp) == (1, False, 0.5)
    between = ResolutionReader(slide, 0.25, 0.7)  # 2.8x: level 1 (2x) read, then reduced
    assert (between.level, between.resize) == (1, True) and between.mpp == pytest.approx(0.7)
    finer = ResolutionReader(slide, 0.25, 0.125)  # finer than level 0: enlarged
    assert (finer.level, finer.resize) == (0, True)
    assert exact.read(0, 0, 300, 200).shape == between.read(0, 0, 300, 200).shape == (200, 300, 3)
    level1 = slide.read_level(1, 100, 50, 64, 64)
    assert np.array_equal(exact.read(200, 100, 64, 64), level1)  # no resampling at the exact level


def test_grid_counts_and_mask_coverage(slide):
    grid = TileGrid.for_reader(ResolutionReader(slide, 0.25, 0.5), 2048, 2048, 224)
    assert (grid.step, grid.cols, grid.rows, grid.possible) == (448, 4, 4, 16)
    assert grid.tile_area_mm2 == pytest.approx(0.112 ** 2)
    mask = np.zeros((512, 512), bool)
    mask[:, :112] = True  # the first 448 level-0 px columns = the first column of tiles
    frac = mask_fraction_per_tile(grid, mask, 4.0, 4.0)
    assert frac.shape == (4, 4) and np.allclose(frac[:, 0], 1) and np.allclose(frac[:, 1:], 0)


def test_mask_coverage_equals_one_bincount_per_pixel(shared_data):
    """Run sums give the per-pixel bincount's fractions exactly: random grids and masks (masks narrower or
    wider than the slide, coarser or finer than the tiles, bool or integer) and a real slide's tissue mask."""
    from inference.pathology.tissue import (TissueMaskParams, overview_size, read_overview, tissue_mask,
                                            um_per_overview_px)

    rng = np.random.default_rng(5)
    for trial in range(200):
        width, height = int(rng.integers(200, 6000)), int(rng.integers(200, 6000))
        grid = TileGrid(width, height, 224, float(rng.uniform(40, 900)), 0.5)
        scale = float(rng.uniform(1, 300))
        shape = tuple(max(1, int(side / scale) + int(rng.integers(-3, 4))) for side in (height, width))
        mask = rng.random(shape) < rng.random() if trial % 2 else (rng.random(shape) * 4).astype(np.uint8)
        sy = scale * float(rng.uniform(0.9, 1.1))
        assert np.array_equal(mask_fraction_per_tile(grid, mask, scale, sy),
                              mask_fraction_per_tile_reference(grid, mask, scale, sy)), trial
    with open_slide(shared_data / "wsi" / "CMU-1-Small-Region.svs") as real:
        m = real.metadata
        overview = read_overview(real, overview_size(m.width, m.height, m.mpp_x, TissueMaskParams()))
        mask, _ = tissue_mask(overview.image, um_per_overview_px(overview, m.mpp_x))
        grid = TileGrid.for_reader(ResolutionReader(real, m.mpp_x, 0.5), m.width, m.height, 224)
        fast = mask_fraction_per_tile(grid, mask, overview.scale_x, overview.scale_y)
        assert mask.any() and np.array_equal(fast, mask_fraction_per_tile_reference(grid, mask, overview.scale_x,
                                                                                    overview.scale_y))


def test_blocks_hold_only_selected_tiles():
    selected = np.zeros((20, 20), bool)
    selected[0, 0] = selected[17, 19] = True
    blocks = blocks_of(selected, 8)
    assert [(b.row, b.col, b.n_rows, b.n_cols) for b in blocks] == [(0, 0, 8, 8), (16, 16, 4, 4)]


def test_ordered_map_keeps_order_and_bounds_work_in_flight():
    running, peak = [0], [0]
    lock = threading.Lock()

    def work(i):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.01 * (5 - i % 5))
        with lock:
            running[0] -= 1
        return i * i

    out = []
    for value in ordered_map(work, range(20), workers=2, in_flight=3):
        out.append(value)
    assert out == [i * i for i in range(20)] and peak[0] <= 2
