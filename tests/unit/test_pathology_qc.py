"""Tile QC (tissue ratio, blur) and the slide decision: pass, warn, fail (blur), empty; stain check."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("tiffslide", reason="the slide readers are not installed: run `make test`")

from inference.pathology import qc as Q  # noqa: E402
from inference.pathology.pipeline import SlideSettings, run_qc_stage  # noqa: E402
from inference.pathology.reader import open_slide  # noqa: E402
from inference.pathology.stain import estimate_stains, hematoxylin_od  # noqa: E402
from inference.pathology.synthetic import write_synthetic_slide  # noqa: E402
from inference.pathology.tiling import Block, TileGrid  # noqa: E402


def test_blur_and_tissue_per_tile(shared_data: Path):
    with open_slide(shared_data / "wsi" / "CMU-1-Small-Region.svs") as slide:
        pixels = slide.read_level(0, 896, 1344, 448, 448)  # 2×2 tiles of tissue
    block = Block(0, 0, 2, 2)
    candidates = np.ones((2, 2), bool)
    params = Q.QcParams()
    ratio, lap, status, sample = Q.measure_block(pixels, block, 224, candidates, 40, 238, params)
    assert (ratio > 0.5).all() and (lap > 300).all() and (status == Q.KEPT).all() and len(sample) > 50
    blurred = cv2.GaussianBlur(pixels, (0, 0), 3)
    _, lap_blur, status_blur, _ = Q.measure_block(blurred, block, 224, candidates, 40, 238, params)
    assert (lap_blur < params.blur_threshold).all() and (status_blur == Q.BLURRY).all()
    glass = np.full_like(pixels, 244)
    ratio_glass, _, status_glass, _ = Q.measure_block(glass, block, 224, candidates, 40, 238, params)
    assert (ratio_glass == 0).all() and (status_glass == Q.LOW_TISSUE).all()


def _assert_same_measures(fast, plain, where: str) -> None:
    (ratio, lap, status, sample), (ratio_p, lap_p, status_p, sample_p) = fast, plain
    assert np.array_equal(ratio, ratio_p) and np.array_equal(status, status_p), where
    assert np.array_equal(np.isnan(lap), np.isnan(lap_p)), where
    np.testing.assert_allclose(lap, lap_p, rtol=1e-6, equal_nan=True, err_msg=where)
    assert (sample is None) == (sample_p is None) and (sample is None or np.array_equal(sample, sample_p)), where


def test_block_measures_equal_the_plain_computation(shared_data: Path, tmp_path):
    """The sampled-row Laplacian and integer tile sums give the whole-block computation's results, on real
    H&E and IHC, on a synthetic slide, blurred, at block edges, with any candidates and tile size."""
    rng = np.random.default_rng(3)
    params = Q.QcParams()
    seen: set[int] = set()
    sources = []
    for name in ("CMU-1-Small-Region.svs", "OS-2-vsi_Ki67_crop.ome.tif"):
        with open_slide(shared_data / "wsi" / name) as slide:
            sources.append((name, slide.read_level(0, 0, 0, 1344, 1344)))
    with open_slide(write_synthetic_slide(tmp_path / "s.tif", 2048)) as slide:
        sources.append(("synthetic", slide.read_level(1, 0, 0, 1024, 1024)))
    for name, image in sources:
        for variant, pixels in (("sharp", image), ("blurred", cv2.GaussianBlur(image, (0, 0), 2.5))):
            for t in (224, 112, 64, 100, 30):  # 100 and 30: not multiples of 4, the plain path serves them
                for _ in range(3):
                    nr = int(rng.integers(1, min(4, image.shape[0] // t) + 1))
                    nc = int(rng.integers(1, min(4, image.shape[1] // t) + 1))
                    y = int(rng.integers(0, image.shape[0] - nr * t + 1))
                    x = int(rng.integers(0, image.shape[1] - nc * t + 1))
                    block = np.ascontiguousarray(pixels[y:y + nr * t, x:x + nc * t])
                    candidates = rng.random((nr, nc)) < 0.8
                    args = (block, Block(0, 0, nr, nc), t, candidates, int(rng.integers(8, 40)),
                            float(rng.uniform(200, 240)), params)
                    where = f"{name} {variant} tile {t} block {nr}x{nc} at ({x}, {y})"
                    _assert_same_measures(Q.measure_block(*args), Q.measure_block_reference(*args), where)
                    seen.update(np.unique(Q.measure_block(*args)[2]).tolist())
    assert seen == {Q.BACKGROUND, Q.LOW_TISSUE, Q.BLURRY, Q.KEPT}  # every status was compared: not vacuous


def _tiles(statuses: list[int]) -> Q.TileQc:
    grid = TileGrid(224 * 2 * len(statuses), 448, 224, 448.0, 0.5)
    tiles = Q.TileQc.empty(grid)
    tiles.status[0] = statuses
    tiles.laplacian_var[0] = [500.0 if s == Q.KEPT else 10.0 for s in statuses]
    return tiles


def test_decisions_and_counts_add_up():
    params = Q.QcParams(stain_check=False)
    ok = Q.decide(_tiles([Q.KEPT] * 8 + [Q.BLURRY, Q.BACKGROUND]), 0.8, 1.0, params)
    assert ok.status == "pass" and ok.blur_ratio == pytest.approx(1 / 9, abs=1e-4)
    warn = Q.decide(_tiles([Q.KEPT] * 6 + [Q.BLURRY] * 3), 0.8, 1.0, params)
    assert warn.status == "warn" and "out of focus" in warn.warnings[0]
    fail = Q.decide(_tiles([Q.KEPT] * 2 + [Q.BLURRY] * 6), 0.8, 1.0, params)
    assert fail.status == "fail" and "75%" in fail.reason and "out of focus" in fail.reason
    empty = Q.decide(_tiles([Q.BACKGROUND, Q.LOW_TISSUE]), 0.0, 1.0, params)
    assert empty.status == "empty" and "no tissue" in empty.reason
    tiles = _tiles([Q.KEPT, Q.BLURRY, Q.LOW_TISSUE, Q.BACKGROUND])
    counts = tiles.counts()
    assert sum(counts.values()) == tiles.grid.possible
    restored = Q.tiles_from_state(Q.tile_state(tiles))
    assert np.array_equal(restored.status, tiles.status) and restored.grid == tiles.grid


def test_stain_check_tells_he_from_ihc(shared_data: Path):
    rng = np.random.default_rng(0)
    verdicts = {}
    for name, size in (("CMU-1-Small-Region.svs", (2220, 2967)), ("OS-2-vsi_Ki67_crop.ome.tif", (1445, 1445))):
        with open_slide(shared_data / "wsi" / name) as slide:
            px = slide.read_region((0, 0), 0, size).reshape(-1, 3)
        grey = cv2.cvtColor(px.reshape(-1, 1, 3), cv2.COLOR_RGB2GRAY).ravel()
        px = px[grey < 200]
        verdicts[name] = estimate_stains(px[rng.choice(len(px), 30_000)])
    assert verdicts["CMU-1-Small-Region.svs"].looks_like_he is True
    ihc = verdicts["OS-2-vsi_Ki67_crop.ome.tif"]
    assert ihc.looks_like_he is False and ihc.dab_angle_deg < ihc.eosin_angle_deg


def test_hematoxylin_channel_is_high_in_nuclei():
    nucleus, stroma = np.array([[[70, 45, 130]]], np.uint8), np.array([[[235, 150, 215]]], np.uint8)
    assert hematoxylin_od(nucleus)[0, 0] > 0.5 > hematoxylin_od(stroma)[0, 0]


def test_qc_stage_on_synthetic_slides(tmp_path):
    settings = SlideSettings(workers=1)
    with open_slide(write_synthetic_slide(tmp_path / "s.tif", 3072)) as slide:
        outcome = run_qc_stage(slide, settings)
    assert outcome.error is None and outcome.slide_qc.status == "pass"
    counts = outcome.tile_counts
    assert counts["extracted"] + sum(counts["filtered"].values()) == counts["possible"] == 36
    assert outcome.slide_qc.stain.looks_like_he and outcome.thumbnail.shape == (1024, 1024, 3)
    with open_slide(write_synthetic_slide(tmp_path / "n.tif", 1024, mpp=None)) as slide:
        missing = run_qc_stage(slide, settings)
    assert missing.mpp_source == "missing" and "pixel size" in missing.error and missing.tiles is None
    with open_slide(write_synthetic_slide(tmp_path / "n.tif", 1024, mpp=None)) as slide:
        declared = run_qc_stage(slide, SlideSettings(workers=1, declared_mpp=0.25))
    assert declared.error is None and declared.metadata["mpp_source"] == "declared"
    assert any("declared" in w for w in declared.slide_qc.warnings)
