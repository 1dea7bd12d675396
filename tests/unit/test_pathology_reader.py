"""Slide reading: format detection by content, backends, white outside the slide, DICOM colour repair."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tiffslide", reason="the slide readers are not installed: run `make test`")

from inference.pathology.reader import CorruptSlide, UnsupportedSlide, open_slide, sniff_format  # noqa: E402
from inference.pathology.synthetic import write_synthetic_slide  # noqa: E402


@pytest.fixture(scope="module")
def wsi(shared_data: Path) -> Path:
    folder = shared_data / "wsi"
    if not folder.is_dir():
        pytest.skip(f"{folder} is not there")
    return folder


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return write_synthetic_slide(tmp_path_factory.mktemp("slide") / "s.tif", 2048)


def test_format_comes_from_the_content_not_the_name(tmp_path, synthetic):
    fake = tmp_path / "photo.svs"
    fake.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(UnsupportedSlide, match="PNG"):
        sniff_format(fake)
    renamed = tmp_path / "slide.png"
    renamed.write_bytes(synthetic.read_bytes())
    assert sniff_format(renamed) == "tiff" and open_slide(renamed).metadata.width == 2048
    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    with pytest.raises(CorruptSlide, match="empty"):
        open_slide(empty)
    noise = tmp_path / "noise.bin"
    noise.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(UnsupportedSlide, match="not a whole-slide image"):
        open_slide(noise)


def test_synthetic_pyramid_metadata_and_white_outside(synthetic):
    with open_slide(synthetic) as slide:
        meta = slide.metadata
        assert (meta.width, meta.height, meta.mpp_x) == (2048, 2048, 0.25)
        assert [lv.downsample for lv in meta.levels] == [1.0, 2.0, 4.0]
        assert slide.best_level(2.0) == 1 and slide.best_level(3.9) == 1 and slide.best_level(0.5) == 0
        region = slide.read_region((2000, -20), 0, (100, 60))
        assert region.shape == (60, 100, 3) and region.dtype == np.uint8
        assert (region[:20] == 255).all() and (region[:, 48:] == 255).all()  # outside: white, not black


def test_truncated_svs_is_corrupt(tmp_path, wsi):
    cut = tmp_path / "cut.svs"
    cut.write_bytes((wsi / "CMU-1-Small-Region.svs").read_bytes()[:300_000])
    with pytest.raises(CorruptSlide, match="truncated or damaged"):
        open_slide(cut)


def test_real_slides(wsi):
    with open_slide(wsi / "CMU-1-Small-Region.svs") as svs:
        meta = svs.metadata
        assert (meta.width, meta.height, meta.mpp_x, meta.objective_power) == (2220, 2967, 0.499, 20.0)
        assert meta.vendor == "aperio" and meta.backend.startswith("tiffslide")
        reference = svs.read_region((0, 0), 0, (2220, 2967)).astype(int)
    with open_slide(wsi / "OS-2-vsi_Ki67_crop.ome.tif") as ome:  # OpenSlide refuses this crop; tiffslide reads it
        assert ome.metadata.mpp_x == pytest.approx(0.346, abs=1e-3) and ome.metadata.backend.startswith("tiffslide")
    folder = wsi / "dicom_wsi_cmu1_small_region"
    for path, backend in ((folder, "wsidicom"), (folder / "level-0-frames-0-30.dcm", "openslide")):
        with open_slide(path) as dcm:
            assert dcm.metadata.backend.startswith(backend) and dcm.metadata.mpp_x == pytest.approx(0.499)
            assert dcm.dicom_header.SOPClassUID == "1.2.840.10008.5.1.4.1.1.77.1.6"
            assert any("YCbCr" in w for w in dcm.metadata.warnings)
            pixels = dcm.read_region((0, 0), 0, (2220, 2967)).astype(int)
            assert np.abs(pixels - reference).mean() < 6  # the same slide, once its colours are repaired


def test_direct_tile_reads_equal_tiffslide(wsi, synthetic):
    """The tiled-TIFF fast path gives tiffslide's pixels exactly: random regions, edges, whole levels."""
    rng = np.random.default_rng(7)
    for path in (wsi / "CMU-1-Small-Region.svs", wsi / "OS-2-vsi_Ki67_crop.ome.tif", synthetic):
        with open_slide(path) as slide:
            backend = slide._backend
            for level, lv in enumerate(slide.levels):
                assert backend._tiled(level) is not None, f"{path.name} level {level} is not read directly"
                regions = [(0, 0, lv.width, lv.height), (lv.width - 1, lv.height - 1, 1, 1)]
                for _ in range(12):
                    w, h = int(rng.integers(1, min(lv.width, 600) + 1)), int(rng.integers(1, min(lv.height, 600) + 1))
                    regions.append((int(rng.integers(0, lv.width - w + 1)), int(rng.integers(0, lv.height - h + 1)),
                                    w, h))
                for x, y, w, h in regions:
                    direct = slide.read_level(level, x, y, w, h)
                    assert np.array_equal(direct, backend.read_tiffslide(level, x, y, w, h)), (path.name, level, x, y)
            outside = slide.read_level(0, -10, -10, 40, 40)  # the Slide's white padding still applies
            assert (outside[:10] == 255).all() and np.array_equal(outside[10:, 10:],
                                                                   backend.read_tiffslide(0, 0, 0, 30, 30))
